"""Multi-host on one machine: launch/local.sh runs 2 processes x 4 CPU devices over gloo.

Why the loss comparison is honest: each process reads its own half of the split
(`tfds.split_for_jax_process`) with its own shuffle, so a plain 1-process run sees different
batches and a different loss curve (checked below: it misses the tolerance). The reference is
therefore the same Experiment stepped here, in one process on 8 devices, on global batches
built by concatenating the two per-process iterators (process_index 0 and 1 of 2): exactly the
global batch the 2-process run assembles with `make_array_from_process_local_data`. Only the
order of float reductions (gloo vs. in-process all-reduce, row order) may differ.

The real 2-process runs are slow-marked (~1.5-4 min each on the shared 2-core box: process
start, compiles and Orbax saves dominate); the launcher's own behaviour is in
test_local_launch.py.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import config_files
from test_local_launch import LOCAL, fake_module
from vit_jax import sharding
from vit_jax.checkpoints import restore
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.training import distributed
from vit_jax.training import experiment
from vit_jax.training.loop import evaluate, make_eval_data
from vit_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # Measured: <= 1e-7 apart; the 1-process data order is up to 1e-2 apart.
TINY = dict(total_steps=8, batch=16, warmup_steps=2, progress_every=1, checkpoint_every=1000,
            eval_every=0)


def config_for(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """configs/default.py (the embedded default) made tiny."""
  config = config_files.get_config('default')
  config.update(dict(TINY, data_dir=data_dir, **overrides))
  return config


def flags_for(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  keys = set(TINY) | {'batch_eval', 'keep_checkpoints', 'polyak_decay'}
  return ['--config=configs/default.py', f'--workdir={workdir}'] + [
      f'--config.{k}={config[k]}' for k in sorted(keys)]


def launch(config, workdir: Path, log: Path, n: int = 2) -> subprocess.Popen:
  """The launcher in a session of its own, so the test can kill its whole process group."""
  return subprocess.Popen([LOCAL, str(n), '--devices_per_process=4', *flags_for(config, workdir)],
                          cwd=ROOT, stdout=log.open('w'), stderr=subprocess.STDOUT,
                          env=dict(os.environ, TFDS_DATA_DIR=config.data_dir),
                          start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400, returncode: int = 0) -> str:
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  text = log.read_text()
  assert proc.returncode == returncode, text[-3000:]
  return text


def train_losses(workdir: Path) -> dict[int, float]:
  """step -> train/loss; a step logged again after a resume keeps its latest value."""
  return {row['step']: row['train/loss'] for row in read_jsonl(str(workdir / 'metrics.jsonl'))
          if 'train/loss' in row}


def reference(config, process_count: int, exp=None):
  """(losses by step, final state, experiment): the Experiment stepped here, in one process on
  8 devices, on the global batches of `process_count` processes' iterators in process order."""
  exp = exp or experiment.build(config)
  state, train_step = exp.init_state(), exp.jit_train_step()
  iterators = [input_pipeline.make_train_iterator(
      dataset=config.dataset, split=config.train_split, data_dir=config.data_dir,
      global_batch=config.batch, image_size=config.image_size, channels=config.channels,
      pp=config.pp, seed=config.seed, process_index=i, process_count=process_count)
               for i in range(process_count)]
  losses = {}
  for step in range(1, config.total_steps + 1):
    parts = [next(it) for it in iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = train_step(state, jax.device_put(batch, sharding.batch_sharding(exp.mesh)))
    losses[step] = float(metrics['loss'])
  return losses, state, exp


@pytest.fixture(scope='module')
def two_process_run(prepared_data_dir, tmp_path_factory):
  """One uninterrupted 2 x 4 run of the tiny default, and its in-process reference; with
  Polyak averaging, so that the average is written by both processes' shards too."""
  config = config_for(prepared_data_dir, polyak_decay=0.9)
  workdir = tmp_path_factory.mktemp('two_process')
  log = workdir.parent / 'two_process.log'
  text = finish(launch(config, workdir, log), log)
  return config, workdir, text, reference(config, 2)


@pytest.mark.slow
def test_two_processes_match_the_same_global_batches_in_one(two_process_run):
  config, workdir, _, (expected, _, exp) = two_process_run
  got = train_losses(workdir)
  assert sorted(got) == list(range(1, config.total_steps + 1))
  # Rates from step 2 on: the first window holds only the compiling step.
  rated = [row['step'] for row in read_jsonl(str(workdir / 'metrics.jsonl'))
           if 'perf/img_per_sec' in row]
  assert rated == list(range(2, config.total_steps + 1))
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=RTOL)
  # A 1-process stream (the whole split, one shuffle) is a different run: the check bites.
  whole = reference(config, 1, exp)[0]
  assert max(abs(got[s] - whole[s]) / got[s] for s in got) > 100 * RTOL


