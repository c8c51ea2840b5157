"""Resume and failures of the training loop: after a crash, a SIGKILL or a SIGTERM the run ends
bitwise equal to an uninterrupted one; NaN/Inf stops the run keeping only finite checkpoints; a
failed evaluation or a stop signal costs no trained step (a changed config:
test_resume_changes.py; damaged checkpoints and failed saves: test_checkpoint_failures.py). Same
tiny recipe as test_training.py (training_setup.py).
"""
import glob
import logging
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from training_setup import (  # baseline and compile_cache are fixtures: imported, pytest uses them
    TOTAL_STEPS, MainProcess, assert_states_equal, baseline, compile_cache, restore_state,
    tiny_config, write_config_file)
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError, RunStopped
from vit_jax.training import loop
from vit_jax.training import metrics as metrics_lib
from vit_jax.training import profiling


# ---- Resume -----------------------------------------------------------------------------


class _Crash(Exception):
  """Stands in for a process dying mid-run."""


def test_resume_after_a_crash_is_bitwise_identical(baseline, monkeypatch, tmp_path):
  """Crash at step ~14 (checkpoint 10 written), rerun: the state at 30 equals the baseline's."""
  config, base_workdir, _ = baseline
  real = input_pipeline.make_train_iterator

  def crashing(**kwargs):
    def gen():
      for i, batch in enumerate(real(**kwargs)):
        if i == 16:  # Read (2 ahead) when step 15 asks for its batch: 14 steps done.
          raise _Crash('simulated crash')
        yield batch
    return gen()

  workdir = str(tmp_path / 'run')
  monkeypatch.setattr(input_pipeline, 'make_train_iterator', crashing)
  with pytest.raises(_Crash):
    loop.train_and_evaluate(config, workdir)
  monkeypatch.setattr(input_pipeline, 'make_train_iterator', real)
  checkpoint_10 = os.path.join(workdir, 'checkpoints', '10')
  deadline = time.time() + 60  # The async save of step 10 commits in the background.
  while not os.path.exists(os.path.join(checkpoint_10, 'commit_success.txt')):
    assert time.time() < deadline, os.listdir(os.path.dirname(checkpoint_10))
    time.sleep(0.2)
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == TOTAL_STEPS
  assert_states_equal(restore_state(config, workdir), restore_state(config, base_workdir))
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  base_rows = metrics_lib.read_jsonl(os.path.join(base_workdir, 'metrics.jsonl'))
  # The rerun's progress windows 11-15 (its first: the compiling step counts too), 16-20,
  # 21-25, 26-30 are the baseline's: the same mean losses and learning rates.
  at = lambda rs, key: {r['step']: r[key] for r in rs if key in r}
  for key in ('train/loss', 'train/learning_rate'):
    for step in (15, 20, 25, 30):
      assert at(rows, key)[step] == at(base_rows, key)[step], (key, step)


