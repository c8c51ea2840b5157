"""Orbax checkpoints of the train state: async saves, keep-last-K, resume with fallback.

A workdir holds `checkpoints/<step>/{state,meta}`; `meta` is JSON (the step and the config)
so other commands (fine-tune, export, analyze) can rebuild the architecture from it alone.
"""
import functools
import itertools
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store  # orbax's default's, not public.

from vit_jax.checkpoints.orbax_console import (AbandonedShardsDropped, abandoned_reads_dropped,
                                                error_summary)
from vit_jax.errors import ConfigError, RunStopped, nearest_existing


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute: Orbax refuses relative paths; object stores stay as given."""
  return os.path.join(os.path.abspath(workdir) if '://' not in workdir else workdir,
                      'checkpoints')


def _check_writable(directory: str) -> None:
  """A local folder that cannot be written (a read-only mount, another user's) is one line now,
  not a traceback at the first file written, or a failed save after the first steps."""
  if '://' in directory:
    return
  existing = nearest_existing(directory)
  if not os.access(existing, os.W_OK | os.X_OK):
    where = existing if existing == directory else f'{existing} (to hold {directory})'
    raise ConfigError(f'{where} is not writable, so no checkpoint can be saved: pass a --workdir '
                      'you can write to (or make it writable)')


def _check_outside_checkpoints(workdir: str) -> None:
  """A workdir inside another run's checkpoints folder (its step folder named by mistake) would
  be deleted with that step when the other run keeps only its newest checkpoints."""
  if '://' in workdir:
    return
  path = os.path.abspath(workdir)
  while os.path.dirname(path) != path:
    path, name = os.path.dirname(path), os.path.basename(path)
    if (os.path.basename(path) == 'checkpoints' and name.isdigit()
        and os.path.isfile(os.path.join(os.path.dirname(path), 'config.json'))):
      raise ConfigError(f'--workdir {workdir} lies inside the checkpoint of step {name} of the '
                        f'workdir {os.path.dirname(path)}, which may delete it: pass a workdir '
                        'of its own')


@functools.cache  # Once a process: orbax warns of each override (orbax_console hides ours).
def _save_each_array_whole() -> None:
  """One process saves each replicated array whole, not in one slice per device.

  Orbax's replica-parallel saving (its default off GPUs) splits a replicated array so that the
  hosts holding it share the writing. With one host the same process writes every slice, and
  each costs an eager slice op, compiled per shape at the first save: 2 s of the default's first
  save on 2 CPU devices, 9 s of a 30-step ViT-Mu run on 8. The files are read alike either way.
  """
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(), use_replica_parallel=False),
        override=True)


def _retrying_once(read: Callable[[], Any], what: str) -> Any:
  """`read()`, tried a second time after a failure (an object store's transient error)."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('reading %s failed (%s); trying it again', what, error_summary(e))
  return read()


class StateStructureChanged(ConfigError):
  """The checkpoints hold a train state of another structure than the one asked for."""


def _array_names(paths: list[tuple[str, ...]]) -> str:
  """`a/b/c`, or the subtree they share (`averaged_params/... (72 arrays)`), or the first."""
  shared = os.path.commonprefix(paths)
  if len(paths) == 1:
    return '/'.join(paths[0])
  if shared:
    return f'{"/".join(shared)}/... ({len(paths)} arrays)'
  return f'{"/".join(paths[0])} and {len(paths) - 1} more'


def _by_field(paths: Iterable[tuple[str, ...]]) -> str:
  """Paths named per field of the train state, the params first."""
  fields = itertools.groupby(sorted(paths, key=lambda path: (path[0] != 'params', path)),
                             key=lambda path: path[0])
  return ', '.join(_array_names(list(group)) for _, group in fields)


def _structure_differences(saved: dict, here: dict) -> list[str]:
  """What differs between two flat trees of array metadata (tuple paths), in words: arrays of
  another shape, and arrays on one side only."""
  shape = lambda leaf: tuple(getattr(leaf, 'shape', ()))
  reshaped = sorted((key for key in saved.keys() & here.keys()
                     if shape(saved[key]) != shape(here[key])),
                    key=lambda path: (path[0] != 'params', path))
  differences = []
  if reshaped:
    first, count = reshaped[0], len(reshaped)
    differences.append(f'another shape in {count} array{"s" * (count > 1)}, e.g. '
                       f'{"/".join(first)}: {shape(saved[first])} saved, {shape(here[first])} '
                       'here')
  for where, paths in (('only in the checkpoints', saved.keys() - here.keys()),
                       ("only in this config's state", here.keys() - saved.keys())):
    if paths:
      differences.append(f'{where}: {_by_field(paths)}')
  return differences


def no_checkpoint_error(directory: str) -> ConfigError:
  """What readers say of a folder without checkpoints (a .npz is no fix for export); a fine-tune
  workdir (its config.json names an init) is trained by its own command."""
  command = 'vit_jax.finetune' if _fine_tunes(directory) else 'vit_jax.main'
  return ConfigError(f'no checkpoint in {directory} yet: train one there with python -m '
                     f'{command} (a run saves every config.checkpoint_every steps and at its end)')


def _fine_tunes(workdir: str) -> bool:
  try:
    return bool(json.loads((epath.Path(workdir) / 'config.json').read_text()).get('init'))
  except (OSError, ValueError, AttributeError):  # None there, unreadable, or not an object.
    return False


class Checkpointer:
  """A thin policy layer over `ocp.CheckpointManager` (which does the real work); `keep` newest
  checkpoints stay, 0 keeps them all."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if not read_only:
      _check_outside_checkpoints(workdir)
      _check_writable(checkpoint_dir(workdir))
      _save_each_array_whole()
    options = ocp.CheckpointManagerOptions(  # A reader neither keeps nor saves (or orbax warns).
        max_to_keep=None if read_only else keep or None,
        save_interval_steps=0 if read_only else 1, create=not read_only,
        read_only=read_only, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=('state', 'meta'))
    self.read_only = read_only
    self._saving = None  # The step of the save in flight, if any.
    # A failed asynchronous save (a full disk) leaves its other shard writes behind (81
    # tracebacks, as many "Event loop is closed", for the 28 px default) while training goes
    # on; the error itself is raised by the next save or wait, as one line.
    self._writes_filter = None if read_only else AbandonedShardsDropped('writes')

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save (the loop decides when); training goes on meanwhile.

    The previous save is finished first: a failed one (a full disk, a read-only folder) is a
    ConfigError naming that step, and so is a save that cannot start.
    """
    self.wait()
    logging.info('saving the checkpoint of step %d in %s', step, self.manager.directory)
    self._saving = step
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e

  def _save_error(self, error: BaseException) -> ConfigError:
    """One line for a save that failed: which step, orbax's cause, the fix, where to resume."""
    step, self._saving = self._saving, None
    try:
      committed = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      committed = []
    resume = f'step {committed[-1]}' if committed else 'the start (no checkpoint was written)'
    return ConfigError(f'could not write the checkpoint of step {step} in '
                       f'{self.manager.directory} ({error_summary(error)}): free disk space '
                       f'there or make it writable, then rerun to resume from {resume}')

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any of them got the preemption notice (multi-host TPU)."""
    return self.manager.reached_preemption(step)

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Optional[Any], Optional[dict]]:
    """The newest readable checkpoint (state, meta); a corrupt newest one falls back to older.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings, so each array is
    restored straight into its place on the mesh.
    """
    steps = self.all_steps()
    if jax.process_count() > 1:
      self._check_same_steps_everywhere(steps)
    self._check_same_structure(steps, abstract_state)
    unreadable, restored, restored_step, newest_error = [], None, None, ''
    with abandoned_reads_dropped() as reads:
      for step in reversed(steps):
        try:
          restored, restored_step = self._restore_retrying_once(step, abstract_state), step
          break
        except Exception as e:  # pylint: disable=broad-except
          reads.failed = True
          newest_error = newest_error or error_summary(e)
          logging.warning('checkpoint at step %d is unreadable (%s); trying an older one',
                          step, error_summary(e))
          unreadable.append(step)
      if restored is not None and jax.process_count() > 1:
        restored, unreadable = self._oldest_step_everywhere(
            restored, restored_step, unreadable, steps, abstract_state)
    if restored is None:
      if steps:
        # A state of another structure was refused before any read: these are damaged.
        raise ConfigError(f'none of the checkpoints {steps} in {self.manager.directory} could '
                          f'be read (step {steps[-1]}: {newest_error}): they are damaged; copy '
                          'the workdir back from a backup, or move it away to start afresh')
      return None, None
    if unreadable and not self.read_only:
      self._set_aside(unreadable)
    return restored['state'], restored['meta']

  def _check_same_structure(self, steps: list[int], abstract_state: Any) -> None:
    """A state of another structure (a changed model, optimizer or averaging) is one line
    naming the arrays that differ, before any is read: every step would fail alike, each
    after a read, a retry and an "unreadable" warning. Checked on the newest step whose
    metadata reads (a corrupt one is left to the fallback); processes agree on the verdict,
    so that one whose reads failed does not take the fallback alone."""
    differences = []
    for step in reversed(steps):
      try:
        saved = _retrying_once(functools.partial(self.state_metadata, step),
                               f'the tree of the checkpoint at step {step}')
      except Exception:  # pylint: disable=broad-except
        continue
      differences = _structure_differences(
          ocp.tree.to_flat_dict(saved),
          ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True)))
      break
    if jax.process_count() > 1:
      found = np.asarray(multihost_utils.process_allgather(np.int32(bool(differences))))
      if found.any() and not differences:
        differences = [f'as process {int(found.argmax())} read their tree, which this process '
                       'could not: its log names the arrays']
    if differences:
      raise StateStructureChanged(
          f'the checkpoints in {self.manager.directory} hold another train state than this '
          f'config builds ({"; ".join(differences)}): resume with the config they were '
          'written with, or train afresh in another workdir')

  def _check_same_steps_everywhere(self, steps: list[int]) -> None:
    """A process that lists other checkpoints (a workdir not on storage they all share) would
    restore another state, or start afresh, while the others wait for it."""
    listed = np.asarray(multihost_utils.process_allgather(
        np.array([len(steps), steps[-1] if steps else -1], np.int32)))
    if np.any(listed != listed[0]):
      raise ConfigError(f'the processes list different checkpoints in {self.manager.directory} '
                        f'(count, newest step per process: {listed.tolist()}): the workdir '
                        'must be on storage that every process shares')

  def _oldest_step_everywhere(self, restored: dict, step: int, unreadable: list[int],
                              steps: list[int], abstract_state: Any) -> tuple[dict, list[int]]:
    """Processes resume the oldest of the steps they read: a read error on one process only
    must not leave the others on a newer state. All of them restore that step again, as
    orbax's restore ends in a barrier that every process has to reach. The newer steps are
    set aside everywhere, though some processes read them: a step cannot be saved again while
    it is there."""
    everywhere = np.asarray(multihost_utils.process_allgather(np.int32(step)))
    agreed = int(everywhere.min())
    if agreed == int(everywhere.max()):
      return restored, unreadable
    logging.warning('the processes read steps %s as their newest checkpoint: all resume from '
                    'step %d', everywhere.tolist(), agreed)
    return self._restore_retrying_once(agreed, abstract_state), [s for s in steps if s > agreed]

  def _restore_retrying_once(self, step: int, abstract_state: Any) -> dict:
    """A second try before a step counts as unreadable: a transient read error (an object
    store's) must not set aside, or with several processes delete, a good checkpoint."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              meta=ocp.args.JsonRestore())
    return _retrying_once(functools.partial(self.manager.restore, step, args=args),
                          f'the checkpoint at step {step}')

  def _set_aside(self, steps: list[int]) -> None:
    """Gets unreadable steps newer than the restored one out of the way (saving that step
    again would fail): moved into `checkpoints/unreadable/` by a single process, else deleted
    (orbax coordinates that across processes, and it works where a directory cannot move)."""
    directory = epath.Path(self.manager.directory)
    for step in steps:
      if jax.process_count() == 1:
        target = directory / 'unreadable' / f'{step}.{int(time.time())}'
        try:
          target.parent.mkdir(parents=True, exist_ok=True)
          (directory / str(step)).rename(target)
          logging.warning('moved the unreadable checkpoint of step %d to %s', step, target)
          continue
        except Exception as e:  # pylint: disable=broad-except
          logging.warning('could not move the unreadable checkpoint of step %d (%s): deleting '
                          'it', step, error_summary(e))
      self.manager.delete(step)
      logging.warning('deleted the checkpoint of step %d, unreadable here or on another '
                      'process', step)
    self.manager.reload()

  def state_path(self, step: int) -> epath.Path:
    """Where the train state of `step` lies, for readers that take only part of it."""
    return ocp.step.find_step_path(self.manager.directory, ocp.step.standard_name_format(),
                                   step=step) / 'state'

  def state_metadata(self, step: int) -> dict:
    """The tree of the train state of `step`, each array's shape and dtype, none read."""
    with abandoned_reads_dropped(), ocp.PyTreeCheckpointer() as reader:
      metadata = reader.metadata(self.state_path(step))
    if metadata is None or metadata.item_metadata is None:  # An empty or garbled _METADATA.
      raise ValueError('its _METADATA names no arrays')
    return metadata.item_metadata.tree

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """The JSON beside the state (its step and config), without reading any array."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise no_checkpoint_error(str(self.manager.directory))
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    """Until the save in flight is written; a ConfigError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    self._saving = None

  def raise_if_save_failed(self) -> None:
    """A save that ended in the background and failed, as `wait` raises it, found without
    waiting for one still in flight: the loop asks every progress window, so a full disk stops
    the run there rather than at the next save, checkpoint_every steps later."""
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()  # Orbax raises a failed save only once: this closes.
      if self._writes_filter is not None:
        self._writes_filter.remove()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, exc_type, exc_value, traceback) -> None:
    """Also on an error (divergence, Ctrl-C): an async save in flight still lands. A failed save
    found here is raised, unless another error is on its way (then it is logged); a stopped
    run's says its checkpoint is saved, so the failure replaces it."""
    try:
      self.close()
    except ConfigError as e:
      if exc_type is None or issubclass(exc_type, RunStopped):
        raise
      logging.error('%s', e)

