"""Turns data shipped by package registries into TFDS datasets on disk, offline; and prepares
TFDS's catalogue datasets with their own builders where the network (or a manual download) is.

Supported sources:

* `fashion_mnist`: TFDS's own builder, fed the idx files of Debian's
  `dataset-fashion-mnist` (or `--source` DIR holding the same four .gz files)
  instead of URLs, so the result is exactly the catalogue dataset.
* `digits`: scikit-learn's bundled digits via `vit_jax.data.digits`.
* any new NAME with `source=ROOT`: an image folder `ROOT/<split>/<label>/` of JPEG,
  PNG, GIF, BMP or WebP files (those in a label's subfolders count as that label), stored
  as TFDS dataset NAME: JPEG and PNG bytes as they are, the others as PNG of the frame
  training decodes (TFDS's own decoder makes a GIF or WebP 4-D). Afterwards NAME is used
  like any other dataset name; preparing it again from ROOT does nothing, from another
  folder is refused.
* any other TFDS catalogue dataset (cifar10, imagenet2012 with `manual_dir`, ...): its builder
  downloads and prepares it, as `tfds build` would (whose command line in TFDS 4.9 needs
  apache_beam, which the project does not install).
"""
import gzip
import os
import re
import shutil
import tempfile
import urllib.parse

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import host_devices
from vit_jax.data import catalog
from vit_jax.data import digits  # pylint: disable=unused-import  # Registers 'digits'.
from vit_jax.data import input_pipeline
from vit_jax.data import preprocess
from vit_jax.errors import ConfigError, check_not_a_file, first_line, summary

DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
_IDX_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
              't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
_OFFLINE = tfds.download.DownloadConfig(try_download_gcs=False)
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')  # tf.io.decode_image's.
_STORED_AS_IS = ('.jpg', '.jpeg', '.png')  # The others are stored as PNG.


def prepare(name: str, data_dir: str | None = None, source: str | None = None,
            manual_dir: str | None = None) -> str:
  """Prepares dataset `name` under `data_dir`; returns the resolved data_dir."""
  data_dir = catalog.resolve_data_dir(data_dir)
  check_not_a_file(data_dir, 'data_dir')
  if name in catalog.OFFLINE:
    _prepare_offline(tfds.builder(name, data_dir=data_dir), source)
  elif source:
    _prepare_image_folder(name, data_dir, source)
  elif catalog.in_tfds_catalogue(name):
    _prepare_from_the_catalogue(name, data_dir, manual_dir)
  else:
    raise ConfigError(
        f'cannot prepare {name!r} offline: use {" or ".join(catalog.OFFLINE)}, or an '
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


def _prepare_from_the_catalogue(name: str, data_dir: str, manual_dir: str | None) -> None:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (ValueError, AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
    raise ConfigError(f'{name} is not a version or config TFDS has ({first_line(e)}): name '
                      'one it lists, or the dataset alone') from e
  if builder.is_prepared():
    return
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except  # Network, manual files: all one line.
    manual = (' (or reads those downloaded by hand from --manual_dir)'
              if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else '')
    raise ConfigError(
        f'preparing {name} failed ({summary(e)}): its builder downloads '
        f'its files{manual}: run this where they are available, or copy a prepared '
        f'{builder.name} folder into {data_dir}') from e


def _prepare_offline(builder: tfds.core.DatasetBuilder, source: str | None) -> None:
  """Runs the builder of a `catalog.OFFLINE` dataset without network; a prepared dataset needs
  no source files (the Debian package may be gone since)."""
  if builder.name == 'digits' and source:
    raise ConfigError('digits ships with scikit-learn: drop --source')
  if builder.is_prepared():
    return
  if builder.name == 'fashion_mnist':
    _build_fashion_mnist(builder, source or DEBIAN_FASHION_MNIST)
  else:
    builder.download_and_prepare(download_config=_OFFLINE)


def _build_fashion_mnist(builder: tfds.core.DatasetBuilder, source: str) -> None:
  """Runs TFDS's fashion_mnist builder on un-gzipped local idx files."""
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


def _prepare_image_folder(name: str, data_dir: str, root: str) -> None:
  """Stores `root/<split>/<label>/...` as TFDS dataset `name`, unless already there."""
  if not re.fullmatch('[a-z][a-z0-9_]*', name):  # What TFDS can load back by that name.
    raise ConfigError(f'dataset name {name!r} must be lowercase snake_case (a letter, then '
                      'letters, digits or _), e.g. my_images')
  if catalog.in_tfds_catalogue(name):
    raise ConfigError(f'{name!r} is a TFDS catalogue name: pick another name '
                      f'for the image folder {root}')
  prepared_from = _prepared_source(name, data_dir)
  if prepared_from == os.path.abspath(root):
    return
  if prepared_from is not None:
    raise ConfigError(f'{name} in {data_dir} was prepared from {prepared_from}, not {root}: '
                      f'pick another name, or delete {os.path.join(data_dir, name)} to replace it')
  if not os.path.isdir(root):
    raise ConfigError(f'image folder {root} does not exist: pass --source=ROOT '
                      'with ROOT/<split>/<label>/*.jpg')
  labels, examples = _find_images(root)
  _check_images_decode([path for split in examples.values() for path, _ in split])
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name,
      version='1.0.0',
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=labels),
      }),
      split_datasets={split: map(_keyed_example, split_examples)
                      for split, split_examples in examples.items()},
      data_dir=data_dir,
      description=f'Image folder {os.path.abspath(root)}.',  # Read by _prepared_source.
      download_config=_OFFLINE,
  )


