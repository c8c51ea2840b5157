"""Export a workdir's newest params as a `.npz` in the released layout (float32, '/' keys).

  python -m vit_jax.export --workdir=DIR --output=FILE.npz [--overwrite]

The file loads in the released vision_transformer code and back here (`--config.init=FILE.npz`
with the model named), bit-exact, whichever layout (scanned or unrolled) the run trained in.
"""
import os

from absl import flags

from vit_jax.checkpoints import is_npz
from vit_jax.errors import (ConfigError, check_no_arguments, nearest_existing,
                            quiet_unless_verbose, run_cli)

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (its newest checkpoint).')
_OUTPUT = flags.DEFINE_string('output', None, 'The .npz file to write.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --output file.')
flags.mark_flags_as_required(['workdir', 'output'])


def _check_output(path: str) -> None:
  """A local --output that cannot be written is one line before anything is read."""
  if '://' in path:
    return
  if os.path.isdir(path):
    raise ConfigError(f'--output={path} is a directory: name a .npz file (e.g. {path}/params.npz)')
  if os.path.isfile(path) and not _OVERWRITE.value:  # A released checkpoint, a run's init.
    raise ConfigError(f'--output={path} exists: pass another path, or --overwrite to replace it')
  existing = nearest_existing(os.path.dirname(os.path.abspath(path)))
  if not os.path.isdir(existing):
    raise ConfigError(f'--output={path} is inside {existing}, which is a file: pass another path')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'--output={path}: {existing} is not writable: pass a path you can write to')


def main(argv: list[str]) -> None:
  check_no_arguments(argv)
  quiet_unless_verbose()  # Its result is the line it prints.
  if not is_npz(_OUTPUT.value):
    raise ConfigError(f'--output={_OUTPUT.value} must end in .npz')
  if is_npz(_WORKDIR.value):
    raise ConfigError(f'--workdir={_WORKDIR.value} is already a .npz: pass a training workdir')
  if '://' not in _WORKDIR.value and not os.path.isdir(_WORKDIR.value):
    raise ConfigError(f'--workdir={_WORKDIR.value} is not a directory: pass the training workdir')
  _check_output(_OUTPUT.value)  # Before the checkpoint is read.
  # Imported once the flags are checked: TensorFlow (~6 s to load on 2 cores) is not needed to
  # report a mistaken one.
  # pylint: disable=g-import-not-at-top
  from vit_jax import models
  from vit_jax.checkpoints import npz
  from vit_jax.checkpoints import restore
  # pylint: enable=g-import-not-at-top
  pretrained = restore.load(_WORKDIR.value)
  try:
    npz.save_npz(pretrained.params, _OUTPUT.value)
  except OSError as e:
    raise ConfigError(f'could not write --output={_OUTPUT.value} ({type(e).__name__}: {e}): '
                      'pass a path you can write to') from e
  # How it computes (scan, remat, ...) is not in the file, which is unrolled.
  options = {k: v for k, v in pretrained.model_overrides.items() if k not in models.COMPUTE_OPTIONS}
  overrides = f' with model_overrides {options}' if options else ''
  print(f'wrote {_OUTPUT.value}: {pretrained.model}{overrides} from {pretrained.source}')
  image_size, sizes = pretrained.image_size, pretrained.posemb_image_sizes()
  if not sizes or sizes[-1] != image_size:  # Readers take the largest size the posemb fits.
    print(f'it was trained at {image_size} px, which a .npz does not tell: pass '
          f'--image_size={image_size} to infer, analyze and fewshot')


if __name__ == '__main__':
  run_cli(main)
