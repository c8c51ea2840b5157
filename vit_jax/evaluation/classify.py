"""Classifies image files with a trained ViT, preprocessed exactly as its eval split was.

Files are decoded as the eval pipeline decodes its examples (`preprocess.decode`, i.e.
`tf.io.decode_image`, whose JPEG decoder differs from PIL's, except under timm's crop, which
decodes JPEGs as PIL) and then go through its own `preprocess.eval_image`; PIL reads only the
formats and modes TF does not (TIFF, palette BMP, grey GIF, ...) and tells grey files from colour
ones. Batches have one fixed size (the last one
is padded), so the forward pass compiles once however many files come.
"""
import dataclasses
import io
import json
import logging
import os
import re
import sys
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow as tf

from vit_jax.checkpoints import restore
from vit_jax.data import input_pipeline
from vit_jax.data import pp_options
from vit_jax.data import preprocess
from vit_jax.errors import ConfigError, first_line

# PIL modes decoded as one grey channel (as TF decodes grey PNGs); every other mode becomes RGB.
_GREY_8BIT = ('1', 'L', 'LA', 'La', 'F')
_GREY_16BIT = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
# What TF's decoders read as PIL does. Not BMP: TF takes a palette BMP's indices for grey levels.
_TF_FORMATS = ('JPEG', 'PNG', 'GIF', 'WEBP')


