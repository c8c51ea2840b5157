"""Honest speed figures for the real train / eval step and the input pipeline.

The steps timed are the ones `main` runs (same `Experiment`, same jit, same shardings) on
synthetic inputs of the right shape. Every timed step ends in `block_until_ready`, so the
figures are wall-clock step times, not dispatch times. MFU is given against the device's
nominal peak where known and against a matmul peak measured on the spot with the same dtype:
the best of a few square sizes, timed right after every timed step, its best run taken, so that
on a shared machine the denominator is a true ceiling measured alongside the steps.
"""
import functools
import itertools
import resource
import statistics
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import vit_jax
from vit_jax import host_allocator
from vit_jax.data import global_batch
from vit_jax.models import matmul
from vit_jax.training import experiment
from vit_jax.training import perf
from vit_jax.training import profiling
from vit_jax.training.experiment import Experiment

WHATS = ('train', 'eval', 'data')


# Square matmul sizes tried for the peak. On CPU the best size is not the largest one (YNNPACK
# reached ~95 GFLOP per CPU-second at 1024, ~87 at 2048 and ~83 at 4096 on a 2-core EPYC), so
# the peak is the best of several; on accelerators one large size saturates the units.
CPU_PEAK_SIZES = (1024, 2048, 4096)
ACCELERATOR_PEAK_SIZES = (8192,)