@pytest.mark.slow
def test_the_two_processes_checkpoint_the_average_of_the_reference(two_process_run):
  """Compared by what the params compute: a few (the attention's key bias, whose gradient is
  only rounding noise, which Adam scales up to full steps) differ with the order of the sums."""
  _, workdir, _, (_, state, exp) = two_process_run
  pretrained = restore.load(str(workdir))  # What infer, export and fine-tuning read.
  assert pretrained.source.endswith('Polyak-averaged params)')
  eval_step, eval_data = exp.jit_eval_step(), make_eval_data(exp)
  saved = evaluate(exp, eval_step, pretrained.params, eval_data)
  expected = evaluate(exp, eval_step, state.averaged_params, eval_data)
  plain = evaluate(exp, eval_step, state.params, eval_data)
  assert saved['test/loss'] == pytest.approx(expected['test/loss'], rel=1e-4)
  # The params (8 steps from chance) compute 0.003 away, 10x the tolerance: the check bites.
  assert abs(plain['test/loss'] - expected['test/loss']) > 1e-3


@pytest.mark.slow
def test_only_process_zero_writes_and_every_process_logs(two_process_run):
  config, workdir, text, _ = two_process_run
  rows = read_jsonl(str(workdir / 'metrics.jsonl'))
  assert len(rows) == len({r['step'] for r in rows})  # One writer: no duplicated steps.
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 1
  assert (workdir / 'config.json').exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(config.total_steps)]
  assert '[0] ' in text and '[1] ' in text
  assert 'process 1 of 2, 4 local / 8 global devices' in text
  assert f'[0] step {config.total_steps}/{config.total_steps}' in text
  assert f'[1] step {config.total_steps}/' not in text  # The progress line is process 0's.


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_to_the_same_end(prepared_data_dir, tmp_path):
  """SIGKILL the launcher's process group once a checkpoint exists; rerun; bit for bit the
  losses and the eval of an uninterrupted 2-process run, on every step logged after the resume.
  (Not the in-process reference: over 16 steps Adam grows its reduction-order noise to 2e-4 on a
  Zen 3, in the uninterrupted run alike.)"""
  config = config_for(prepared_data_dir, total_steps=16, checkpoint_every=4, eval_every=16,
                      batch_eval=1000)
  finish(launch(config, tmp_path / 'whole', tmp_path / 'whole.log'), tmp_path / 'whole.log')
  killed = launch(config, tmp_path / 'run', tmp_path / 'killed.log')
  checkpoints = tmp_path / 'run' / 'checkpoints'
  try:
    deadline = time.monotonic() + 300
    while not (checkpoints.exists() and any(p.isdigit() for p in os.listdir(checkpoints))):
      assert killed.poll() is None and time.monotonic() < deadline, (
          tmp_path / 'killed.log').read_text()[-3000:]
      time.sleep(0.5)
  finally:
    os.killpg(killed.pid, signal.SIGKILL)
  killed.wait()
  saved = max(int(p) for p in os.listdir(checkpoints) if p.isdigit())
  assert saved < config.total_steps
  text = finish(launch(config, tmp_path / 'run', tmp_path / 'resumed.log'),
                tmp_path / 'resumed.log')
  assert f'resumed from the checkpoint at step {saved}' in text
  expected, got = train_losses(tmp_path / 'whole'), train_losses(tmp_path / 'run')
  after = [s for s in got if s > saved]
  assert after == list(range(saved + 1, config.total_steps + 1))
  assert [got[s] for s in after] == [expected[s] for s in after]
  final, want = (read_jsonl(str(tmp_path / run / 'metrics.jsonl'))[-1] for run in ('run', 'whole'))
  assert final['test/examples'] == 10000
  assert {k: v for k, v in final.items() if k.startswith('test/')} == {
      k: v for k, v in want.items() if k.startswith('test/')}


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(prepared_data_dir, tmp_path):
  """A preemption notice reaching one host only: JAX's preemption service (not a per-process
  flag, which would stop the processes at different steps and hang them) picks one step at
  which every process saves and stops, exiting 143 (128 + SIGTERM: a run to resume)."""
  config = config_for(prepared_data_dir, total_steps=500)
  log = tmp_path / 'run.log'
  proc = launch(config, tmp_path / 'run', log)
  try:
    deadline = time.monotonic() + 300
    while '[0] step 4/' not in log.read_text():
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.5)
    children = Path(f'/proc/{proc.pid}/task/{proc.pid}/children').read_text().split()
    os.kill(int(children[1]), signal.SIGTERM)  # Process 1 only.
  finally:
    text = finish(proc, log, returncode=128 + signal.SIGTERM)
  [saved] = os.listdir(tmp_path / 'run' / 'checkpoints')
  assert 4 <= int(saved) < config.total_steps
  stops = re.findall(r'^\[(\d)\] stopped at step (\d+) on a preemption notice, its checkpoint '
                     'saved: rerun the same command to resume$', text, re.M)
  assert sorted(stops) == [('0', saved), ('1', saved)]