class ImageError(ConfigError):
  """A file that is not a readable image; the other files are still classified."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: not a readable image ({reason})')
    self.path = path


def _pil_pixels(image: Image.Image) -> np.ndarray:
  """As TF decodes a PNG of these pixels: 16-bit grey keeps its high byte, palettes are expanded
  to RGB, alpha is dropped."""
  image.load()
  if image.mode in _GREY_16BIT:
    pixels = (np.clip(np.asarray(image, np.int64), 0, 65535) >> 8).astype(np.uint8)
  else:
    pixels = np.asarray(image.convert('L' if image.mode in _GREY_8BIT else 'RGB'))
  return pixels[..., None] if pixels.ndim == 2 else pixels


def load_image(path: str, jpeg_as_pil: bool = False) -> np.ndarray:
  """uint8 [H, W, 1 or 3], the pixels the eval pipeline would decode from this file (first
  frame, alpha dropped; `jpeg_as_pil`: see `preprocess.decode`); grey files keep one channel."""
  if os.path.isdir(path):
    raise ImageError(path, f'a folder: pass the images in it, e.g. {os.path.join(path, "*.jpg")}')
  try:
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      if image.format in _TF_FORMATS:
        channels = 1 if image.mode in _GREY_8BIT + _GREY_16BIT else 3
        try:
          return preprocess.decode(tf.constant(data), channels, jpeg_as_pil).numpy()
        except tf.errors.InvalidArgumentError:
          pass  # TF decodes GIFs in colour only; a broken file fails in PIL too.
      return _pil_pixels(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL names the buffer it read from.
    reason = re.sub(r' ?<_io\.BytesIO object at 0x[0-9a-f]+>', '', first_line(e))
    raise ImageError(path, reason) from e


def known_class_names(pretrained: restore.Pretrained) -> Optional[list[str]]:
  """The class names the checkpoint's file gives (timm's config.json), else those of the dataset
  a workdir was trained on; None when unknown, unprepared or not one per class of the head."""
  if pretrained.class_names:
    if len(pretrained.class_names) == pretrained.num_classes:
      return list(pretrained.class_names)
    logging.warning('%s names %d classes but the head has %d; using class indices',
                    pretrained.source, len(pretrained.class_names), pretrained.num_classes)
    return None
  config = pretrained.config or {}
  if not config.get('dataset'):
    return None
  try:
    info = input_pipeline.get_info(config['dataset'], config.get('train_split', 'train'),
                                   config.get('data_dir'))
  except ConfigError as e:
    logging.warning('no class names (%s); using class indices', e)
    return None
  if info.class_names and len(info.class_names) != pretrained.num_classes:
    logging.warning('%s has %d classes but the head %d; using class indices', config['dataset'],
                    len(info.class_names), pretrained.num_classes)
    return None
  return info.class_names


def read_labels(path: str) -> list[str]:
  """A labels file: one class name per line, in class-index order."""
  try:
    with open(path, encoding='utf-8') as f:
      return [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise ConfigError(f'labels file {path} is unreadable ({e.strerror}): pass a text file with '
                      'one class name per line') from e
  except UnicodeDecodeError as e:
    raise ConfigError(f'labels file {path} is not UTF-8 text: pass a text file with one class '
                      'name per line') from e


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A model ready to run, and how its inputs were preprocessed at evaluation."""
  model: nn.Module
  params: Any  # In the model's layout, host arrays.
  image_size: int
  channels: int
  eval_pp: dict[str, Any]  # The pp.eval options: crop and normalisation.
  pretrained: restore.Pretrained

  def preprocess(self, pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels [H, W, C] -> float32 [image_size, image_size, channels], the eval split's
    input."""
    return preprocess.eval_image(tf.convert_to_tensor(pixels), self.image_size, self.channels,
                                 self.eval_pp).numpy()

  def read(self, path: str) -> np.ndarray:
    """An image file decoded and preprocessed as the eval split's examples."""
    return self.preprocess(load_image(path, preprocess.decodes_jpeg_as_pil(self.eval_pp)))


def load_checkpoint(path: str, model: Optional[str] = None, image_size: Optional[int] = None,
                    eval_pp: Optional[Mapping[str, Any]] = None) -> Checkpoint:
  """A workdir's newest params and architecture, or a `.npz` or timm `.safetensors` of the named
  `model` (float32); `image_size` and `eval_pp` ({'crop': ..., 'crop_fraction': ...}) override
  the resolution its config gives or its position embeddings suggest, and its pp.eval options."""
  pretrained = restore.load_for_reading(path, model, image_size, eval_pp)
  eval_pp = pretrained.eval_pp()
  pp_options.check_normalisation(eval_pp, pretrained.channels, 'pp.eval')
  flax_model = pretrained.create_model(pretrained.num_classes, dtype='float32')
  params = restore.checked_params(pretrained, flax_model)
  return Checkpoint(flax_model, params, pretrained.image_size, pretrained.channels, eval_pp,
                    pretrained)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One file's scores; probabilities and the top k follow from the logits."""
  path: str
  logits: np.ndarray  # float32 [num_classes]

  @property
  def probabilities(self) -> np.ndarray:
    shifted = np.exp(self.logits.astype(np.float64) - self.logits.max())
    return shifted / shifted.sum()

  def top_k(self, k: int) -> list[tuple[int, float]]:
    """(class index, probability) of the k most likely classes, most likely first."""
    probs = self.probabilities
    order = np.argsort(-probs, kind='stable')[:k]
    return [(int(i), float(probs[i])) for i in order]


class Classifier:
  """A checkpoint's model on the device, fed fixed-size batches; `num_compiles` counts forward
  traces."""

  def __init__(self, checkpoint: Checkpoint, *, class_names: Optional[Sequence[str]] = None,
               batch_size: int = 32):
    num_classes = checkpoint.model.num_classes
    if not num_classes:
      raise ConfigError(f'{checkpoint.pretrained.source} has no classification head: it cannot '
                        'classify; pass a checkpoint trained with one')
    if batch_size <= 0:
      raise ConfigError(f'batch_size={batch_size} must be positive')
    if class_names is not None and len(class_names) != num_classes:
      raise ConfigError(f'{len(class_names)} class names for a model with {num_classes} '
                        'classes: give one name per class')
    self.checkpoint, self.batch_size = checkpoint, batch_size
    self.class_names = list(class_names) if class_names is not None else None
    self._params = jax.device_put(checkpoint.params)
    self.num_compiles = 0

    def forward(params, images):
      self.num_compiles += 1  # Runs only while tracing, i.e. once per compilation.
      return checkpoint.model.apply({'params': params}, images, train=False)

    self._forward = jax.jit(forward)

  @classmethod
  def from_checkpoint(cls, path: str, model: Optional[str] = None, *,
                      image_size: Optional[int] = None,
                      eval_pp: Optional[Mapping[str, Any]] = None,
                      class_names: Optional[Sequence[str]] = None,
                      batch_size: int = 32) -> 'Classifier':
    """From a workdir (architecture, image size, crop and labels from its config), a `.npz` or
    timm's `.safetensors` (labels from its config.json)."""
    checkpoint = load_checkpoint(path, model, image_size, eval_pp)
    classifier = cls(checkpoint, class_names=class_names, batch_size=batch_size)
    if class_names is None:
      classifier.class_names = known_class_names(checkpoint.pretrained)
    return classifier

  @property
  def num_classes(self) -> int:
    return self.checkpoint.model.num_classes

  def label(self, index: int) -> str:
    return self.class_names[index] if self.class_names else str(index)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float32 [N, num_classes] for preprocessed images [N, size, size, channels], any N."""
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._forward(self._params, jnp.asarray(padded)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

  def classify_files(self, paths: Iterable[str]) -> Iterator[Prediction | ImageError]:
    """One Prediction per path, in order; an ImageError in place of each unreadable file.

    Files are read a batch at a time, so any number of them fits in memory.
    """
    pending: list[tuple[str, Optional[np.ndarray], Optional[ImageError]]] = []

    def flush():
      images = [image for _, image, _ in pending if image is not None]
      logits = iter(self.logits(np.stack(images)) if images else [])
      for path, image, error in pending:
        yield error if image is None else Prediction(path, next(logits))
      pending.clear()

    for path in paths:
      try:
        pending.append((path, self.checkpoint.read(path), None))
      except ImageError as e:
        pending.append((path, None, e))
      if sum(image is not None for _, image, _ in pending) == self.batch_size:
        yield from flush()
    yield from flush()


def _prediction_json(classifier: Classifier, prediction: Prediction, top_k: int) -> dict:
  return {
      'image': prediction.path,
      f'top{top_k}': [{'index': i, 'label': classifier.label(i), 'probability': p}
                      for i, p in prediction.top_k(top_k)],
      'probabilities': prediction.probabilities.tolist(),
      'logits': prediction.logits.astype(float).tolist(),
  }


def report(classifier: Classifier, paths: Sequence[str], *, as_json: bool = False,
           top_k: int = 5, source: str = '', out: TextIO = sys.stdout,
           err: TextIO = sys.stderr) -> int:
  """Classifies `paths` and writes what `vit_jax.infer` prints; returns the number that failed.

  Text: each path, then its top-k as `  probability  label` lines, as soon as its batch is done.
  JSON (one document at the end): {"checkpoint": source, "params" (what was read: its step, and
  whether it is the Polyak average), "labels", "predictions": [{"image",
  "top<k>": [{"index", "label", "probability"}], "probabilities", "logits"}], "errors":
  [{"image", "error"}]}. Each unreadable file also gets one `error: ...` line on `err`.
  """
  if top_k < 1:
    raise ConfigError(f'top_k={top_k}: print at least one class per image (--top_k=1 or more)')
  top_k = min(top_k, classifier.num_classes)
  predictions, errors = [], []
  for result in classifier.classify_files(paths):
    if isinstance(result, ImageError):
      print(f'error: {result}', file=err, flush=True)
      errors.append({'image': result.path, 'error': str(result)})
    elif as_json:
      predictions.append(_prediction_json(classifier, result, top_k))
    else:
      lines = [f'  {p:.4f}  {classifier.label(i)}' for i, p in result.top_k(top_k)]
      print('\n'.join([result.path, *lines]), file=out, flush=True)
  if as_json:
    labels = [classifier.label(i) for i in range(classifier.num_classes)]
    json.dump({'checkpoint': source, 'params': classifier.checkpoint.pretrained.source,
               'labels': labels, 'predictions': predictions, 'errors': errors}, out, indent=1)
    out.write('\n')
  return len(errors)
