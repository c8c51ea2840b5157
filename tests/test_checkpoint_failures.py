"""Checkpoints that fail: a corrupt or NaN newest checkpoint is skipped (every one damaged is
one line), transient reads are retried, orbax's noise is kept off the console; an unwritable
workdir or a save that fails (a full disk) is one line that keeps the older checkpoints. The
loop's own resume and failures: test_resume.py. Same tiny recipe (training_setup.py).
"""
import asyncio
import gc
import logging
import os
import shutil
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from training_setup import (  # baseline and compile_cache are fixtures: imported, pytest uses them
    REPO, TOTAL_STEPS, assert_states_equal, baseline, cli_env, compile_cache, restore_state,
    tiny_config, write_config_file)
from vit_jax.checkpoints import restore
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.checkpoints.orbax_console import abandoned_reads_dropped
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import loop


# ---- Damaged or unreadable checkpoints --------------------------------------------------


def test_after_a_failed_read_its_abandoned_reads_stay_quiet_until_exit(monkeypatch):
  # Orbax's shard reads left behind by a failed restore may complete after it returned, up to
  # interpreter exit on orbax's closed event loop: the hook was removed if none had yet, and a
  # one-line error was followed by "Event loop is closed" tracebacks (seen under load).
  printed = []
  monkeypatch.setattr(sys, 'unraisablehook', printed.append)
  closed_loop = types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'), object=None)
  yours = types.SimpleNamespace(exc_value=ValueError('not orbax'), object=None)
  with abandoned_reads_dropped():
    pass
  assert sys.unraisablehook == printed.append  # Nothing failed: nothing left behind.
  with pytest.raises(ValueError), abandoned_reads_dropped():
    raise ValueError('OUT_OF_RANGE')  # A read's error leaving the block.
  sys.unraisablehook(closed_loop)
  assert not printed
  monkeypatch.setattr(sys, 'unraisablehook', printed.append)
  with abandoned_reads_dropped() as reads:
    reads.failed = True  # A read's error the caller caught.
  sys.unraisablehook(closed_loop)
  sys.unraisablehook(yours)
  assert printed == [yours]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    baseline, tmp_path, caplog, monkeypatch):
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  data = os.path.join(workdir, 'checkpoints', '30', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):  # Truncate every array file of the newest checkpoint.
    open(os.path.join(data, name), 'w').close()
  printed = []  # What would reach stderr as "Exception ignored ..." tracebacks.
  monkeypatch.setattr(sys, 'unraisablehook', printed.append)
  with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter('always')
    state = restore_state(config, workdir)
    gc.collect()
  assert int(state.step) == 20
  warning, = [r.getMessage() for r in caplog.records if 'step 30 is unreadable' in r.getMessage()]
  assert 'OUT_OF_RANGE' in warning and 'TensorStore(' not in warning  # the cause, on one line
  assert not printed  # orbax's abandoned shard reads (hundreds) are dropped
  assert not [w for w in warned if 'never awaited' in str(w.message)]
  assert_states_equal(state, restore_state(config, base_workdir, step=20))
  # Readers (infer, export, fine-tuning) fall back too, leaving the step where it is: they told
  # the user to remove it.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    pretrained = restore.load(workdir)
  assert pretrained.source == f'workdir {workdir} (step 20)'
  assert f'step 30 in {workdir} is unreadable (ValueError: OUT_OF_RANGE' in caplog.text
  for read, trained in zip(jax.tree.leaves(pretrained.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(read, trained)
  assert os.listdir(data) and sorted(Checkpointer(workdir, read_only=True).all_steps())[-1] == 30
  # Training resumes from 20 and writes step 30 again (the unreadable one is set aside).
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == TOTAL_STEPS
  set_aside = os.listdir(os.path.join(workdir, 'checkpoints', 'unreadable'))
  assert len(set_aside) == 1 and set_aside[0].startswith('30.')
  assert_states_equal(restore_state(config, workdir), restore_state(config, base_workdir))


def test_a_checkpoint_with_nan_params_is_damaged_readers_take_the_one_before(
    baseline, tmp_path, caplog):
  """Bytes overwritten in place read back as numbers; NaN ones were predicted, exported and
  fine-tuned from ("loss is nan at step N: lower base_lr"). Training saves only finite params."""
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  state = restore_state(config, workdir)
  kernel = state.params['head']['kernel'].copy()
  kernel[0, 0] = np.nan
  state = state.replace(params=state.params | {'head': state.params['head'] | {'kernel': kernel}},
                        step=state.step + 10)
  with Checkpointer(workdir, async_save=False) as checkpointer:
    checkpointer.save(40, state, {'step': 40, 'config': config.to_dict()})
  with caplog.at_level(logging.WARNING):
    assert restore.load(workdir).source == f'workdir {workdir} (step 30)'
  assert (f'step 40 in {workdir} is unreadable (ValueError: NaN or infinite values in 1 of its '
          'arrays (e.g. params/head/kernel)') in caplog.text
  with pytest.raises(ConfigError, match=f'^the checkpoint at step 40 in {workdir} holds NaN or '
                     'infinite params, which training never saves: it is damaged; move '
                     f'{workdir}/checkpoints/40 away'):
    loop.train_and_evaluate(tiny_config(config.data_dir, total_steps=50), workdir)


def test_every_checkpoint_damaged_is_one_error_naming_the_fix_and_nothing_moves(
    baseline, tmp_path, caplog):
  """It said to restore the config that wrote them (a changed one is refused before any read),
  after asyncio's tracebacks of the abandoned reads."""
  config, base_workdir, _ = baseline
  workdir = tmp_path / 'run'
  shutil.copytree(base_workdir, workdir)
  for data in (workdir / 'checkpoints').glob('*/state/ocdbt.process_*/d/*'):
    os.truncate(data, 100)
  with caplog.at_level(logging.ERROR, logger='asyncio'), pytest.raises(
      ConfigError, match=r'^none of the checkpoints \[10, 20, 30\] in .* could be read \(step 30: '
      r'ValueError: OUT_OF_RANGE.*\): they are damaged; copy the workdir back from a backup'):
    loop.train_and_evaluate(config, str(workdir))
  gc.collect()
  assert not [r for r in caplog.records if r.name == 'asyncio']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20', '30']


@pytest.mark.parametrize('keep,kept', [(2, [3, 4]), (0, [1, 2, 3, 4])])  # 0 keeps them all.
def test_only_the_newest_keep_checkpoints_stay(tmp_path, keep, kept):
  with Checkpointer(str(tmp_path), keep=keep) as checkpointer:
    for step in range(1, 5):
      checkpointer.save(step, {'w': jax.numpy.full((3,), float(step))}, {'step': step})
  with Checkpointer(str(tmp_path), read_only=True) as checkpointer:
    assert checkpointer.all_steps() == kept
    assert checkpointer.restore_meta() == {'step': 4}


def test_reading_a_checkpoint_logs_no_routine_orbax_warnings(tmp_path, caplog):
  """Orbax's warnings on every read-only open and read looked like corruption to users, and its
  INFO lines drowned the progress lines."""
  state = {'w': jax.numpy.full((3,), 2.0)}
  with Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(1, state, {'step': 1})
  with caplog.at_level(logging.INFO):
    with Checkpointer(str(tmp_path), read_only=True) as checkpointer:
      restored, meta = checkpointer.restore_latest(
          jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                       state))
  assert meta == {'step': 1} and restored['w'].tolist() == [2.0] * 3
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  # Its INFO lines (~80 a save) only at --verbosity=1, where the absl logger takes DEBUG.
  assert not [r for r in caplog.records if 'orbax' in r.pathname]
  absl_logger = logging.getLogger('absl')
  previous = absl_logger.level
  absl_logger.setLevel(logging.DEBUG)
  try:
    with caplog.at_level(logging.INFO):
      with Checkpointer(str(tmp_path)) as checkpointer:
        checkpointer.save(2, state, {'step': 2})
  finally:
    absl_logger.setLevel(previous)
  assert any('orbax' in r.pathname for r in caplog.records)


def test_asyncio_drops_only_the_abandoned_tensorstore_reads(caplog):
  """A restore that failed leaves shard reads behind, whose tasks asyncio logs with a traceback
  each when collected ('Task exception was never retrieved'; seen under load, CI of session 28).
  Those of a TensorStore read error are dropped; any other task's error still shows."""
  async def fail(message):
    raise ValueError(message)

  async def abandon_some():
    for message in ('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database', 'other failure'):
      asyncio.ensure_future(fail(message))
    # A gather of reads (a workdir whose every checkpoint is truncated), and of anything else.
    for message in ('Encountered error while reading array index: (slice(0, 64, 1),)',
                    'other gathered failure'):
      asyncio.gather(fail(message))
    for _ in range(3):
      await asyncio.sleep(0)

  with caplog.at_level(logging.ERROR, logger='asyncio'):
    asyncio.run(abandon_some())
    gc.collect()
  logged = [(r.msg.split()[0], str(r.exc_info[1])) for r in caplog.records if r.name == 'asyncio']
  assert sorted(logged) == [('Task', 'other failure'),
                            ('_GatheringFuture', 'other gathered failure')]


def test_a_transient_read_error_is_retried_not_set_aside(baseline, tmp_path, monkeypatch):
  """An object store's hiccup on the newest checkpoint: read again, restored, nothing moved."""
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  real, failed = ocp.CheckpointManager.restore, []

  def flaky(self, step, *args, **kwargs):
    if not failed:
      failed.append(step)
      raise OSError('503 Service Unavailable')
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', flaky)
  exp = experiment.build(config)
  with Checkpointer(workdir, async_save=False) as checkpointer:
    state, _ = checkpointer.restore_latest(exp.abstract_state)
  assert failed == [30] and int(state.step) == 30
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20', '30']


# ---- Unwritable workdirs and failed saves -----------------------------------------------


def _read_only_prefix(path) -> list[str]:
  """A command prefix that runs its command with `path` read-only: a read-only bind mount in a
  mount namespace of its own when root (whom permissions do not stop), else chmod."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return []
  mount = (f'mount --bind "{path}" "{path}" && mount -o remount,bind,ro "{path}"')
  if subprocess.run(['unshare', '-m', 'sh', '-c', mount], capture_output=True).returncode:
    pytest.skip('root without unshare/mount: no way to make a read-only folder here')
  return ['unshare', '-m', 'sh', '-c', f'{mount} && exec "$0" "$@"']


_READ_ONLY = '''
import os, sys
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.errors import ConfigError, cli_main
try:
  Checkpointer(sys.argv[1])
except ConfigError as e:
  print(f'error: {e}')
cli_main(lambda: os.makedirs(os.path.join(sys.argv[1], 'new')))()  # Exits with one line.
'''


def test_a_read_only_folder_is_one_line_for_the_checkpointer_and_the_commands(tmp_path):
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  proc = subprocess.run(_read_only_prefix(read_only) + [sys.executable, '-c', _READ_ONLY,
                                                        str(read_only)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [
      f'error: {read_only} (to hold {read_only}/checkpoints) is not writable, so no checkpoint '
      'can be saved: pass a --workdir you can write to (or make it writable)']
  assert proc.stderr.splitlines()[-1].startswith('error: permission denied (')
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert not os.listdir(read_only)


@pytest.mark.slow
def test_a_read_only_workdir_is_one_line_before_training(prepared_data_dir, tmp_path):
  """An existing read-only workdir (orbax would fail at the first save) and a new one under a
  read-only folder: one line each, no traceback, before any step."""
  config_file = write_config_file(tiny_config(prepared_data_dir), tmp_path / 'config.py')
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  prefix = _read_only_prefix(read_only)
  cases = {str(read_only): f'error: {read_only} (to hold {read_only}/checkpoints) is not '
                           'writable, so no checkpoint can be saved: pass a --workdir you can',
           str(read_only / 'new'): 'error: permission denied ('}
  for workdir, expected in cases.items():
    proc = subprocess.run(
        prefix + [sys.executable, '-m', 'vit_jax.main', f'--config={config_file}',
                  f'--workdir={workdir}'], cwd=REPO, env=cli_env(), capture_output=True,
        text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    assert 'step 1/' not in proc.stdout
  assert not os.listdir(read_only)


_FAILING_SAVE = '''
import resource, signal, sys, time
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # A write past the limit fails with EFBIG.
import jax
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.errors import ConfigError, RunStopped
state = {f'w{i}': jax.random.normal(jax.random.PRNGKey(i), (64, 1024)) for i in range(8)}
try:
  with Checkpointer(sys.argv[1]) as checkpointer:
    checkpointer.save(1, {'w': jax.numpy.zeros(3)}, {'step': 1})
    checkpointer.wait()
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # "Disk full"
    checkpointer.save(2, state, {'step': 2})  # Fails in the background...
    if sys.argv[2] == 'poll':  # ... and is found by the loop's check at a progress window,
      for _ in range(600):
        checkpointer.raise_if_save_failed()
        time.sleep(0.1)
      print('not raised')
    if sys.argv[2] == 'stop':  # ... or when a stopped run waits for it on its way out,
      raise RunStopped(2, signal.SIGTERM)
    checkpointer.save(3, state, {'step': 3})  # ... or raised here, by waiting for it.
except ConfigError as e:
  print(f'error: {e}')
except RunStopped as e:  # Whose "its checkpoint saved" would be untrue.
  print(f'stopped: {e}')
'''


def test_the_progress_check_never_waits_for_a_save_in_flight(tmp_path, monkeypatch):
  # Asked every progress window: waiting there would make the asynchronous saves synchronous.
  with Checkpointer(str(tmp_path / 'run')) as checkpointer:
    waits = []
    monkeypatch.setattr(checkpointer.manager, 'wait_until_finished', lambda: waits.append(1))
    checkpointer._saving = 10  # pylint: disable=protected-access
    monkeypatch.setattr(checkpointer.manager, 'is_saving_in_progress', lambda: True)
    checkpointer.raise_if_save_failed()
    assert not waits
    monkeypatch.setattr(checkpointer.manager, 'is_saving_in_progress', lambda: False)
    checkpointer.raise_if_save_failed()  # Ended: its outcome is collected (here, a success).
    assert waits == [1] and checkpointer._saving is None  # pylint: disable=protected-access


@pytest.mark.parametrize('found_by', ['next_save', 'poll', 'stop'])
def test_a_failed_asynchronous_save_is_one_line_and_keeps_the_older_checkpoints(tmp_path,
                                                                                found_by):
  """A full disk (here a file size limit) during an async save printed ~1,600 lines: orbax's
  logged tracebacks and one per abandoned shard write, while training went on, then a raw
  traceback. Now: one line naming the step, the cause, the fix and the step to resume from,
  found at the next progress window ('poll'; it was only at the next save), or as a run stopped
  by a signal ends ('stop': it would say the checkpoint is saved)."""
  workdir = str(tmp_path / 'run')
  proc = subprocess.run([sys.executable, '-c', _FAILING_SAVE, workdir, found_by], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  error, = proc.stdout.splitlines()
  assert error.startswith(f'error: could not write the checkpoint of step 2 in {workdir}/'
                          'checkpoints (ValueError: '), error
  assert error.endswith('free disk space there or make it writable, then rerun to resume from '
                        'step 1'), error
  assert 'Traceback' not in proc.stderr and 'Exception ignored' not in proc.stderr, (
      proc.stderr[-3000:])
  with Checkpointer(workdir, read_only=True) as checkpointer:
    assert checkpointer.all_steps() == [1]
    assert checkpointer.restore_meta() == {'step': 1}