# Two processes save checkpoints 1 and 2 of an array sharded over both, then restore: with
# --case=failed_read, process 1's read of step 2 fails (raised before orbax's read, as a failed
# read is); with --case=unshared, process 1 looks in another directory; with --case=changed, the
# state restored holds another array, and with --case=changed_unread process 1 cannot read the
# checkpoints' tree.
_RESTORE_ON_TWO_PROCESSES = """
import numpy as np
args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
from vit_jax.training import distributed
distributed.initialize(args['coordinator_address'], int(args['num_processes']), pid)
import jax
from jax.sharding import NamedSharding, PartitionSpec
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.errors import ConfigError
sharding = NamedSharding(jax.make_mesh((8,), ('fsdp',)), PartitionSpec('fsdp'))
def state(step):
  return {'w': jax.make_array_from_callback((8,), sharding, lambda i: np.full(8, step * 1.0)[i])}
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state(0))
with Checkpointer(args['workdir'], async_save=False) as checkpointer:
  for step in (1, 2):
    checkpointer.save(step, state(step), {'step': step})
unshared = args['case'] == 'unshared' and pid == 1
if args['case'].startswith('changed'):
  abstract['b'] = abstract['w']
with Checkpointer(args['workdir'] + ('/elsewhere' if unshared else '')) as checkpointer:
  if args['case'] == 'changed_unread' and pid == 1:
    def unreadable(step):
      raise OSError('injected read error')
    checkpointer.state_metadata = unreadable
  if args['case'] == 'failed_read' and pid == 1:
    read = checkpointer._restore_retrying_once
    def failing(step, abstract_state):
      if step == 2:
        raise OSError('injected read error')
      return read(step, abstract_state)
    checkpointer._restore_retrying_once = failing
  try:
    restored, meta = checkpointer.restore_latest(abstract)
  except ConfigError as e:
    print('error:', e, flush=True)
  else:
    local = sorted({float(s.data[0]) for s in restored['w'].addressable_shards})
    print('restored', meta['step'], local, 'kept', checkpointer.all_steps(), flush=True)
"""


