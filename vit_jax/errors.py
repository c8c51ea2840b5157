"""User-facing errors: one line that names the fix, printed without a traceback."""
import errno
import functools
import os
import re
import signal
import sys
from typing import Callable, NoReturn, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags import config_flags


# What timm, big_vision and other trainers call our config keys (ml_collections' own guess
# can be far off: num_steps -> accum_steps).
KEYS_ELSEWHERE = {
    'lr': 'base_lr', 'learning_rate': 'base_lr', 'wd': 'weight_decay',
    'batch_size': 'batch', 'steps': 'total_steps', 'num_steps': 'total_steps',
    'num_train_steps': 'total_steps', 'max_steps': 'total_steps',
    'epochs': 'total_steps (steps, not epochs)', 'num_epochs': 'total_steps (steps, not epochs)',
    'warmup': 'warmup_steps', 'num_warmup_steps': 'warmup_steps', 'warmup_epochs': 'warmup_steps',
    'grad_clip': 'grad_norm_clip', 'clip_grad': 'grad_norm_clip', 'opt': 'optimizer',
    'input_size': 'image_size', 'img_size': 'image_size', 'res': 'image_size',
    'ema': 'polyak_decay', 'ema_decay': 'polyak_decay', 'model_ema_decay': 'polyak_decay',
}


class ConfigError(ValueError):
  """A mistake the user can fix (config, flags, paths); its message names the fix."""


class TrainingDiverged(ConfigError):
  """NaN or inf in the loss, the params or their features; the last good checkpoint is kept."""


