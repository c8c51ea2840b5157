"""Orbax's console output, kept to what a user needs: its routine INFO lines and warnings
hidden, and a failed save or restore left at its one-line error instead of the hundreds of
tracebacks its abandoned shard reads and writes print. Installed on import."""
import contextlib
import gc
import logging
import os
import sys
import warnings
from typing import Any, Iterator

import orbax.checkpoint as ocp

from vit_jax.errors import summary


class _OrbaxConsole(logging.Filter):
  """Orbax's log records, fit for a console:
  - its INFO lines (~80 a save: 320 of the 435 lines of `make train`) only at --verbosity=1;
  - no warning on every read-only open and on every state read (its per-item metadata file,
    which our composite checkpoints do not have): "Metadata file does not exist" read like
    corruption on every export, infer or fine-tune; nor on our own handler for jax.Array
    (manager.py), which replaces orbax's default;
  - a failed save's error lines without their tracebacks (logging.exception from each of its
    threads, ~300 lines, before the error reaches us and becomes one line).
  """
  ROUTINE = ('Given directory is read only', 'Metadata file does not exist: ',
             'Type handler registry type ')
  ORBAX = os.path.dirname(ocp.__file__)

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.pathname.startswith(self.ORBAX):
      return True
    if record.levelno < logging.WARNING:
      return logging.getLogger('absl').isEnabledFor(logging.DEBUG)
    if str(record.msg).startswith(self.ROUTINE):
      return False
    record.exc_info, record.exc_text = None, None
    return True


logging.getLogger('absl').addFilter(_OrbaxConsole())


class _AbandonedReadTasks(logging.Filter):
  """asyncio's "Task (or _GatheringFuture) exception was never retrieved", with a traceback, for
  each of orbax's shard reads (or gathers of them) left behind by a failed restore whose
  TensorStore read failed too: the restore's own error already says what could not be read (a
  truncated checkpoint, run under load; every checkpoint of a workdir truncated)."""
  READ_ERRORS = ('Error reading ', 'Encountered error while reading array index')

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).split('\n', 1)[0].endswith('exception was never retrieved')
                and error is not None and any(e in str(error) for e in self.READ_ERRORS))


logging.getLogger('asyncio').addFilter(_AbandonedReadTasks())


def error_summary(error: BaseException) -> str:
  """Type and first line of the innermost cause: orbax wraps TensorStore's telling error (which
  file, which byte range) in one whose first line ends in an unprintable spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  return summary(error)


# Orbax's per-shard coroutines: when one read or write fails, it leaves the others behind.
_SHARD_COROUTINES = ('_read_array_index_and_device_put', 'write_fragment')


def _from_abandoned_shard(unraisable: Any) -> bool:
  """Orbax's shard read or write left behind, or its completion reaching orbax's closed event
  loop."""
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and code.co_name in _SHARD_COROUTINES:
    return True
  return (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed')


class AbandonedShardsDropped:
  """A `sys.unraisablehook` that drops the tracebacks of orbax's abandoned shard reads or writes
  (and only those) until `remove`; it stays for the rest of the process once it dropped any or
  was told a read `failed`, as shards still in flight complete later (at the latest at exit, on
  orbax's closed event loop)."""

  def __init__(self, what: str):
    self.what, self.previous, self.dropped = what, sys.unraisablehook, 0
    self.failed = False
    sys.unraisablehook = self

  def __call__(self, unraisable: Any) -> None:
    if _from_abandoned_shard(unraisable):
      self.dropped += 1
    else:
      self.previous(unraisable)

  def remove(self) -> None:
    gc.collect()  # Abandoned coroutines collected now report here, not after removal.
    if self.dropped:
      logging.info('dropped %d tracebacks of abandoned checkpoint %s (and any later ones)',
                   self.dropped, self.what)
    elif not self.failed and sys.unraisablehook is self:
      sys.unraisablehook = self.previous


@contextlib.contextmanager
def abandoned_reads_dropped() -> Iterator[AbandonedShardsDropped]:
  """Keeps a failed restore to its one-line message. A read that fails inside either leaves the
  block or is caught by the caller, which then sets `failed` on the hook this yields: either way
  the hook stays for the rest of the process.

  When one array of a checkpoint cannot be read, orbax raises and leaves its other shard reads
  behind: each then prints a traceback as it completes on orbax's closed event loop or is
  collected (470-590 of them, 18k lines, for one truncated checkpoint of the embedded default),
  or a warning if it never started.
  """
  hook = AbandonedShardsDropped('reads')
  with warnings.catch_warnings():  # The reads that never started warn instead.
    warnings.filterwarnings('ignore', "coroutine '_read_array_index_and_device_put' was never",
                            RuntimeWarning)
    try:
      yield hook
    except BaseException:
      hook.failed = True
      raise
    finally:
      hook.remove()