def test_one_process_saves_each_replicated_array_whole(monkeypatch, tmp_path):
  """Orbax's replica-parallel saving cut each replicated array into one slice per device (8
  eager slice ops here, each compiled at the first save) though one process wrote them all."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {'kernel': jax.device_put(jnp.arange(64.0).reshape(8, 8), replicated)}
  slices, slice_in_dim = [], jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, 'slice_in_dim',
                      lambda *args, **kwargs: slices.append(args) or slice_in_dim(*args, **kwargs))
  with Checkpointer(str(tmp_path)) as checkpointer:
    checkpointer.save(1, state, {'step': 1})
  assert len(jax.devices()) == 8 and not slices
  with Checkpointer(str(tmp_path), read_only=True) as reader:
    restored, meta = reader.restore_latest(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  assert meta == {'step': 1} and restored['kernel'].sharding == replicated
  np.testing.assert_array_equal(restored['kernel'], state['kernel'])


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(baseline, compile_cache, tmp_path):
  """The real thing: `python -m vit_jax.main` SIGKILLed after a checkpoint, then rerun."""
  config, base_workdir, _ = baseline
  config = config.copy_and_resolve_references()
  config.progress_every = 1  # A line per step, and a checkpoint per step (each waits for the
  config.checkpoint_every = 1  # previous save): slow enough for the kill to land mid-run,
  config.keep_checkpoints = 100  # quite likely while a save is being written.
  config_file = write_config_file(config, tmp_path / 'config.py')
  workdir = str(tmp_path / 'run')
  main = MainProcess(config_file, workdir, compile_cache)
  try:
    main.wait_for_step(8)
    main.proc.send_signal(signal.SIGKILL)
  finally:
    returncode = main.finish(60)
  assert returncode == -signal.SIGKILL, main.err()[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert steps and max(steps) < TOTAL_STEPS, steps  # Killed mid-run, after a save.
  listing = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  rerun = MainProcess(config_file, workdir, compile_cache)
  assert rerun.finish(600) == 0, rerun.err()[-3000:]
  resumed = int(re.search(r'resumed from the checkpoint at step (\d+)', rerun.err())[1])
  assert 0 < resumed <= max(steps) and 'Traceback' not in rerun.err()
  assert_states_equal(restore_state(config, workdir), restore_state(config, base_workdir),
                       f'(killed with {listing}, resumed from {resumed})')


def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_128_plus_the_signal(
    prepared_data_dir, compile_cache, tmp_path):
  """It exited 0, as a finished run does: a scheduler or a retry loop took it as done."""
  config = tiny_config(prepared_data_dir, total_steps=5000, checkpoint_every=1000, progress_every=1,
                   eval_every=0)
  config_file = write_config_file(config, tmp_path / 'config.py')
  workdir = str(tmp_path / 'run')
  runs = []
  # The second run, stopped by Ctrl-C, resumes from the first one's checkpoint.
  for signum, logged, cause in ((signal.SIGTERM, 'SIGTERM received', 'SIGTERM'),
                                (signal.SIGINT, 'Ctrl-C: saving', 'Ctrl-C')):
    main = MainProcess(config_file, workdir, compile_cache)
    try:
      first = main.wait_for_step(3)
      main.proc.send_signal(signum)
    finally:
      returncode = main.finish(120)
    # 143 after SIGTERM; after Ctrl-C, ended by SIGINT (a shell's 130) as Python ends itself.
    assert returncode == (-signum if signum == signal.SIGINT else 128 + signum), main.err()[-3000:]
    assert 'Traceback' not in main.err()
    assert logged in main.err()
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                   if s.isdigit())
    assert main.err().rstrip().splitlines()[-1] == (
        f'stopped at step {steps[-1]} on {cause}, its checkpoint saved: rerun the same command '
        'to resume')
    runs.append((first, steps, main.err()))
  (first_a, steps_a, _), (first_b, steps_b, stderr_b) = runs
  # Saved at the step it stopped at (after the one it was seen at; not a checkpoint_every one).
  assert len(steps_a) == 1 and first_a <= steps_a[0] < 1000, (first_a, steps_a)
  assert f'resumed from the checkpoint at step {steps_a[0]}' in stderr_b
  assert first_b > steps_a[0]
  assert steps_b[0] == steps_a[0] and steps_b[-1] > steps_a[0]
  state = restore_state(config, workdir)
  assert int(state.step) == steps_b[-1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_a_second_ctrl_c_stops_at_once_in_one_line(prepared_data_dir, compile_cache, tmp_path):
  """It was a KeyboardInterrupt traceback from wherever the run was (compiling, saving)."""
  config = tiny_config(prepared_data_dir, total_steps=5000, checkpoint_every=1000, progress_every=1,
                       eval_every=0)
  main = MainProcess(write_config_file(config, tmp_path / 'config.py'), str(tmp_path / 'run'),
                     compile_cache)
  try:
    main.wait_for_step(3)
    main.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while 'Ctrl-C: saving' not in main.err() and time.monotonic() < deadline:
      time.sleep(0.01)
    main.proc.send_signal(signal.SIGINT)  # While it saves (or, on a fast machine, exits).
  finally:
    returncode = main.finish(120)
  assert returncode == -signal.SIGINT and 'Traceback' not in main.err(), main.err()[-3000:]
  last = main.err().rstrip().splitlines()[-1]
  assert last == 'interrupted (Ctrl-C)' or last.startswith('stopped at step '), last


def test_a_signal_ignored_when_the_run_started_stays_ignored():
  """`python -m vit_jax.main ... &` in a script starts with SIGINT ignored: a Ctrl-C meant for
  the script's foreground command stopped the background run."""
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with loop._StopSignal() as stop:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert stop.received is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with loop._StopSignal() as stop:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert stop.received == signal.SIGINT
  finally:
    signal.signal(signal.SIGINT, previous)


# ---- Divergence, failed evaluations, stop signals ---------------------------------------


def test_nan_loss_stops_with_training_diverged_keeping_only_finite_states(
    prepared_data_dir, tmp_path):
  config = tiny_config(prepared_data_dir, base_lr=1e6, grad_norm_clip=0.0, weight_decay=0.0,
                   warmup_steps=1, checkpoint_every=1, progress_every=1, eval_every=0,
                   keep_checkpoints=100)
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.TrainingDiverged,
                     match=r'loss is (nan|inf) at step \d+|params are not finite after step '
                     r'\d+') as error:
    loop.train_and_evaluate(config, workdir)
  assert 'Lower base_lr' in str(error.value)
  with Checkpointer(workdir, read_only=True) as checkpointer:
    steps = checkpointer.all_steps()
  assert steps, 'the finite states before the divergence were checkpointed'
  # The step named as kept is on disk when the error arrives: its async save was not cut off.
  kept = int(re.search(r'last good checkpoint \(step (\d+)\)', str(error.value)).group(1))
  assert steps[-1] == kept, (steps, str(error.value))
  for step in steps:
    state = restore_state(config, workdir, step=step)
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      assert np.isfinite(leaf).all(), f'non-finite state saved at step {step}'


def _probe(datasets: dict, shots: tuple, every: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(datasets=datasets, shots=shots, every=every, seeds=1))


