"""What the training test files share: the tiny recipe, a compilation cache, a baseline run, and
reading back and comparing its train states.

Compiling dominates on CPU, so each module that imports `compile_cache` uses a persistent XLA
compilation cache (also used by its `python -m vit_jax.main` subprocesses): the pytest
process's, shared by the modules it runs (conftest.py), else one of its own; and most tests use
the one `tiny_config` recipe, whose executables are then compiled once.
"""
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.training import experiment
from vit_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 30
CHECKPOINT_EVERY = 10
_CACHE_OPTIONS = {'jax_compilation_cache_dir': None,
                  'jax_persistent_cache_min_compile_time_secs': 0,
                  'jax_persistent_cache_min_entry_size_bytes': 0}


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """The pytest process's persistent compilation cache, else one for this module (restored
  afterwards)."""
  if os.environ.get('VIT_JAX_TEST_COMPILATION_CACHE'):  # conftest.py's, jax's already.
    yield os.environ['VIT_JAX_TEST_COMPILATION_CACHE']
    return
  path = str(tmp_path_factory.mktemp('jax_cache'))
  previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  for name, value in _CACHE_OPTIONS.items():
    jax.config.update(name, path if value is None else value)
  compilation_cache.reset_cache()
  yield path
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
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


def write_config_file(config: ml_collections.ConfigDict, path) -> str:
  path.write_text('import json\nimport ml_collections\n\n\ndef get_config():\n'
                  f'  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n')
  return str(path)


@pytest.fixture(scope='module')
def baseline(prepared_data_dir, tmp_path_factory):
  """30 uninterrupted steps of `tiny_config` (checkpoints at 10, 20, 30; eval at 20 and at the
  end)."""
  config = tiny_config(prepared_data_dir, eval_every=20)
  workdir = str(tmp_path_factory.mktemp('baseline'))
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result


def cli_env(compile_cache_dir=None) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  if compile_cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


class MainProcess:
  """`python -m vit_jax.main` in a subprocess; threads drain its pipes (absl logs a lot)."""

  def __init__(self, config_file, workdir, compile_cache_dir=None, *flags):
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'vit_jax.main', f'--config={config_file}',
         f'--workdir={workdir}', *flags], cwd=REPO,
        env=dict(cli_env(compile_cache_dir), PYTHONFAULTHANDLER='1'),
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
    """The exit status; a run still going after `timeout` fails the test with its threads'
    stacks, which say where it hangs."""
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints the stacks.
      self._end(grace=10)
      stacks = self.err().split('\nExtension modules:')[0]
      raise AssertionError(f'main still running after {timeout} s: {stacks[-6000:]}') from None
    finally:
      self._end(grace=0)
    return self.proc.returncode

  def _end(self, grace: float) -> None:
    try:
      self.proc.wait(grace)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    for thread in self.threads:
      thread.join()

  def err(self) -> str:
    return ''.join(self.stderr)

  def out(self) -> str:
    return ''.join(self.stdout)


def restore_state(config, workdir, step=None):
  """The train state of the newest (or the given) checkpoint of `workdir`, as numpy."""
  exp = experiment.build(config)
  with Checkpointer(workdir, read_only=True, async_save=False) as checkpointer:
    if step is None:
      state, meta = checkpointer.restore_latest(exp.abstract_state)
    else:
      restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(exp.abstract_state), meta=ocp.args.JsonRestore()))
      state, meta = restored['state'], restored['meta']
  assert meta['step'] == int(state.step)
  return jax.device_get(state)


def assert_states_equal(a, b, context=''):
  """Bitwise equality of two train states; names the leaves that differ."""
  assert int(a.step) == int(b.step), context
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  differ = [(jax.tree_util.keystr(path), float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
            for (path, x), (_, y) in zip(flat_a, flat_b) if not np.array_equal(x, y)]
  assert not differ, f'{len(differ)} of {len(flat_a)} leaves differ {context}: {differ[:5]}'
