r"""Fine-tune a pre-trained ViT on a downstream dataset, with the paper's transfer recipe.

  python -m vit_jax.finetune --config=configs/finetune/cifar10.py --workdir=DIR \
      --config.init=PATH [--config.model=ViT-B_16] [--config.key=value ...]

PATH is a pre-training workdir (its newest checkpoint; the architecture comes from the config
saved with it), a `.npz` in the released layout (the architecture is --config.model) or a timm
ViT's `.safetensors` (--config.model, or the one timm's config.json beside it names). The head is
replaced by a zero one for the new classes and the position embeddings are resized to the new
resolution. Rerunning with the same workdir resumes the fine-tuning run.
"""
import logging

from absl import flags
from ml_collections import config_flags

from vit_jax.errors import check_no_arguments, run_cli
from vit_jax.training import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Fine-tuning config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go (gs:// ok).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  check_no_arguments(argv)
  distributed.initialize_from_flags()
  # Imported once the flags are checked, as vit_jax.main's loop is: TensorFlow is not needed
  # to report a mistaken flag or config key.
  from vit_jax.training import finetune  # pylint: disable=g-import-not-at-top
  result = finetune.finetune(_CONFIG.value, _WORKDIR.value)
  logging.info('final: %s', result)


if __name__ == '__main__':
  run_cli(main)
