r"""Prepares datasets offline and shows what the pipeline will see.

  python -m vit_jax.datasets prepare fashion_mnist [--data_dir=DIR]
  python -m vit_jax.datasets prepare digits [--data_dir=DIR]
  python -m vit_jax.datasets prepare NAME --source=ROOT [--data_dir=DIR]  # ROOT/<split>/<label>/
  python -m vit_jax.datasets prepare cifar10 [--data_dir=DIR]  # Any TFDS catalogue dataset:
  python -m vit_jax.datasets prepare imagenet2012 --manual_dir=M [--data_dir=DIR]  # network or M
  python -m vit_jax.datasets info NAME [--split=train] [--data_dir=DIR]

`prepare` then describes every split it prepared; `info` describes --split.

DIR defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets. The results are
plain TFDS datasets: `tfds.load(NAME, data_dir=DIR)` reads them in any program,
and configs name them like catalogue datasets (an image folder by its NAME).
Other catalogue datasets (cifar10, imagenet2012, ...) are prepared by TFDS's own
builders, which download their files (imagenet2012 reads its own from --manual_dir),
so where the network is; `tfds build` does the same given apache_beam.

An image folder holds JPEG, PNG, GIF, BMP or WebP files, two or more labels, and no empty
folders; NAME remembers its ROOT (`vit_jax.data.prepare`).
"""

from absl import flags
from absl import logging as absl_logging

from vit_jax.data import catalog
from vit_jax.data import input_pipeline
from vit_jax.data import prepare
from vit_jax.errors import ConfigError, run_cli

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
_SOURCE = flags.DEFINE_string(
    'source', None, 'fashion_mnist: folder with the idx .gz files; '
    'other NAME: image folder ROOT/<split>/<label>/*.jpg|png|gif|bmp|webp.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'A TFDS catalogue dataset downloaded by hand (imagenet2012): its files.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split that `info` describes.')


def main(argv: list[str]) -> None:
  absl_logging.get_absl_logger().addFilter(catalog.not_tfds_chatter)
  if len(argv) != 3 or argv[1] not in ('prepare', 'info'):
    raise ConfigError('usage: python -m vit_jax.datasets prepare NAME [--source=ROOT] '
                      '[--manual_dir=DIR] [--data_dir=DIR], or info NAME [--split=SPLIT] '
                      '[--data_dir=DIR]')
  command, name = argv[1:]
  if command == 'prepare':
    data_dir = prepare.prepare(name, _DATA_DIR.value, _SOURCE.value, _MANUAL_DIR.value)
    print(f'prepared {name} in {data_dir}')
    splits = list(catalog.load_builder(name, data_dir).info.splits)  # An image folder's own.
  else:
    data_dir, splits = _DATA_DIR.value, [_SPLIT.value]
  for split in splits:
    print(f'{name}[{split}]: {input_pipeline.get_info(name, split, data_dir)}')


if __name__ == '__main__':
  run_cli(main)