def _prepared_source(name: str, data_dir: str) -> str | None:
  """The folder dataset `name` in data_dir was prepared from (its description if that names
  none); None when data_dir holds no such dataset."""
  try:
    description = tfds.builder(name, data_dir=data_dir).info.description
  except tfds.core.registered.DatasetNotFoundError:
    return None
  recorded = re.fullmatch(r'Image folder (.*)\.', description)
  return os.path.abspath(recorded[1]) if recorded else description


# What TFDS's split strings ('val', 'train[:90%]') take as a split's name.
_SPLIT_NAME = re.compile(r'[\w-]+')


def _find_images(root: str) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
  """(labels, {split: [(path, label)]}) of the images in root/<split>/<label>/ and its subfolders.

  Refuses an image outside a label folder, a split or label folder without images, and a single
  label; warns about the other files it leaves out. Hidden files and folders are not read.
  """
  found = {}  # split -> label -> image paths
  left_out = []
  for folder, subfolders, files in os.walk(root, followlinks=True):
    subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith('.'))
    split_and_label = os.path.relpath(folder, root).split(os.sep)
    if folder == root:
      found = {split: {} for split in subfolders}
    elif len(split_and_label) == 1:
      found[split_and_label[0]] = {label: [] for label in subfolders}
    for file in sorted(file for file in files if not file.startswith('.')):
      path = os.path.join(folder, file)
      if not file.lower().endswith(_IMAGE_SUFFIXES):
        left_out.append(path)
      elif folder == root or len(split_and_label) == 1:
        raise ConfigError(f'{path} is not in a label folder: move it to '
                          f'{root}/<split>/<label>/, or delete it')
      else:
        found[split_and_label[0]][split_and_label[1]].append(path)
  if not found:
    raise ConfigError(f'no images in {root}: expected ROOT/<split>/<label>/*.jpg')
  unnamable = [split for split in found if not _SPLIT_NAME.fullmatch(split)]
  if unnamable:
    raise ConfigError(f'{os.path.join(root, unnamable[0])}: a split folder\'s name must be '
                      'letters, digits, _ and - (TFDS cannot read a split of another name): '
                      'rename it (e.g. val, test)')
  empty = [os.path.join(root, split) for split, split_labels in found.items() if not split_labels]
  empty += [os.path.join(root, split, label) for split, split_labels in found.items()
            for label, paths in split_labels.items() if not paths]
  if empty:
    raise ConfigError(f'{empty[0]} holds no images: add some, or delete the folder')
  labels = sorted(set().union(*found.values()))
  if len(labels) < 2:
    raise ConfigError(f'{root} has the one label {labels[0]!r}: a classifier needs two or more '
                      'label folders in ROOT/<split>/')
  if left_out:
    logging.warning('left out %d files of %s that are not %s images, e.g. %s', len(left_out),
                    root, '/'.join(_IMAGE_SUFFIXES), left_out[0])
  return labels, {split: [(path, label) for label, paths in split_labels.items() for path in paths]
                  for split, split_labels in found.items()}


def _check_images_decode(paths: list[str]) -> None:
  """Every file decodes as training will decode it: a bad one would otherwise stop training
  deep inside tf.data, naming no file. Decoded in parallel; the first failure is decoded again
  alone, for its message."""
  # The shape keeps the decode from being pruned; ignore_errors drops the unreadable files.
  decoded = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda path: (path, tf.shape(preprocess.decode(tf.io.read_file(path), 3))),
      num_parallel_calls=host_devices.schedulable_cores(), deterministic=False).ignore_errors()
  # Without the autotuner, whose thread can stall a delete.
  readable = {path.decode() for path, _ in input_pipeline.numpy_iterator(decoded)}
  for path in (path for path in paths if path not in readable):
    try:
      preprocess.decode(tf.io.read_file(path), 3)
    except tf.errors.OpError as e:
      reason = re.sub(r'\{\{.*?\}\}|\[Op:.*', '', e.message).strip()  # TF's op decorations.
      raise ConfigError(f'{path} is not a readable image ({reason}): remove or replace it, '
                        'then prepare again') from e


def _keyed_example(path_and_label: tuple[str, str]) -> tuple[str, dict]:
  """(key, example) to store: JPEG and PNG bytes as they are, other formats as the PNG of what
  training decodes."""
  path, label = path_and_label
  image = (path if path.lower().endswith(_STORED_AS_IS)
           else preprocess.decode(tf.io.read_file(path), 3).numpy())
  return path, {'image': image, 'label': label}
