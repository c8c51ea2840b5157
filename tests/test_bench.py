"""The benchmark command runs on a tiny config and reports sane figures (no step timing
asserted)."""
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_files
from vit_jax.models.flops import forward_flops
from vit_jax.training import benchmark
from vit_jax.training import experiment
from vit_jax.training import perf
from vit_jax.training import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ViT-Mu/4 at 32 px through the ViT-Ti/16 recipe (it sets num_classes: no dataset is read).
TINY = ['--config=configs/vit_ti16.py', '--config.model=ViT-Mu_4', '--config.image_size=32',
        '--config.batch=8', '--config.batch_eval=8', '--config.dtype=float32',
        '--config.optimizer=sgd', '--config.grad_norm_clip=1.0']
FIELDS = ('what', 'model', 'batch', 'device', 'devices', 'cores', 'compile_s', 'step_s_median',
          'step_s_p90', 'step_s_min', 'steps_timed', 'img_per_sec', 'img_per_sec_per_core',
          'model_tflops_per_step', 'tflops_per_sec_per_device',
          'matmul_peak_tflops_per_device', 'matmul_peak_size', 'mfu_vs_measured_matmul',
          'peak_memory_gib', 'peak_memory_kind', 'cpu_s_per_step_median',
          'page_faults_per_step_median', 'host_allocator', 'host_huge_pages_gib')


# `python -m vit_jax.bench` in an interpreter where TensorFlow cannot be imported, as on an
# accelerator host that has jax but not TensorFlow (the device image lent to this project).
_WITHOUT_TENSORFLOW = """
import runpy, sys
class BlockTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(name + ' is blocked by test_bench')
sys.meta_path.insert(0, BlockTensorFlow())
runpy.run_module('vit_jax.bench', run_name='__main__', alter_sys=True)
"""


