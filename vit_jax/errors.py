"""User-facing errors: one line that names the fix, printed without a traceback."""
import functools
import sys
from typing import Callable


class ConfigError(ValueError):
  """A mistake the user can fix (config, flags, paths); its message names the fix."""


def cli_main(main: Callable) -> Callable:
  """Wraps an absl `main` so a ConfigError exits with one line instead of a traceback."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  return wrapped
