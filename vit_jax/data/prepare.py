"""Turns data shipped by package registries into TFDS datasets on disk, offline.

Supported sources (everything else: prepare with TFDS itself, see
`catalog.how_to_prepare`):

* `fashion_mnist`: TFDS's own builder, fed the idx files of Debian's
  `dataset-fashion-mnist` (or `--source` DIR holding the same four .gz files)
  instead of URLs, so the result is exactly the catalogue dataset.
* `digits`: scikit-learn's bundled digits via `vit_jax.data.digits`.
* any new NAME with `source=ROOT`: an image folder `ROOT/<split>/<label>/*.jpg|png`
  read by `tfds.folder_dataset.ImageFolder` and stored as a TFDS dataset NAME
  (encoded bytes kept as they are; decoded as 3 channels). Afterwards NAME is
  used like any other dataset name.
"""
import gzip
import os
import re
import shutil
import tempfile
import urllib.parse

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import catalog
from vit_jax.data import digits  # pylint: disable=unused-import  # Registers 'digits'.
from vit_jax.errors import ConfigError, check_not_a_file

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
_IDX_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
_OFFLINE = tfds.download.DownloadConfig(try_download_gcs=False)


def prepare(name: str, data_dir: str | None = None,
            source: str | None = None) -> str:
  """Prepares dataset `name` under `data_dir`; returns the resolved data_dir."""
  data_dir = catalog.resolve_data_dir(data_dir)
  check_not_a_file(data_dir, 'data_dir')
  if name == 'fashion_mnist':
    _prepare_fashion_mnist(data_dir, source or DEBIAN_FASHION_MNIST)
  elif name == 'digits':
    if source:
      raise ConfigError('digits ships with scikit-learn: drop --source')
    tfds.builder('digits', data_dir=data_dir).download_and_prepare(
        download_config=_OFFLINE)
  elif source:
    _prepare_image_folder(name, data_dir, source)
  else:
    raise ConfigError(
        f'cannot prepare {name!r} offline: use fashion_mnist, digits, or an '
        f'image folder with --source=ROOT; {catalog.how_to_prepare(name, data_dir)}')
  return data_dir


class _LocalFiles:
  """Stands in for TFDS's DownloadManager: answers URLs with local files."""

  def __init__(self, files: dict[str, str]):
    self._files = files  # URL basename -> local path
    self.downloaded_size = 0

  def download_and_extract(self, urls):
    return tf.nest.map_structure(
        lambda url: self._files[os.path.basename(urllib.parse.urlparse(url).path)],
        urls)


def _prepare_fashion_mnist(data_dir: str, source: str) -> None:
  """Runs TFDS's fashion_mnist builder on un-gzipped local idx files; a prepared dataset needs
  none (the Debian package may be gone since)."""
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  if builder.is_prepared():
    return
  missing = [f for f in _IDX_FILES if not os.path.exists(os.path.join(source, f))]
  if missing:
    hint = ('apt-get install dataset-fashion-mnist'
            if source == DEBIAN_FASHION_MNIST else f'put them in {source}')
    raise ConfigError(f'fashion_mnist needs {", ".join(missing)} in {source}: {hint}')
  with tempfile.TemporaryDirectory() as tmp:
    files = {}
    for f in _IDX_FILES:
      files[f] = os.path.join(tmp, f[:-len('.gz')])
      with gzip.open(os.path.join(source, f), 'rb') as src, open(files[f], 'wb') as dst:
        shutil.copyfileobj(src, dst)
    # The builder's only network access is its download manager; the Debian
    # .gz files are recompressed, so TFDS's checksums of the originals cannot
    # match them and its manual_dir route would refuse them.
    # pylint: disable-next=protected-access
    builder._make_download_manager = lambda **_: _LocalFiles(files)
    builder.download_and_prepare(download_config=_OFFLINE)


def _check_images_decode(examples: tf.data.Dataset) -> None:
  """Every file decodes as training will decode it: a bad one would otherwise stop training
  deep inside tf.data, naming no file."""
  for example in examples:
    try:
      tf.io.decode_image(example['image'], channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
      reason = re.sub(r'\{\{.*?\}\}|\[Op:.*', '', e.message).strip()  # TF's op decorations.
      raise ConfigError(f"{example['image/filename'].numpy().decode()} is not a readable image "
                        f'({reason}): remove or replace it, then prepare again') from e


def _prepare_image_folder(name: str, data_dir: str, root: str) -> None:
  """Stores `root/<split>/<label>/*` as TFDS dataset `name`, unless already there."""
  if not re.fullmatch('[a-z][a-z0-9_]*', name):  # What TFDS can load back by that name.
    raise ConfigError(f'dataset name {name!r} must be lowercase snake_case (a letter, then '
                      'letters, digits or _), e.g. my_images')
  if name in tfds.list_builders(with_community_datasets=False):
    raise ConfigError(f'{name!r} is a TFDS catalogue name: pick another name '
                      f'for the image folder {root}')
  if not os.path.isdir(root):
    raise ConfigError(f'image folder {root} does not exist: pass --source=ROOT '
                      'with ROOT/<split>/<label>/*.jpg')
  try:
    if tfds.builder(name, data_dir=data_dir).is_prepared():
      return
  except tfds.core.registered.DatasetNotFoundError:
    pass  # Not prepared yet.
  folder = tfds.folder_dataset.ImageFolder(root)
  if not folder.info.splits or not folder.info.splits.total_num_examples:
    raise ConfigError(f'no images in {root}: expected ROOT/<split>/<label>/*.jpg|png')
  raw = {'image': tfds.decode.SkipDecoding()}
  for split in folder.info.splits:
    _check_images_decode(folder.as_dataset(split=split, decoders=raw))
  splits = {
      split: folder.as_dataset(split=split, decoders=raw).map(
          lambda ex: {'image': ex['image'], 'label': ex['label']})
      for split in folder.info.splits
  }
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name,
      version='1.0.0',
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(
              names=folder.info.features['label'].names),
      }),
      split_datasets=splits,
      data_dir=data_dir,
      description=f'Image folder {root}.',
      download_config=_OFFLINE,
  )
