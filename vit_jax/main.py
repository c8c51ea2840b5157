"""Pre-train a ViT: `python -m vit_jax.main --config=configs/default.py --workdir=DIR`.

Override any config key with `--config.key=value`; a config file may take an argument, as in
`--config=configs/vit_b16.py:imagenet21k`. Rerunning with the same workdir resumes.
"""
import logging

from absl import flags
from ml_collections import config_flags

from vit_jax.errors import check_no_arguments, run_cli
from vit_jax.training import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go (gs:// ok).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  check_no_arguments(argv)
  distributed.initialize_from_flags()
  # Imported once the flags are checked: TensorFlow (~6 s to load on 2 cores) is not needed to
  # report a mistaken flag or config key.
  from vit_jax.training import loop  # pylint: disable=g-import-not-at-top
  result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('final: %s', result)


if __name__ == '__main__':
  run_cli(main)
