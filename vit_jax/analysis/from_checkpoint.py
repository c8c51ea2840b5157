"""The paper's analyses of a checkpoint (a workdir, a released-layout `.npz` or timm's
`.safetensors`) on image files or on a dataset split, preprocessed as the model's eval split
was: what `vit_jax.analyze` runs."""
from typing import Any, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from vit_jax.analysis import run
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify


def supported(ckpt: classify.Checkpoint) -> list[str]:
  """The analyses that apply to this architecture."""
  applies = {'rollout': run.rollout_applies(ckpt.model),
             'filters': run.filters_apply(ckpt.model, ckpt.channels)}
  return [name for name in run.ANALYSES if applies.get(name, True)]


def dataset_images(ckpt: classify.Checkpoint, dataset: str, split: str,
                   data_dir: Optional[str], count: int) -> np.ndarray:
  """The first `count` images of a split, through the model's eval preprocessing."""
  input_pipeline.get_info(dataset, split, data_dir)  # A wrong split named as given, unsliced.
  pp = ml_collections.ConfigDict({'eval': ckpt.eval_pp})
  read = split_read(split, count)
  batches = input_pipeline.make_eval_iterator(
      dataset=dataset, split=read, data_dir=data_dir, global_batch=count,
      image_size=ckpt.image_size, channels=ckpt.channels, pp=pp, process_index=0,
      process_count=1)
  batch = list(batches)[0] if read != split else next(iter(batches))
  return batch['image'][batch['mask']]


def split_read(split: str, count: int) -> str:
  """A plain split sliced to the `count` images taken, so that it is read to its end (TF warns
  when a cached dataset is left half-read); slices and sums, where 'train+test[:n]' would slice
  only test, stay as given (their first `count` are taken)."""
  return split if any(c in split for c in '[+') else f'{split}[:{count}]'


def file_images(ckpt: classify.Checkpoint, paths: Sequence[str]) -> np.ndarray:
  """Image files through the model's eval preprocessing; any unreadable file is an error here."""
  return np.stack([ckpt.read(path) for path in paths])


def analyze_checkpoint(checkpoint: str, out_dir: str, *, model: Optional[str] = None,
                       image_size: Optional[int] = None,
                       eval_pp: Optional[Mapping[str, Any]] = None,
                       images: Sequence[str] = (),
                       dataset: Optional[str] = None, split: Optional[str] = None,
                       data_dir: Optional[str] = None, num_images: Optional[int] = None,
                       num_distance_images: Optional[int] = None,
                       which: Optional[Sequence[str]] = None) -> dict[str, dict]:
  """Runs the analyses and writes `<name>.png` / `<name>.json` files; returns the numbers.

  The rollout shows the first `num_images` and the distance averages over the first
  `num_distance_images` (one forward pass: the first ones serve both) of the image files (by
  default all of them) or of the dataset's split (by default 8 and 32 of a workdir's own eval
  split, else of 'test'). posemb and filters alone read no images. `image_size` and `eval_pp`
  (crop, crop_fraction) override the checkpoint's own.
  """
  if any(n is not None and n <= 0 for n in (num_images, num_distance_images)):
    raise ConfigError('num_images and num_distance_images must be positive')
  if images and dataset:
    raise ConfigError('pass image files or --dataset, not both')
  if which:
    run.check_names(which)
  ckpt = classify.load_checkpoint(checkpoint, model, image_size, eval_pp)
  which = list(which) if which else supported(ckpt)
  config = ckpt.pretrained.config or {}
  variables = {'params': ckpt.params}
  about = {'checkpoint': checkpoint, 'params': ckpt.pretrained.source,  # As infer --json.
           'image_size': ckpt.image_size, **ckpt.eval_pp}
  if not set(which) & {'rollout', 'distance'}:  # Weights only: an image gives just the grid.
    blank = np.zeros((1, ckpt.image_size, ckpt.image_size, ckpt.channels), np.float32)
    return run.analyze(ckpt.model, variables, blank, out_dir=out_dir, which=which, about=about)
  if images:
    return run.analyze(ckpt.model, variables, file_images(ckpt, images), out_dir=out_dir,
                       which=which, num_shown=num_images, num_averaged=num_distance_images,
                       about=about | {'images': list(images)})
  dataset = dataset or config.get('dataset')
  if not dataset:
    raise ConfigError(f'{checkpoint} names no dataset: pass --images=FILE,... or --dataset')
  own = dataset == config.get('dataset')
  data_dir = data_dir or (config.get('data_dir') if own else None)
  split = split or (config.get('eval_split') if own else None) or 'test'
  num_images, num_distance_images = num_images or 8, num_distance_images or 32
  count = max(num_images, num_distance_images)
  pixels = dataset_images(ckpt, dataset, split, data_dir, count)
  return run.analyze(ckpt.model, variables, pixels, out_dir=out_dir, which=which,
                     num_shown=num_images, num_averaged=num_distance_images,
                     about=about | {'dataset': dataset, 'split': split_read(split, count)})