def _restore_on_two_processes(tmp_path: Path, case: str) -> str:
  env = fake_module(tmp_path, _RESTORE_ON_TWO_PROCESSES)
  result = subprocess.run([LOCAL, '2', '--devices_per_process=4', '--module=fake_main',
                           f'--workdir={tmp_path / "run"}', f'--case={case}'],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return result.stdout  # The launcher passes on both streams as its stdout.


def test_processes_that_read_different_newest_steps_all_resume_the_oldest(tmp_path):
  """Else they would train from different states (or different numbers of steps, and hang)."""
  out = _restore_on_two_processes(tmp_path, 'failed_read')
  lines = sorted(line for line in out.splitlines() if 'restored' in line)
  assert lines == ['[0] restored 1 [1.0] kept [1]', '[1] restored 1 [1.0] kept [1]']
  assert 'the processes read steps [2, 1] as their newest checkpoint: all resume from step 1' in (
      out)


def test_processes_that_list_different_checkpoints_all_stop(tmp_path):
  """Else one would start afresh while the others wait for it in their restore."""
  out = _restore_on_two_processes(tmp_path, 'unshared')
  lines = sorted(line for line in out.splitlines() if 'error:' in line)
  assert len(lines) == 2, out[-3000:]
  for i, line in enumerate(lines):  # Each names the directory it looked in.
    assert line.startswith(f'[{i}] error: the processes list different checkpoints in ')
    assert line.endswith('(count, newest step per process: [[2, 2], [0, -1]]): the workdir '
                         'must be on storage that every process shares')


@pytest.mark.parametrize('case', ['changed', 'changed_unread'])
def test_a_changed_state_stops_every_process_in_one_line(case, tmp_path):
  """Also when one process cannot read the checkpoints' tree: it took the old fallback alone
  ("unreadable, trying an older one", then another error) while the others named the change."""
  out = _restore_on_two_processes(tmp_path, case)
  lines = sorted(line for line in out.splitlines() if 'error:' in line)
  assert len(lines) == 2 and 'unreadable' not in out, out[-3000:]
  named = "this config builds (only in this config's state: b): resume"
  told = ('this config builds (as process 0 read their tree, which this process could not: its '
          'log names the arrays): resume' if case == 'changed_unread' else named)
  for i, line in enumerate(lines):
    assert line.startswith(f'[{i}] error: the checkpoints in '), line
    assert (named if i == 0 else told) in line, line


def _no_cluster_env(monkeypatch) -> list:
  """No launcher's variables; jax.distributed.initialize recorded instead of run."""
  for name in distributed.SLURM_STEP_VARIABLES + ('TPU_WORKER_HOSTNAMES',
                                                  'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)
  return calls


@pytest.mark.parametrize('env,detect,joins', [
    ({}, False, False),
    ({}, True, True),  # --distributed: a Cloud TPU VM pod, which JAX finds by its metadata.
    ({'SLURM_JOB_ID': '7'}, False, False),  # An salloc shell or sbatch script: no srun step.
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '2',
      'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}, False, True),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1'}, False, True),
])
def test_auto_detection_joins_only_a_real_multi_process_launch(env, detect, joins, monkeypatch):
  calls = _no_cluster_env(monkeypatch)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(detect=detect)
  assert calls == ([{'coordinator_address': None, 'num_processes': None, 'process_id': None}]
                   if joins else [])


def test_a_pod_host_that_did_not_join_stops_naming_the_flag(monkeypatch):
  """A Cloud TPU VM pod's runtime sees every host even unjoined; Orbax's barriers and the
  preemption notices would then fail or stay silent, so this stops before training."""
  calls = _no_cluster_env(monkeypatch)
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  with pytest.raises(ConfigError, match=r'one of 4 processes, not joined: pass --distributed'):
    distributed.initialize()
  assert not calls


@pytest.mark.parametrize('module', ['vit_jax.main', 'vit_jax.finetune'])
def test_training_commands_take_the_launchers_flags(module, tmp_path):
  """launch/local.sh passes --num_processes/--process_id to either command; without the
  coordinator's address they are one line naming it, not a single-process run."""
  result = subprocess.run(
      [sys.executable, '-m', module, '--num_processes=2', '--process_id=1',
       '--config=configs/default.py', f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'error: --num_processes/--process_id need --coordinator_address=HOST:PORT of process 0 '
      '(off Cloud TPU and SLURM, which provide it)')
  assert not list(tmp_path.iterdir())


def test_a_mesh_that_replicates_the_batch_across_processes_is_refused(monkeypatch):
  """Each process feeds its own slice: data x fsdp must split the batch over the processes."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config = ml_collections.ConfigDict(dict(batch=16, mesh='data:1,tensor:-1'))
  with pytest.raises(ConfigError, match=r"splits the batch 1 ways over 2 processes"):
    experiment.check_batch(config, sharding.make_mesh(config.mesh))
  experiment.check_batch(config, sharding.make_mesh('data:2,tensor:-1'))
