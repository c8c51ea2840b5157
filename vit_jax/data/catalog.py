"""Finds a prepared TFDS dataset by name, or says in one line how to prepare it.

Reading never downloads: a dataset not prepared in data_dir is a ConfigError
naming the command that prepares it.
"""
import contextlib
import difflib
import logging
import os
from typing import Iterator

import tensorflow_datasets as tfds

from vit_jax.data import digits  # pylint: disable=unused-import  # Registers 'digits'.
from vit_jax.errors import ConfigError

OFFLINE = ('fashion_mnist', 'digits')  # What `vit_jax.datasets prepare` makes without --source.


def resolve_data_dir(data_dir: str | None) -> str:
  """The directory TFDS uses: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(
      data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def how_to_prepare(name: str, data_dir: str) -> str:
  """The command that prepares `name` in `data_dir` (after a close name it may be a typo of)."""
  base = _base(name)
  if base in OFFLINE:
    return f'run `python -m vit_jax.datasets prepare {base} --data_dir={data_dir}`'
  if in_tfds_catalogue(name):
    return (f'run `python -m vit_jax.datasets prepare {name} --data_dir={data_dir}` where the '
            'network (or its manual download, --manual_dir) is available')
  catalogue = tfds.list_builders(with_community_datasets=False)
  image_folder = (f'for an image folder ROOT/<split>/<label>/*.jpg run `python -m '
                  f'vit_jax.datasets prepare {base} --source=ROOT --data_dir={data_dir}`')
  # A high cutoff: at difflib's default 0.6, 'birds' would be taken for 'iris'. The image folder
  # advice stays: the recipes' image folder imagenet21k is close to imagenet2012.
  close = difflib.get_close_matches(base, catalogue + _prepared_names(data_dir), n=1, cutoff=0.8)
  return f'did you mean {close[0]!r}? Else, {image_folder}' if close else image_folder


def _base(name: str) -> str:
  """'cifar10' of 'cifar10:3.0.2' or 'imagenet2012/subset'."""
  return name.split('/')[0].split(':')[0]


def in_tfds_catalogue(name: str) -> bool:
  """Whether TFDS's own builders prepare `name` (not those `OFFLINE`, prepared here)."""
  base = _base(name)
  return base not in OFFLINE and base in tfds.list_builders(with_community_datasets=False)


def not_tfds_chatter(record: logging.LogRecord) -> bool:
  """A log filter dropping TFDS's INFO and WARNING lines: they tell of its probing (e.g. that a
  version folder a failed preparation left has no dataset_info.json), not of the user's data,
  before our one-line error."""
  return record.levelno >= logging.ERROR or '/tensorflow_datasets/' not in record.pathname


@contextlib.contextmanager
def _tfds_probing_quiet() -> Iterator[None]:
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(not_tfds_chatter)
  try:
    yield
  finally:
    absl_logger.removeFilter(not_tfds_chatter)


def load_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of a dataset prepared in `data_dir`; ConfigError otherwise."""
  data_dir = resolve_data_dir(data_dir)
  try:
    with _tfds_probing_quiet():
      builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise ConfigError(
        f'unknown dataset {name!r} (not in the TFDS catalogue nor prepared in '
        f'{data_dir}): {how_to_prepare(name, data_dir)}') from e
  except AssertionError as e:  # TFDS's way of refusing a version its builder does not know.
    unversioned = name.split(':')[0]
    raise ConfigError(
        f'{name!r} names a version that cannot be loaded: {data_dir} holds {unversioned} '
        f'versions {_prepared_versions(unversioned, data_dir)}; use one or drop the version') from e
  with _tfds_probing_quiet():
    prepared = builder.is_prepared()
  if not prepared:
    raise ConfigError(f'dataset {name!r} is not prepared in {data_dir}: '
                      f'{how_to_prepare(name, data_dir)}')
  return builder


def _prepared_versions(unversioned: str, data_dir: str) -> list[str]:
  """Versions of dataset `unversioned` ('name' or 'name/config') with a folder in data_dir."""
  folder = os.path.join(data_dir, unversioned)
  if not os.path.isdir(folder):
    return []
  return sorted(entry for entry in os.listdir(folder) if tfds.core.Version.is_valid(entry))


def _prepared_names(data_dir: str) -> list[str]:
  """Datasets with a prepared version in data_dir (image folders have no catalogue entry)."""
  if not os.path.isdir(data_dir):
    return []
  return [entry for entry in os.listdir(data_dir) if _prepared_versions(entry, data_dir)]