class RunStopped(Exception):
  """A stop signal or preemption notice ended a run before its last step, after saving it.

  The command-line tools exit 128 + the signal's number (by SIGINT itself for Ctrl-C), as a
  process the signal ended would: a scheduler, `until ...; do :; done` or `make` then reads the
  run as unfinished, not done.
  """

  def __init__(self, step: int, signum: Optional[int]):
    """`signum` None: the notice came through JAX's preemption service (multi-host), which
    turns a SIGTERM to any process into one step at which all stop."""
    self.step, self.signum = step, signum or signal.SIGTERM
    cause = ('a preemption notice' if signum is None else
             'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name)
    super().__init__(f'stopped at step {step} on {cause}, its checkpoint saved: rerun the same '
                     'command to resume')


def first_line(error: BaseException) -> str:
  """What a one-line error quotes of a library's multi-line one: its first line (a trailing
  colon that introduced the rest dropped), or the error's type when it says nothing."""
  lines = str(error).strip().splitlines()
  return lines[0].rstrip(':') if lines else type(error).__name__


def summary(error: BaseException) -> str:
  """`Type: first line`, for causes whose type tells as much as their text."""
  name = type(error).__name__
  return f'{name}: {first_line(error)}' if str(error).strip() else name


def check_not_a_file(path: str, what: str) -> None:
  """A directory argument naming an existing file, or a path below one: one line before
  anything is written, not FileExistsError or NotADirectoryError from deep inside a makedirs."""
  if '://' in str(path):
    return
  existing = nearest_existing(path)
  if os.path.isfile(existing):
    inside = '' if existing == os.path.abspath(path) else f' is inside {existing}, which'
    raise ConfigError(f'{what} {path}{inside} is a file: pass a directory (made if missing)')


def check_no_arguments(argv: list[str]) -> None:
  """A command that takes only flags: a stray word (`bench eval`) is one line, not absl's help."""
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments {argv[1:]}: flags take the form --name=value')


def quiet_unless_verbose() -> None:
  """For the commands whose stdout is their result: only warnings on stderr (not TFDS's or jax's
  INFO lines), unless --verbosity is given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def nearest_existing(path: str) -> str:
  """`path` or its nearest existing parent: the folder whose permissions decide whether `path`
  can be made."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def exit_with(message: str) -> NoReturn:
  """The one-line exit of every command's user error: `error: message` on stderr, status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _stop_as_signalled(message: str, signum: int) -> NoReturn:
  """Exits 128 + `signum`, after `message`, without a traceback. For Ctrl-C the process ends by
  SIGINT itself, as Python's own exit on Ctrl-C does: a shell running it in a script or loop
  stops there too (bash carries on after a child that exits 130 of its own accord)."""
  print(message, file=sys.stderr, flush=True)
  if signum != signal.SIGINT:
    sys.exit(128 + signum)
  logging.flush()
  sys.stdout.flush()
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  os.kill(os.getpid(), signal.SIGINT)
  sys.exit(128 + signum)  # Reached only where SIGINT is blocked.


def _is_permission_error(error: BaseException) -> bool:
  """Python's or TensorFlow's (tf.io.gfile, by name: TensorFlow is not imported here) error for
  a path this user may not write (or read): a read-only mount, another user's folder."""
  if isinstance(error, OSError):
    return error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
  return type(error).__name__ == 'PermissionDeniedError'


def _is_disk_full(error: BaseException) -> bool:
  """Python's, TensorFlow's (tf.io.gfile) or XLA's (the profiler's trace) error for a write to
  a full disk, the latter two by name."""
  if isinstance(error, OSError):
    return error.errno == errno.ENOSPC
  return (type(error).__name__ in ('ResourceExhaustedError', 'JaxRuntimeError', 'XlaRuntimeError')
          and 'No space left' in str(error))


def _is_out_of_memory(error: BaseException) -> bool:
  """XLA's error for buffers larger than the device (by name: jax is not imported here)."""
  return (type(error).__name__ in ('JaxRuntimeError', 'XlaRuntimeError')
          and str(error).startswith('RESOURCE_EXHAUSTED') and not _is_disk_full(error))


def cli_main(main: Callable) -> Callable:
  """Wraps an absl `main` so a ConfigError, a path without permission, a full disk, a damaged
  dataset file, or a batch too large for the device exits with one line instead of a
  traceback; so do a run stopped by a signal and a Ctrl-C (exit 128 + the signal)."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except ConfigError as e:
      exit_with(str(e))
    except RunStopped as e:
      _stop_as_signalled(str(e), e.signum)
    except KeyboardInterrupt:  # A second Ctrl-C in training; the first anywhere else.
      _stop_as_signalled('interrupted (Ctrl-C)', signal.SIGINT)
    except Exception as e:  # pylint: disable=broad-except
      if _is_out_of_memory(e):
        exit_with(f'out of memory ({first_line(e)}): lower the batch (--config.batch '
                  "or --config.batch_eval; infer's --batch_size, fewshot's --batch); python -m "
                  'vit_jax.plan tells what fits a device')
      if type(e).__name__ == 'DataLossError':  # TensorFlow's, for a record cut short or corrupt.
        reason = re.sub(r'^\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$', '', first_line(e))
        exit_with(f'a dataset file is damaged ({reason}): prepare the dataset again '
                  '(delete its folder in the data_dir; python -m vit_jax.datasets prepare NAME, '
                  'or tfds build NAME), then run again (a training run resumes)')
      if _is_disk_full(e):
        exit_with(f'no space left on the device ({first_line(e)}): free disk space, or pass '
                  'another path, then run again (a training run resumes)')
      if not _is_permission_error(e):
        raise
      exit_with(f'permission denied ({type(e).__name__}: {e}): pass a path you can write to, '
                'or change its permissions')

  return wrapped


def _flag_error_line(error: BaseException) -> str:
  """The one line of a flag-parsing failure: our own ConfigError's if a config file raised one."""
  innermost, cause = None, error
  while cause is not None:  # config_flags re-raises a config file's error with its traceback
    if isinstance(cause, ConfigError):
      innermost = cause
    cause = cause.__cause__ or cause.__context__
  if innermost is not None:
    return str(innermost)
  if isinstance(error, (AttributeError, KeyError)):  # `--config.key=...` for a key not in the file
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', str(error))
    key = suggestion[2] if suggestion else str(error).strip('\'"')
    ours = KEYS_ELSEWHERE.get(key.split('.')[-1])
    if ours:
      return f'unknown config key {key!r}: here it is --config.{ours}'
    if suggestion:
      return f'unknown config key {key!r}: did you mean {suggestion[1]!r}?'
    return f'unknown config key {key!r}: a new key belongs in the config file\'s get_config()'
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if len(lines) == 1 else f'{lines[0]} ... {lines[-1]}'


def _check_config_files_loaded() -> None:
  """config_flags defers a missing config file's error to first use; raise it here instead."""
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser) and flag.value is not None:
      try:
        flag.value.keys()
      except OSError:
        exit_with(f'--{name}={flag.serialize().split("=", 1)[-1]}: no such config file '
                  '(paths are relative to the current folder, e.g. configs/default.py)')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-file and flag mistakes reported in one line."""
  try:
    remaining = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    exit_with(_flag_error_line(e))
  _check_config_files_loaded()
  return remaining


def run_cli(main: Callable) -> None:
  """`app.run` for the command-line tools: one-line errors from flags and from `main`."""
  app.run(cli_main(main), flags_parser=parse_flags)