def _matmul_probe(dtype: Any, size: int) -> tuple[Callable[[], Any], float]:
  """A compiled, warmed-up `size`^2 matmul run back to back (>= 2 * 2048^3 FLOPs) and its FLOPs."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  # The product as the model computes it (bfloat16 on CPU accumulates in float32:
  # vit_jax.models.matmul).
  compiled = jax.jit(functools.partial(matmul.einsum_for(dtype), 'ij,jk->ik')).lower(a, a).compile()
  jax.block_until_ready(compiled(a, a))
  repeat = max(1, (2048 // size)**3)
  return (lambda: [compiled(a, a) for _ in range(repeat)]), 2 * size**3 * repeat


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _timed_with_cpu(fn: Callable[[], Any]) -> tuple[float, float, int]:
  """(wall seconds, this process's CPU seconds (all threads), minor page faults) of one call."""
  cpu, faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  wall = _timed(fn)
  return (wall, time.process_time() - cpu,
          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def _peak_sizes() -> tuple[int, ...]:
  return CPU_PEAK_SIZES if jax.default_backend() == 'cpu' else ACCELERATOR_PEAK_SIZES


def _peak_of(dtype: Any, size: int, repeats: int) -> tuple[float, Callable[[], Any], float, int]:
  """(best TFLOP/s over `repeats`, the probe, its FLOPs, size) for one matmul size."""
  probe, flops = _matmul_probe(dtype, size)
  return flops / min(_timed(probe) for _ in range(repeats)) / 1e12, probe, flops, size


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
  return global_batch.to_global(host, exp.mesh)


def _time_steps(run: Callable[[], Any], steps: int,
                probe: Optional[Callable[[], Any]] = None) -> tuple[list, list]:
  """(wall, CPU) seconds of each step, and wall seconds of `probe` run right after each step."""
  times, probe_times = [], []
  for _ in range(steps):
    times.append(_timed_with_cpu(run))
    if probe is not None:
      probe_times.append(_timed(probe))
  return times, probe_times


def _compiled_step(exp: Experiment, what: str, batch: Any,
                   compiler_options: Optional[dict] = None) -> tuple[Any, Callable[[], Any]]:
  """The train or eval step compiled for `batch`, and a call of it on fresh params; train steps
  carry their state from call to call (they donate it). An eval step gets the params alone, so
  that the peak memory is an eval's, without an optimizer state."""
  if what == 'eval':
    params = exp.init_params()
    compiled = exp.jit_eval_step().lower(params, batch).compile(compiler_options)
    return compiled, lambda: compiled(params, batch)
  state = exp.init_state()
  compiled = exp.jit_train_step().lower(state, batch).compile(compiler_options)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics
  return compiled, run


def bench_step(exp: Experiment, what: str, steps: int = 20, warmup: int = 3,
               profile_dir: Optional[str] = None, profile_steps: int = 3) -> dict:
  """Compile time, step-time median / p90, images/s, TFLOP/s, MFU and peak memory (read after
  the `warmup` untimed steps, at least 1, before the matmul probe's arrays exist); with
  `profile_dir`, also a trace of `profile_steps` more steps there and its top ops (`top_ops`)."""
  if warmup < 1:
    raise ValueError(f'warmup={warmup}: the peak memory is read after at least 1 untimed step')
  config = exp.config
  batch_size = config.batch if what == 'train' else config.get('batch_eval', config.batch)
  batch = _synthetic_batch(exp, batch_size, with_mask=what == 'eval')
  start = time.perf_counter()
  compiled, run = _compiled_step(exp, what, batch)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(run())
  memory, memory_kind = peak_memory_bytes()
  flops_per_image = exp.flops_per_image if what == 'train' else exp.flops_per_image // 3
  # The MFU denominator: the best matmul size is picked first, then that matmul is timed after
  # every step, so that it samples the same machine as the steps (on a shared CPU the load
  # drifts), and its best run is the peak: a ceiling, which load can lower MFU under, not raise.
  # In the model's compute dtype (config.dtype, or model_overrides.dtype where set; float16 too).
  dtype = jnp.dtype(getattr(exp.model, 'dtype', None) or jnp.float32)
  first_peak, probe, probe_flops, peak_size = max(
      (_peak_of(dtype, n, repeats=3) for n in _peak_sizes()), key=lambda peak: peak[0])
  timed, probe_timed = _time_steps(run, steps, probe)
  times = [wall for wall, _, _ in timed]
  median = statistics.median(times)
  matmul_peak = max(first_peak, probe_flops / min(probe_timed) / 1e12)
  tflops_per_step = flops_per_image * batch_size / 1e12
  achieved = tflops_per_step / median / perf.compute_units()
  result = {
      'what': what, 'model': config.model, 'batch': batch_size,
      'image_size': config.image_size, 'dtype': dtype.name,
      'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'cores': perf.cores(), 'compile_s': compile_s, 'step_s_median': median,
      'step_s_p90': float(np.percentile(times, 90)), 'step_s_min': min(times),
      'steps_timed': len(times),
      'img_per_sec': batch_size / median, 'img_per_sec_per_core': batch_size / median /
      perf.cores(), 'model_tflops_per_step': tflops_per_step,
      'tflops_per_sec_per_device': achieved,
      'matmul_peak_tflops_per_device': matmul_peak, 'matmul_peak_size': peak_size,
      'matmul_peak_dtype': dtype.name,
      'mfu_vs_measured_matmul': achieved / matmul_peak, 'peak_memory_gib': memory / 2**30,
      'peak_memory_kind': memory_kind}
  if jax.default_backend() == 'cpu':
    # CPU seconds of this process (all threads) per step: less swayed by other jobs than wall
    # time, but it counts spinning threads too, so no MFU is computed from it.
    result['cpu_s_per_step_median'] = statistics.median(cpu for _, cpu, _ in timed)
    # Pages the step touched for the first time: each costs kernel time (vit_jax.host_allocator).
    result['page_faults_per_step_median'] = float(statistics.median(
        faults for _, _, faults in timed))  # An int for an odd count, else a float.
    result['host_allocator'] = ('system' if not vit_jax.HOST_ALLOCATOR_TUNED else
                                'kept, huge pages' if vit_jax.HUGE_PAGE_HEAP_BYTES else 'kept')
    result['host_huge_pages_gib'] = host_allocator.huge_pages_bytes() / 2**30
  if jax.default_backend() == 'gpu':
    # Read from the compiled program, so the figure says which attention it measured.
    result['cudnn_attention'] = '__cudnn$fmha' in compiled.as_text()
  nominal = perf.device_peak_tflops()
  if nominal:  # A bf16 figure, whatever the step's dtype: the one chips are sold by.
    result['nominal_peak_tflops'] = nominal
    result['nominal_peak_dtype'] = 'bfloat16'
    result['mfu_vs_nominal'] = achieved / nominal
  if profile_dir:  # After the timed steps, which the profiler would slow.
    if jax.default_backend() == 'gpu':
      # A kernel run in a CUDA graph (XLA's command buffers) is named by the graph, not by its
      # HLO op: the trace is of a copy compiled without them, so its time is not the timed one.
      compiled, run = _compiled_step(exp, what, batch, {'xla_gpu_enable_command_buffer': ''})
    result['trace'] = profiling.trace(run, profile_steps, profile_dir)
    result['top_ops'] = profiling.summarize(result['trace'], compiled.as_text())
  return result


def bench_data(config: ml_collections.ConfigDict, batches: int = 50) -> dict:
  """Images/s of the training input pipeline alone, with the config's augmentation."""
  from vit_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel  # TensorFlow.
  experiment.check_config(config)  # A bad value is one line, not TensorFlow's traceback.
  img_per_sec = measure_throughput(input_pipeline.train_iterator(config), batches)
  return {'what': 'data', 'dataset': config.dataset, 'image_size': config.image_size,
          'batch': config.batch, 'batches_timed': batches, 'img_per_sec': img_per_sec,
          'img_per_sec_per_core': img_per_sec / perf.cores()}


def measure_throughput(iterator: Iterable[dict[str, np.ndarray]], num_batches: int) -> float:
  """Images/s over `num_batches` batches, after one warm-up batch."""
  iterator = iter(iterator)
  next(iterator)
  start = time.perf_counter()
  images = sum(len(batch['image']) for batch in itertools.islice(iterator, num_batches))
  return images / (time.perf_counter() - start)
