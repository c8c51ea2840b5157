"""Export a workdir's newest params as a `.npz` in the released layout (float32, '/' keys).

  python -m vit_jax.export --workdir=DIR --output=FILE.npz

The file loads in the released vision_transformer code and back here (`--config.init=FILE.npz`
with the model named), bit-exact, whichever layout (scanned or unrolled) the run trained in.
"""
import logging
import os

from absl import app
from absl import flags

from vit_jax.checkpoints import npz
from vit_jax.checkpoints import restore
from vit_jax.errors import ConfigError, run_cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (its newest checkpoint).')
_OUTPUT = flags.DEFINE_string('output', None, 'The .npz file to write.')
flags.mark_flags_as_required(['workdir', 'output'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.INFO)
  if not restore.is_npz(_OUTPUT.value):
    raise ConfigError(f'--output={_OUTPUT.value} must end in .npz')
  if restore.is_npz(_WORKDIR.value):
    raise ConfigError(f'--workdir={_WORKDIR.value} is already a .npz: pass a training workdir')
  if '://' not in _WORKDIR.value and not os.path.isdir(_WORKDIR.value):
    raise ConfigError(f'--workdir={_WORKDIR.value} is not a directory: pass the training workdir')
  pretrained = restore.load(_WORKDIR.value)
  npz.save_npz(pretrained.params, _OUTPUT.value)
  overrides = f' with model_overrides {pretrained.model_overrides}' if (
      pretrained.model_overrides) else ''
  print(f'wrote {_OUTPUT.value}: {pretrained.model}{overrides} from {pretrained.source}')


if __name__ == '__main__':
  run_cli(main)