def _bench(*args: str, without_tensorflow: bool = False) -> dict:
  command = ['-c', _WITHOUT_TENSORFLOW] if without_tensorflow else ['-m', 'vit_jax.bench']
  out = subprocess.run([sys.executable, *command, *TINY, '--steps=2', '--warmup=1', '--json',
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('what', ['train', 'eval'])
def test_bench_prints_sane_json(what):
  # Timing a step reads no dataset, so it needs no TensorFlow (only --what=data does).
  result = _bench(f'--what={what}', without_tensorflow=what == 'train')
  assert set(FIELDS) <= set(result), set(FIELDS) - set(result)
  assert result['what'] == what and result['model'] == 'ViT-Mu_4' and result['batch'] == 8
  assert result['steps_timed'] == 2
  assert result['img_per_sec'] > 0 and result['step_s_median'] > 0
  assert result['step_s_p90'] >= result['step_s_median'] >= result['step_s_min'] > 0
  assert result['matmul_peak_tflops_per_device'] > 0
  assert result['matmul_peak_size'] in benchmark.CPU_PEAK_SIZES
  assert 0 < result['mfu_vs_measured_matmul'] < 1.5
  # The forced CPU devices of one process share its cores, as the matmul probe does: FLOP/s
  # are the process's, however many devices the step is sharded over.
  assert result['devices'] == 8
  assert result['tflops_per_sec_per_device'] == pytest.approx(
      result['model_tflops_per_step'] / result['step_s_median'])
  assert result['cpu_s_per_step_median'] > 0
  # CPU-only Linux: vit_jax.host_allocator applies (huge pages where the kernel gives them).
  assert result['host_allocator'] in ('kept', 'kept, huge pages')
  if result['host_allocator'] == 'kept, huge pages':  # (THP mode `always` gives some unasked.)
    assert result['host_huge_pages_gib'] > 0
  # The model's own FLOPs for 8 images: the forward pass x 3 for training, x 1 for eval.
  config = config_files.get_config('vit_ti16')
  config.model, config.image_size = 'ViT-Mu_4', 32
  forward = forward_flops(experiment.build(config).model, 32, 32)
  assert result['model_tflops_per_step'] == pytest.approx(
      (3 if what == 'train' else 1) * forward * 8 / 1e12, rel=1e-9)


def test_bench_profile_traces_the_step_and_names_its_top_ops(tmp_path):
  result = _bench('--what=train', f'--profile_dir={tmp_path}', '--profile_steps=2')
  assert result['trace'].startswith(str(tmp_path)) and os.path.exists(result['trace'])
  assert profiling.traced_steps(result['trace'], 'jit_train_step') == 2
  rows = result['top_ops']
  assert len(rows) == 20 and sum(row['share'] for row in rows) <= 1 + 1e-9
  assert {row['direction'] for row in rows} == {'forward', 'backward', 'other'}
  # Every op of the differentiated objective is named by its model scope, or as the loss's,
  # transforms and layer index stripped (an op XLA combined from several, the gradients'
  # all-reduce, by its first).
  for row in rows:
    if row['direction'] != 'other':
      assert row['scope'].split(': ')[-1].startswith(('VisionTransformer/', 'loss/')), row
    assert 'jvp(' not in row['scope'] and not re.search(r'encoderblock_\d', row['scope'])
  assert len({(row['direction'], row['scope']) for row in rows}) == len(rows)


def test_matmul_peak_probe_counts_its_flops():
  # pylint: disable-next=protected-access
  peak, _, flops, size = benchmark._peak_of(jnp.float32, 256, repeats=2)
  assert peak > 0 and size == 256 and flops % (2 * 256**3) == 0  # a whole number of products
  probe, flops = benchmark._matmul_probe(jnp.float32, 1024)  # pylint: disable=protected-access
  assert flops == 2 * 1024**3 * 8 and len(probe()) == 8


def test_training_logs_flops_per_device_as_the_bench_does():
  """The loop's perf/tflops_per_device divided by the 8 forced CPU devices, the bench's by the
  process whose cores they share: 8x apart for the same step rate."""
  row = perf.throughput_metrics(images=128, seconds=0.5, flops_per_image=1e9)
  assert row['perf/tflops_per_device'] == pytest.approx(128 / 0.5 * 1e9 / 1e12)


def test_accelerator_flops_and_mfu_are_per_device(monkeypatch):
  # Four GPUs at 0.5 TFLOP/s in all are 0.125 each; on an H100 (989 nominal bf16) that is its MFU.
  monkeypatch.setattr(perf, 'compute_units', lambda: 4)
  monkeypatch.setattr(perf, 'cores', lambda: 4)
  monkeypatch.setattr(perf, 'device_peak_tflops', lambda: 989.)
  row = perf.throughput_metrics(images=1000, seconds=2.0, flops_per_image=1e9)
  assert row['perf/tflops_per_device'] == pytest.approx(0.125)
  assert row['perf/img_per_sec_per_core'] == pytest.approx(125)
  assert row['perf/mfu'] == pytest.approx(0.125 / 989)


def test_throughput_counts_images_after_the_warm_up_batch():
  def batches():
    time.sleep(1.0)  # The warm-up batch (a pipeline's start-up): not timed.
    while True:
      time.sleep(0.02)
      yield {'image': np.zeros((4, 2, 2, 1))}
  img_per_sec = benchmark.measure_throughput(batches(), num_batches=10)
  assert 60 < img_per_sec <= 200  # 4 images per >= 20 ms; with the warm-up it would be < 40.


def test_bench_data_reads_the_configs_dataset(prepared_data_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.bench', '--config=configs/default.py', '--what=data',
       '--config.dataset=digits', f'--config.data_dir={prepared_data_dir}',
       '--config.image_size=16', '--config.batch=32', '--steps=7', '--json'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert (result['what'], result['dataset'], result['image_size'], result['batch'],
          result['batches_timed']) == ('data', 'digits', 16, 32, 7)
  assert result['img_per_sec'] > 0
  assert result['img_per_sec_per_core'] == pytest.approx(result['img_per_sec'] / perf.cores())


def test_bench_data_checks_the_config_first():
  """It was TensorFlow's traceback of a negative dimension."""
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.bench', '--config=configs/default.py', '--what=data',
       '--config.image_size=-1'], cwd=ROOT, capture_output=True, text=True, timeout=600,
      check=False)
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.strip().splitlines()[-1] == 'error: config.image_size=-1 must be positive'


@pytest.mark.parametrize('args,line', [
    # Ignored before.
    (['--what=data', '--warmup=7', '--num_classes=3'], '--what=data times the input pipeline '
     'alone: drop --warmup, --num_classes (for --what=train or eval)'),
    (['--profile_steps=4'], '--profile_steps counts the steps traced into --profile_dir: pass '
     'that too')])
def test_bench_flags_that_would_do_nothing_are_refused(args, line):
  out = subprocess.run([sys.executable, '-m', 'vit_jax.bench', *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.strip().splitlines() == [f'error: {line}']


def test_eval_bench_memory_is_the_steps_own(monkeypatch):
  """Read without an optimizer state beside the params (it was built: Adam's two moments, twice
  the params' bytes) and before the matmul probe's arrays exist (a 4096^2 probe is 64 MiB of
  float32 beside a model of a few MiB)."""
  config = config_files.get_config('vit_ti16')
  config.model, config.image_size, config.batch_eval = 'ViT-Mu_4', 32, 8
  exp = experiment.build(config)

  def no_train_state(*_):
    raise AssertionError('the eval bench built a train state')
  monkeypatch.setattr(experiment.Experiment, 'init_state', no_train_state)
  events = []

  def recorded(name, fn):
    def wrapped(*args):
      events.append(name)
      return fn(*args)
    return wrapped
  monkeypatch.setattr(benchmark, '_peak_sizes', lambda: (256,))
  monkeypatch.setattr(benchmark, '_matmul_probe', recorded('probe', benchmark._matmul_probe))
  monkeypatch.setattr(benchmark, 'peak_memory_bytes',
                      recorded('memory', benchmark.peak_memory_bytes))
  params = exp.init_params()
  assert jax.tree.map(lambda x: (x.shape, x.sharding), params) == jax.tree.map(
      lambda x: (x.shape, x.sharding), exp.abstract_state.params)
  result = benchmark.bench_step(exp, 'eval', steps=1, warmup=1)
  assert (result['what'], result['batch'], result['steps_timed']) == ('eval', 8, 1)
  assert events == ['memory', 'probe']


def test_bench_measures_the_matmul_peak_in_the_models_dtype():
  """MFU's denominator is a matmul in the dtype the model's products use (a float16 model was
  measured against a float32 peak)."""
  result = _bench('--what=eval', '--config.dtype=float16')
  assert result['dtype'] == result['matmul_peak_dtype'] == 'float16'


def test_bench_unwritable_profile_dir_is_one_line_before_compiling(tmp_path):
  """Not the profiler's traceback once every step has been timed."""
  (tmp_path / 'file').write_text('')
  file = tmp_path / 'file'
  for where, line in (
      (file, f'--profile_dir {file} is a file: pass a directory (made if missing)'),
      (file / 'sub', f'--profile_dir {file}/sub is inside {file}, which is a file: pass a '
                     'directory (made if missing)')):
    start = time.monotonic()
    out = subprocess.run([sys.executable, '-m', 'vit_jax.bench', *TINY, f'--profile_dir={where}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 2 and out.stdout == ''
    assert out.stderr.strip().splitlines()[-1] == f'error: {line}'
    assert 'Traceback' not in out.stderr and time.monotonic() - start < 60


@pytest.mark.parametrize('args,line', [
    (['eval'], "unexpected arguments ['eval']: flags take the form --name=value"),
    # A trace of no steps had an empty top-ops table.
    (['--profile_steps=0'], 'flag --profile_steps=0: 0 is not a positive integer'),
])
def test_bench_stray_arguments_and_an_empty_trace_are_one_line(args, line, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'vit_jax.bench', *TINY, *args,
                        f'--profile_dir={tmp_path / "trace"}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.strip().splitlines() == [f'error: {line}']
  assert not (tmp_path / 'trace').exists()
