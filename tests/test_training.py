"""End-to-end pre-training on real data: a tiny ViT (ViT-Mu_4) on the 8x8 digits, 8 CPU devices.

What is asserted: learning happens, every parallelism computes the same thing, gradient
accumulation is the big batch, resume (after a crash, a SIGKILL or a SIGTERM) is bit-exact, a
corrupt checkpoint is skipped, divergence stops cleanly, metrics.jsonl holds what the docs say,
and config mistakes are one line before anything compiles.

Compiling dominates on CPU, so the module shares a persistent XLA compilation cache (also with
the `python -m vit_jax.main` subprocesses) and most tests use the one `_config` recipe, whose
executables are then compiled once.
"""
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import loop
from vit_jax.training import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 30
CHECKPOINT_EVERY = 10
_CACHE_OPTIONS = {'jax_compilation_cache_dir': None,
                  'jax_persistent_cache_min_compile_time_secs': 0,
                  'jax_persistent_cache_min_entry_size_bytes': 0}


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module (restored afterwards)."""
  path = str(tmp_path_factory.mktemp('jax_cache'))
  previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  for name, value in _CACHE_OPTIONS.items():
    jax.config.update(name, path if value is None else value)
  compilation_cache.reset_cache()
  yield path
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """ViT-Mu_4 (4x4 patches: 2x2 tokens) on digits, 8 devices (data:-1), batch 64."""
  config = ml_collections.ConfigDict(dict(
      model='ViT-Mu_4', model_overrides={}, dataset='digits', data_dir=data_dir,
      train_split='train', eval_split='test', num_classes=10, image_size=8, channels=1,
      pp={'train': {'crop': 'resize', 'flip': False}, 'eval': {'crop': 'resize'}},
      batch=64, batch_eval=304, total_steps=TOTAL_STEPS, optimizer='adamw', base_lr=3e-3,
      weight_decay=0.05, warmup_steps=5, decay_type='cosine', grad_norm_clip=1.0,
      label_smoothing=0.0, loss='softmax_xent', accum_steps=1, dtype='float32',
      mesh='data:-1', eval_every=TOTAL_STEPS, progress_every=5,
      checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=3, seed=0))
  config.update(overrides)
  return config


def _restore(config, workdir, step=None):
  """The train state of the newest (or the given) checkpoint of `workdir`, as numpy."""
  exp = experiment.build(config)
  checkpointer = Checkpointer(workdir, read_only=True, async_save=False)
  try:
    if step is None:
      state, meta = checkpointer.restore_latest(exp.abstract_state)
    else:
      restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(exp.abstract_state), meta=ocp.args.JsonRestore()))
      state, meta = restored['state'], restored['meta']
  finally:
    checkpointer.close()
  assert meta['step'] == int(state.step)
  return jax.device_get(state)


def _assert_states_equal(a, b, context=''):
  """Bitwise equality of two train states; names the leaves that differ."""
  assert int(a.step) == int(b.step), context
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  differ = [(jax.tree_util.keystr(path), float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
            for (path, x), (_, y) in zip(flat_a, flat_b) if not np.array_equal(x, y)]
  assert not differ, f'{len(differ)} of {len(flat_a)} leaves differ {context}: {differ[:5]}'


def _mlp_kernel(params):
  return params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']


@pytest.fixture(scope='module')
def baseline(prepared_data_dir, tmp_path_factory):
  """30 uninterrupted steps of `_config` (checkpoints at 10, 20, 30; eval at the end)."""
  config = _config(prepared_data_dir)
  workdir = str(tmp_path_factory.mktemp('baseline'))
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result


# ---- Learning and metrics ---------------------------------------------------------------


def test_loss_decreases_and_accuracy_beats_chance(baseline):
  _, workdir, result = baseline
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r]
  losses = [r['train/loss'] for r in rows]
  # Measured: 2.27 (steps 2-5) -> 1.05 (steps 26-30); test accuracy 0.81 (chance 0.10).
  assert losses[0] > 2.0
  assert losses[-1] < 1.6 < math.log(10)
  assert losses[-1] < losses[0] - 0.6
  assert result['step'] == TOTAL_STEPS
  assert result['test/examples'] == 297  # Every test example once.
  assert result['test/accuracy'] > 0.5
  assert result['test/accuracy_top5'] >= result['test/accuracy']


def test_metrics_jsonl_has_the_documented_keys(baseline):
  config, workdir, _ = baseline
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in rows if 'train/loss' in r]
  evals = [r for r in rows if 'test/accuracy' in r]
  assert [r['step'] for r in train] == [5, 10, 15, 20, 25, 30]
  assert [r['step'] for r in evals] == [30]
  for row in train:
    assert {'train/loss', 'train/learning_rate', 'train/grad_norm', 'perf/img_per_sec',
            'perf/img_per_sec_per_core', 'perf/tflops_per_device'} <= set(row)
    assert np.isfinite(row['train/loss']) and 0 < row['train/grad_norm'] < 100
    assert 0 < row['perf/img_per_sec'] < 1e7
    assert 0 < row['perf/img_per_sec_per_core'] <= row['perf/img_per_sec']
    assert 0 < row['perf/tflops_per_device'] < 10  # A few GFLOP/s on a CPU.
  assert 0 <= evals[0]['test/accuracy'] <= 1 and evals[0]['test/loss'] > 0
  # The learning rate is the window's mean of the schedule at each step's state.step:
  # linear warmup over 5 steps to 3e-3, then cosine to 0. The first step (compiling) is
  # left out of the first window.
  schedule = experiment.build(config).schedule
  previous = 1
  for row in train:
    expected = np.mean([float(schedule(s - 1)) for s in range(previous + 1, row['step'] + 1)])
    assert row['train/learning_rate'] == pytest.approx(expected, rel=1e-5)
    previous = row['step']
  assert train[0]['train/learning_rate'] == pytest.approx(3e-3 * (1 + 2 + 3 + 4) / 4 / 5)
  lrs = [r['train/learning_rate'] for r in train]
  assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > lrs[5]  # Decaying after the warmup.
  saved = json.load(open(os.path.join(workdir, 'config.json'), encoding='utf-8'))
  assert saved['model'] == 'ViT-Mu_4' and saved['total_steps'] == TOTAL_STEPS


# ---- Parallelism ------------------------------------------------------------------------


def test_data_fsdp_and_tensor_parallel_match_one_device(prepared_data_dir):
  """The baseline config on four meshes: losses and params after 4 steps agree."""
  config = _config(prepared_data_dir)  # 'data:8' then reuses the baseline's executables.
  local = input_pipeline.make_train_iterator(
      dataset='digits', split='train', data_dir=prepared_data_dir, global_batch=config.batch,
      image_size=8, channels=1, pp=config.pp, seed=0)
  batches = [next(local) for _ in range(4)]
  results = {}
  for mesh, devices in (('data:1', jax.devices()[:1]), ('data:8', None),
                        ('data:2,fsdp:4', None), ('data:2,tensor:4', None)):
    exp = experiment.build(_config(prepared_data_dir, mesh=mesh), devices=devices)
    state, train_step = exp.init_state(), exp.jit_train_step()
    losses = []
    for batch in global_batch.prefetch_to_mesh(batches, exp.mesh):
      state, step_metrics = train_step(state, batch)
      losses.append(float(step_metrics['loss']))
    kernel = _mlp_kernel(state.params)
    mu = _mlp_kernel(optax.tree_utils.tree_get(state.opt_state, 'mu'))  # Adam's moment.
    results[mesh] = (losses, jax.device_get(state.params), kernel.sharding.spec,
                     mu.sharding.spec, kernel.addressable_shards[0].data.shape)
  ref_losses, ref_params = results['data:1'][:2]
  assert ref_losses[3] < ref_losses[0] - 0.01  # The steps did something.
  for mesh, (losses, params, *_) in results.items():
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=mesh)
    # Adam divides by sqrt(v): where a gradient is ~0 (e.g. the zero-initialised cls token),
    # summation-order noise moves a param by a fraction of the lr (3e-3), hence the atol.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4),
                 params, ref_params)
  # The (64, 256) MLP kernel: replicated under pure DP, split over fsdp / tensor otherwise;
  # Adam's moments follow their param.
  assert results['data:8'][4] == (64, 256)
  fsdp, tensor = results['data:2,fsdp:4'], results['data:2,tensor:4']
  assert fsdp[2] == fsdp[3] and fsdp[2][0] == 'fsdp' and fsdp[4] == (16, 256)
  assert tensor[2] == tensor[3] and tensor[2][1] == 'tensor' and tensor[4] == (64, 64)


def test_gradient_accumulation_equals_the_big_batch(prepared_data_dir):
  """SGD (the update is lr x grad), constant lr: one step with accum_steps=4 == accum 1."""
  overrides = dict(optimizer='sgd', weight_decay=0.0, warmup_steps=0, decay_type='constant',
                   grad_norm_clip=0.0, base_lr=0.5, model_overrides={'num_layers': 1})
  config = _config(prepared_data_dir, **overrides)
  batch = next(input_pipeline.make_train_iterator(
      dataset='digits', split='train', data_dir=prepared_data_dir, global_batch=64,
      image_size=8, channels=1, pp=config.pp, seed=0))
  out = {}
  for accum in (1, 4):
    exp = experiment.build(_config(prepared_data_dir, accum_steps=accum, **overrides))
    state = exp.init_state()
    init = jax.device_get(state.params)
    state, step_metrics = exp.jit_train_step()(
        state, global_batch.to_global(batch, exp.mesh))
    out[accum] = (jax.device_get(step_metrics), init, jax.device_get(state.params))
  (m1, init1, p1), (m4, init4, p4) = out[1], out[4]
  assert m1['loss'] == pytest.approx(m4['loss'], rel=1e-5)
  assert m1['grad_norm'] == pytest.approx(m4['grad_norm'], rel=1e-5)
  assert m1['grad_norm'] > 0.1
  updates1 = jax.tree.map(np.subtract, p1, init1)
  updates4 = jax.tree.map(np.subtract, p4, init4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               updates1, updates4)
  head = np.abs(updates1['head']['kernel']).max()
  assert head > 1e-3  # A real step, not a no-op.


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
  _assert_states_equal(_restore(config, workdir), _restore(config, base_workdir))
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  base_rows = metrics_lib.read_jsonl(os.path.join(base_workdir, 'metrics.jsonl'))
  # The rerun's progress windows 16-20, 21-25, 26-30 are the baseline's: same mean losses.
  loss_at = lambda rs: {r['step']: r['train/loss'] for r in rs if 'train/loss' in r}
  for step in (20, 25, 30):
    assert loss_at(rows)[step] == loss_at(base_rows)[step]


def _write_config_file(config: ml_collections.ConfigDict, path) -> str:
  path.write_text('import json\nimport ml_collections\n\n\ndef get_config():\n'
                  f'  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n')
  return str(path)


def _cli_env(compile_cache_dir=None) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  if compile_cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


class _Main:
  """`python -m vit_jax.main` in a subprocess; threads drain its pipes (absl logs a lot)."""

  def __init__(self, config_file, workdir, compile_cache_dir=None, *flags):
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'vit_jax.main', f'--config={config_file}',
         f'--workdir={workdir}', *flags], cwd=REPO, env=_cli_env(compile_cache_dir),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.stdout, self.stderr, self.lines = [], [], queue.Queue()
    self.threads = [
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout, True)),
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr, False))]
    for thread in self.threads:
      thread.start()

  def _drain(self, stream, into, notify):
    for line in stream:
      into.append(line)
      if notify:
        self.lines.put(line)
    if notify:
      self.lines.put(None)

  def wait_for_step(self, min_step: int, timeout: float = 300) -> int:
    """Reads progress lines (`step k/N | ...`) until k >= min_step; returns k."""
    deadline = time.time() + timeout
    while True:
      try:
        line = self.lines.get(timeout=max(deadline - time.time(), 0.01))
      except queue.Empty:
        raise AssertionError(f'no step {min_step} in {timeout} s: {self.err()[-3000:]}') from None
      if line is None:
        raise AssertionError(f'main exited ({self.proc.wait()}) before step {min_step}: '
                             f'{self.err()[-3000:]}')
      if line.startswith('step '):
        step = int(line.split()[1].split('/')[0])
        if step >= min_step:
          return step

  def finish(self, timeout: float = 300) -> int:
    try:
      self.proc.wait(timeout)
    finally:
      self.proc.kill()
      self.proc.wait()
      for thread in self.threads:
        thread.join()
    return self.proc.returncode

  def err(self) -> str:
    return ''.join(self.stderr)

  def out(self) -> str:
    return ''.join(self.stdout)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(baseline, compile_cache, tmp_path):
  """The real thing: `python -m vit_jax.main` SIGKILLed after a checkpoint, then rerun."""
  config, base_workdir, _ = baseline
  config = config.copy_and_resolve_references()
  config.progress_every = 1  # A line per step, and a checkpoint per step (each waits for the
  config.checkpoint_every = 1  # previous save): slow enough for the kill to land mid-run,
  config.keep_checkpoints = 100  # quite likely while a save is being written.
  config_file = _write_config_file(config, tmp_path / 'config.py')
  workdir = str(tmp_path / 'run')
  main = _Main(config_file, workdir, compile_cache)
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
  rerun = _Main(config_file, workdir, compile_cache)
  assert rerun.finish(600) == 0, rerun.err()[-3000:]
  resumed = int(re.search(r'resumed from the checkpoint at step (\d+)', rerun.err())[1])
  assert 0 < resumed <= max(steps) and 'Traceback' not in rerun.err()
  _assert_states_equal(_restore(config, workdir), _restore(config, base_workdir),
                       f'(killed with {listing}, resumed from {resumed})')


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(prepared_data_dir, compile_cache,
                                                      tmp_path):
  config = _config(prepared_data_dir, total_steps=5000, checkpoint_every=1000, progress_every=1,
                   eval_every=0)
  config_file = _write_config_file(config, tmp_path / 'config.py')
  workdir = str(tmp_path / 'run')
  runs = []
  for _ in range(2):  # The second run resumes from the first one's checkpoint.
    main = _Main(config_file, workdir, compile_cache)
    try:
      first = main.wait_for_step(3)
      main.proc.send_signal(signal.SIGTERM)
    finally:
      returncode = main.finish(120)
    assert returncode == 0, main.err()[-3000:]
    assert 'Traceback' not in main.err()
    assert 'SIGTERM received' in main.err()
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                   if s.isdigit())
    runs.append((first, steps, main.err()))
  (first_a, steps_a, _), (first_b, steps_b, stderr_b) = runs
  # Saved at the step it stopped at (after the one it was seen at; not a checkpoint_every one).
  assert len(steps_a) == 1 and first_a <= steps_a[0] < 1000, (first_a, steps_a)
  assert f'resumed from the checkpoint at step {steps_a[0]}' in stderr_b
  assert first_b > steps_a[0]
  assert steps_b[0] == steps_a[0] and steps_b[-1] > steps_a[0]
  state = _restore(config, workdir)
  assert int(state.step) == steps_b[-1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


# ---- Failures ---------------------------------------------------------------------------


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(baseline, tmp_path, caplog):
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  data = os.path.join(workdir, 'checkpoints', '30', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):  # Truncate every array file of the newest checkpoint.
    open(os.path.join(data, name), 'w').close()
  with caplog.at_level(logging.WARNING):
    state = _restore(config, workdir)
  assert int(state.step) == 20
  assert any('checkpoint at step 30 is unreadable' in r.getMessage() for r in caplog.records)
  _assert_states_equal(state, _restore(config, base_workdir, step=20))
  # Training resumes from 20 and writes step 30 again (the unreadable one is set aside).
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == TOTAL_STEPS
  set_aside = os.listdir(os.path.join(workdir, 'checkpoints', 'unreadable'))
  assert len(set_aside) == 1 and set_aside[0].startswith('30.')
  _assert_states_equal(_restore(config, workdir), _restore(config, base_workdir))


def test_nan_loss_stops_with_training_diverged_keeping_only_finite_states(
    prepared_data_dir, tmp_path):
  config = _config(prepared_data_dir, base_lr=1e6, grad_norm_clip=0.0, weight_decay=0.0,
                   warmup_steps=1, checkpoint_every=1, progress_every=1, eval_every=0,
                   keep_checkpoints=100)
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.TrainingDiverged,
                     match=r'(loss|gradient norm) is (nan|inf) at step \d+') as error:
    loop.train_and_evaluate(config, workdir)
  assert 'Lower base_lr' in str(error.value)
  checkpointer = Checkpointer(workdir, read_only=True)
  steps = checkpointer.all_steps()
  checkpointer.close()
  assert steps, 'the finite states before the divergence were checkpointed'
  for step in steps:
    state = _restore(config, workdir, step=step)
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      assert np.isfinite(leaf).all(), f'non-finite state saved at step {step}'


def test_a_nan_gradient_with_a_finite_loss_is_divergence_too():
  """The saved state is the params after the step: a NaN gradient makes them NaN."""
  loop._check_finite(1.0, 5, 3, 2.0)  # pylint: disable=protected-access
  with pytest.raises(loop.TrainingDiverged, match=r'gradient norm is nan at step 5; the last '
                     r'good checkpoint \(step 3\) is kept'):
    loop._check_finite(1.0, 5, 3, float('nan'))  # pylint: disable=protected-access


# ---- Config errors ----------------------------------------------------------------------

CONFIG_ERRORS = {
    'unknown_model': (dict(model='ViT-Nope_4'), r"unknown model 'ViT-Nope_4'"),
    'mesh_does_not_divide': (dict(mesh='data:3,fsdp:-1'), r'does not divide the 8 devices'),
    'mesh_too_big': (dict(mesh='data:16'), r'needs 16 devices but there are 8'),
    'batch_not_divisible': (dict(batch=60), r'config.batch=60 is not divisible by 8'),
    'missing_dataset': (dict(dataset='no_such_dataset', num_classes=None),
                        r"unknown dataset 'no_such_dataset'"),
    'unprepared_dataset': (dict(dataset='mnist', num_classes=None),
                           r"dataset 'mnist' is not prepared"),
}


@pytest.mark.parametrize('name', sorted(CONFIG_ERRORS))
def test_config_errors_come_before_compiling(name, prepared_data_dir, tmp_path, monkeypatch):
  overrides, message = CONFIG_ERRORS[name]
  compiled = []
  monkeypatch.setattr(experiment.Experiment, 'init_state',
                      lambda *a, **k: compiled.append('init') or pytest.fail('compiled'))
  with pytest.raises(ConfigError, match=message) as error:
    loop.train_and_evaluate(_config(prepared_data_dir, **overrides), str(tmp_path / 'run'))
  assert '\n' not in str(error.value) and not compiled


def test_missing_dataset_is_an_error_before_init_even_with_num_classes(prepared_data_dir,
                                                                       tmp_path, monkeypatch):
  """config.num_classes skips the dataset lookup in build(); the loop still checks first."""
  monkeypatch.setattr(experiment.Experiment, 'init_state',
                      lambda *a, **k: pytest.fail('initialised before the data check'))
  with pytest.raises(ConfigError, match=r"unknown dataset 'no_such_dataset'"):
    loop.train_and_evaluate(_config(prepared_data_dir, dataset='no_such_dataset'),
                            str(tmp_path / 'run'))


def test_cli_config_errors_are_one_line_and_exit_2(prepared_data_dir, tmp_path):
  """Through `python -m vit_jax.main`: `error: ...` on stderr, exit code 2, no traceback."""
  mains = {}
  for name in ('unknown_model', 'mesh_does_not_divide', 'batch_not_divisible',
               'missing_dataset'):
    config_file = _write_config_file(_config(prepared_data_dir, **CONFIG_ERRORS[name][0]),
                                     tmp_path / f'{name}.py')
    mains[name] = _Main(config_file, str(tmp_path / name))  # Together: ~10 s of imports each.
  for name, main in mains.items():
    assert main.finish(300) == 2, (name, main.err()[-3000:])
    assert 'Traceback' not in main.err() + main.out()
    errors = [line for line in main.err().splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and re.search(CONFIG_ERRORS[name][1], errors[0]), (name, main.err())
    assert main.err().rstrip().endswith(errors[0])