def test_nan_params_are_not_probed(prepared_data_dir, tmp_path):
  # The probe saw them first (before the progress window): scikit-learn's "Input X contains
  # NaN" traceback.
  config = tiny_config(prepared_data_dir, base_lr=1e6, grad_norm_clip=0.0, weight_decay=0.0,
                       warmup_steps=1, progress_every=TOTAL_STEPS, eval_every=0)
  config.fewshot = _probe({'digits': ('train[:500]', 'test')}, (1,), every=1)
  with pytest.raises(loop.TrainingDiverged, match=r'loss is (nan|inf) at step|params are not '
                     r'finite after step|the features of digits\[train\[:500\]\] are not finite'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))


def test_an_evaluation_that_fails_keeps_the_steps_before_it(prepared_data_dir, tmp_path):
  # train[:250] of digits holds 250 examples, enough for 25 shots of 10 classes in all, but
  # class 2 has 22: the probe at step 10 fails. The 10 steps were lost (no save until 1000).
  config = tiny_config(prepared_data_dir, checkpoint_every=1000, eval_every=0)
  config.fewshot = _probe({'digits': ('train[:250]', 'test')}, (25,), every=10)
  workdir = str(tmp_path / 'run')
  with pytest.raises(ConfigError, match=r'class 2 has only 22 training examples, fewer than 25 '
                     'shots'):
    loop.train_and_evaluate(config, workdir)
  with Checkpointer(workdir, read_only=True) as checkpointer:
    assert checkpointer.all_steps() == [10]
  # Fewer shots: the rerun probes the saved step first, though there is nothing left to train
  # ("nothing to train", and no probe, it said).
  config.total_steps, config.fewshot.shots = 10, (2,)
  result = loop.train_and_evaluate(config, workdir)
  assert set(result) == {'step', 'fewshot/digits_2shot'} and result['step'] == 10
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'fewshot/digits_2shot' in r] == [10]
  assert loop.train_and_evaluate(config, workdir) == {'step': 10}  # Now nothing is owed.


def test_a_stop_signal_saves_without_the_evaluation_due_at_its_step(prepared_data_dir, tmp_path,
                                                                    monkeypatch):
  # The eval (and a probe) ran first, eating into a preemption's grace period before the save.
  monkeypatch.setattr(Checkpointer, 'reached_preemption', lambda self, step: step == 10)
  config = tiny_config(prepared_data_dir, eval_every=10)
  workdir = str(tmp_path / 'run')
  with pytest.raises(RunStopped, match='^stopped at step 10 on a preemption notice, its '
                     'checkpoint saved') as stopped:
    loop.train_and_evaluate(config, workdir)
  assert stopped.value.signum == signal.SIGTERM  # The CLI's exit status: 143.
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'train/loss' in r] == [5, 10]
  assert not [r for r in rows if 'test/accuracy' in r]
  with Checkpointer(workdir, read_only=True) as checkpointer:
    assert checkpointer.all_steps() == [10]
  monkeypatch.undo()
  # The rerun makes the evaluation the signal skipped before it trains on.
  result = loop.train_and_evaluate(config, workdir)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'test/accuracy' in r] == [10, 20, 30]
  assert result['step'] == 30 and result['test/accuracy'] == rows[-1]['test/accuracy']


def test_a_stop_signal_inside_the_profile_window_writes_the_steps_traced_so_far(
    prepared_data_dir, tmp_path, monkeypatch, caplog):
  # The run ended with the trace open: no trace file, and no word of it.
  monkeypatch.setattr(Checkpointer, 'reached_preemption', lambda self, step: step == 6)
  config = tiny_config(prepared_data_dir, eval_every=0, profile_steps=4, profile_skip_steps=3)
  workdir = tmp_path / 'run'
  with caplog.at_level(logging.WARNING), pytest.raises(RunStopped, match='at step 6 '):
    loop.train_and_evaluate(config, str(workdir))
  traces = glob.glob(str(workdir / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1
  assert profiling.traced_steps(traces[0], 'jit_train_step') == 3  # Steps 4 to 6.
  assert 'the profile was cut short at step 6: it holds 3 of the 4 steps asked' in caplog.text


def test_params_overflowed_with_a_finite_loss_are_divergence_too():
  """The saved state is the params after the step: a NaN gradient, or a finite one times a huge
  learning rate, makes them NaN or inf while the step's loss (before it) is finite."""
  loop._check_finite(1.0, 5, 3, True)  # pylint: disable=protected-access
  with pytest.raises(loop.TrainingDiverged, match=r'^the params are not finite after step 5; '
                     r'the last good checkpoint \(step 3\) is kept'):
    loop._check_finite(1.0, 5, 3, False)  # pylint: disable=protected-access
  assert loop._all_finite({'a': jnp.ones(3), 'b': [jnp.zeros(2)]})  # pylint: disable=protected-access
  assert not loop._all_finite({'a': jnp.ones(3), 'b': [jnp.array([0., jnp.inf])]})  # pylint: disable=protected-access
