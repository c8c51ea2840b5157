"""Honest speed figures for the real train / eval step and the input pipeline.

The steps timed are the ones `main` runs (same `Experiment`, same jit, same shardings) on
synthetic inputs of the right shape. Every timed step ends in `block_until_ready`, so the
figures are wall-clock step times, not dispatch times. MFU is given against the device's
nominal peak where known and against a matmul peak measured on the spot with the same dtype.
"""
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.data import input_pipeline
from vit_jax.training import perf
from vit_jax.training.experiment import Experiment

WHATS = ('train', 'eval', 'data')


def measure_matmul_peak(dtype: Any, size: int = 0, repeats: int = 10) -> float:
  """Achieved TFLOP/s of one large square matmul: the practical ceiling for this device."""
  size = size or (2048 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times) / 1e12


def peak_memory_bytes() -> tuple[int, str]:
  """Peak device memory where the runtime reports it, else the process's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host RSS'


def _synthetic_batch(exp: Experiment, batch: int, with_mask: bool) -> dict:
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()
  host = {'image': rng.uniform(-1, 1, (local,) + exp.image_shape).astype(np.float32),
          'label': rng.integers(0, exp.num_classes, local).astype(np.int32)}
  if with_mask:
    host['mask'] = np.ones(local, bool)
  sharding = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host)


def _time_steps(run: Callable[[], Any], warmup: int, steps: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return times


def bench_step(exp: Experiment, what: str, steps: int = 20, warmup: int = 3) -> dict:
  """Compile time, step-time median / p90, images/s, TFLOP/s, MFU and peak memory."""
  config = exp.config
  batch_size = config.batch if what == 'train' else config.get('batch_eval', config.batch)
  batch = _synthetic_batch(exp, batch_size, with_mask=what == 'eval')
  state = exp.init_state()
  start = time.perf_counter()
  if what == 'train':
    compiled = exp.jit_train_step().lower(state, batch).compile()
    holder = [state]

    def run():
      holder[0], metrics = compiled(holder[0], batch)
      return metrics
    flops_per_image = exp.flops_per_image
  else:
    compiled = exp.jit_eval_step().lower(state.params, batch).compile()
    run = lambda: compiled(state.params, batch)
    flops_per_image = exp.flops_per_image // 3
  compile_s = time.perf_counter() - start
  times = _time_steps(run, warmup, steps)
  median = statistics.median(times)
  tflops_per_step = flops_per_image * batch_size / 1e12
  dtype = jnp.bfloat16 if config.get('dtype', 'float32') == 'bfloat16' else jnp.float32
  matmul_peak = measure_matmul_peak(dtype)
  achieved = tflops_per_step / median / jax.device_count()
  memory, memory_kind = peak_memory_bytes()
  result = {
      'what': what, 'model': config.model, 'batch': batch_size,
      'image_size': config.image_size, 'dtype': config.get('dtype', 'float32'),
      'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'cores': perf.cores(), 'compile_s': compile_s, 'step_s_median': median,
      'step_s_p90': float(np.percentile(times, 90)), 'steps_timed': len(times),
      'img_per_sec': batch_size / median, 'img_per_sec_per_core': batch_size / median /
      perf.cores(), 'model_tflops_per_step': tflops_per_step,
      'tflops_per_sec_per_device': achieved,
      'matmul_peak_tflops_per_device': matmul_peak, 'mfu_vs_measured_matmul': achieved /
      matmul_peak, 'peak_memory_gib': memory / 2**30, 'peak_memory_kind': memory_kind}
  nominal = perf.device_peak_tflops()
  if nominal:
    result['nominal_peak_tflops'] = nominal
    result['mfu_vs_nominal'] = achieved / nominal
  return result


def bench_data(config: ml_collections.ConfigDict, batches: int = 50) -> dict:
  """Images/s of the training input pipeline alone, with the config's augmentation."""
  iterator = input_pipeline.make_train_iterator(
      dataset=config.dataset, split=config.get('train_split', 'train'),
      data_dir=config.get('data_dir'), global_batch=config.batch, image_size=config.image_size,
      channels=config.get('channels', 3), pp=config.get('pp', ml_collections.ConfigDict()),
      seed=config.get('seed', 0))
  img_per_sec = input_pipeline.measure_throughput(iterator, batches)
  return {'what': 'data', 'dataset': config.dataset, 'image_size': config.image_size,
          'batch': config.batch, 'img_per_sec': img_per_sec,
          'img_per_sec_per_core': img_per_sec / perf.cores()}
