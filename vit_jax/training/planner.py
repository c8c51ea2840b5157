"""Plans a pod run before paying for it: per-device memory, FLOPs and time of the train step.

The step compiled is the very one `main` runs (`Experiment.jit_train_step`, same mesh, same
shardings, donated state), lowered on abstract inputs (`jax.ShapeDtypeStruct`s carrying their
shardings), so nothing is allocated and no dataset is read. Memory comes from XLA's
`memory_analysis()` of the compiled per-device program; params and optimizer state are split
by summing the per-device shard sizes of the abstract state's leaves.

Caveat: on simulated CPU devices the figures are XLA:CPU's. Argument sizes (params, optimizer
state, batch) are exact for any backend; temp (activations) depends on the backend's fusion,
layouts and scheduling, and XLA:CPU computes bfloat16 in float32 (measured: the same temp for
either dtype), so with a bfloat16 model a TPU needs less. The largest batch is thus a lower
bound. Run the planner on the real host (without --devices) for that backend's own figures.
"""
import dataclasses
import math
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from vit_jax import sharding
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError
from vit_jax.training import experiment

GIB = 2**30
MAX_REFINES = 5  # Compiles spent homing in on the largest batch after the first two.


@dataclasses.dataclass
class StepMemory:
  """Per-device bytes of one compiled train step (XLA's memory_analysis)."""
  per_device_batch: int
  argument: int
  output: int
  alias: int  # Outputs written in place of donated inputs (the train state).
  temp: int  # Activations and other scratch.
  code: int

  @property
  def peak(self) -> int:
    """Everything live at once, counting donated buffers once."""
    return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass
class Plan:
  """The planner's findings, as printed by `format_plan` or as JSON."""
  model: str
  devices: int
  platform: str
  mesh: dict[str, int]
  batch: int
  per_device_batch: int
  accum_steps: int
  num_params: int
  params_bytes: int  # Per device, from the shardings.
  opt_state_bytes: int  # Per device, from the shardings.
  batch_bytes: int  # Per device.
  memory: StepMemory
  model_flops_per_step: float  # 3 x analytic forward x batch.
  xla_flops_per_step: float  # cost_analysis() of the per-device program x devices.
  averaged_params_bytes: int = 0  # Per device: the Polyak average (config.polyak_decay > 0).
  xla_flops_note: str = ''
  memory_note: str = ''
  unsplit_note: str = ''  # Params the mesh was meant to split but cannot.
  device_memory_bytes: Optional[int] = None
  fits: Optional[bool] = None
  max_per_device_batch: Optional[int] = None
  max_batch_note: str = ''
  peak_tflops: Optional[float] = None
  mfu: Optional[float] = None
  step_seconds: Optional[float] = None
  total_steps: int = 0
  total_days: Optional[float] = None
  compiles: int = 0
  compile_seconds: float = 0.0

  @property
  def max_batch(self) -> Optional[int]:
    """The global batch of `max_per_device_batch`."""
    if self.max_per_device_batch is None:
      return None
    return self.max_per_device_batch * self.batch // self.per_device_batch

  @property
  def memory_used(self) -> Optional[float]:
    """The step's peak as a fraction of `device_memory_bytes`, where given."""
    return self.memory.peak / self.device_memory_bytes if self.device_memory_bytes else None

  def as_dict(self) -> dict[str, Any]:
    """The fields and the figures the report derives from them (what --json prints)."""
    result = dataclasses.asdict(self)
    result['memory']['peak'] = self.memory.peak
    result.update(max_batch=self.max_batch, memory_used=self.memory_used)
    return result


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def abstract_batch(exp: experiment.Experiment, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """What the input pipeline yields, as shapes: float32 images, int32 (or mixup soft) labels."""
  spec = sharding.batch_sharding(exp.mesh)
  mixup = pp_options.from_config(exp.config, 'train')['mixup']
  label = ((batch, exp.num_classes), np.float32) if mixup else ((batch,), np.int32)
  return {'image': jax.ShapeDtypeStruct((batch,) + exp.image_shape, np.float32, sharding=spec),
          'label': jax.ShapeDtypeStruct(*label, sharding=spec)}


class Compiler:
  """Compiles the train step for a config at any per-device batch, counting the cost."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    self.config, self.num_classes = config, num_classes
    self.compiles, self.seconds = 0, 0.0

  def build(self, per_device_batch: int) -> experiment.Experiment:
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.batch = per_device_batch * self.data_parallel()
      config.batch_eval = config.batch  # Eval is not planned; its batch must not stop us.
    return experiment.build(config, num_classes=self.num_classes)

  def data_parallel(self) -> int:
    sizes = sharding.resolve_mesh_shape(self.config.get('mesh', 'data:-1'), jax.device_count())
    return int(np.prod([sizes[axis] for axis in sharding.BATCH_AXES]))

  def compile(self, per_device_batch: int) -> tuple[experiment.Experiment, Any, StepMemory]:
    exp = self.build(per_device_batch)
    start = time.perf_counter()
    compiled = exp.jit_train_step().lower(exp.abstract_state,
                                          abstract_batch(exp, exp.config.batch)).compile()
    self.compiles, self.seconds = self.compiles + 1, self.seconds + time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
      raise ConfigError(f'the {jax.default_backend()} backend reports no memory analysis: '
                        'plan with simulated CPU devices (--devices=N)')
    return exp, compiled, StepMemory(
        per_device_batch, stats.argument_size_in_bytes, stats.output_size_in_bytes,
        stats.alias_size_in_bytes, stats.temp_size_in_bytes,
        stats.generated_code_size_in_bytes)


def xla_flops(compiled: Any) -> float:
  """FLOPs of the compiled per-device program; loop bodies (scan) count once."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get('flops', 0.0))


def cpu_memory_notes(config: ml_collections.ConfigDict, model: Any) -> list[str]:
  """Where XLA:CPU's temp (activations) misleads about an accelerator's; none off CPU."""
  if jax.default_backend() != 'cpu':
    return []
  notes = []
  if config.get('dtype', 'float32') != 'float32':
    notes.append(f'XLA:CPU computes {config.dtype} in float32, so temp is a float32 figure: '
                 'expect a TPU\'s activations at up to about half of it')
  if model.remat != 'none' and not model.scan:
    # Measured (jax 0.10.2): ViT-B/16's step had the same temp with remat none, full and dots
    # unrolled (1.06 GiB), and 1.06 -> 0.65 GiB (none -> full) scanned.
    notes.append(f"remat='{model.remat}' without scan saves no memory on XLA:CPU, whose "
                 'scheduler recomputes the layers before the backward pass, so temp is that of '
                 'no remat: plan with --config.model_overrides.scan=True to see what remat saves')
  return notes


def largest_batch(compiler: Compiler, first: StepMemory, capacity: int,
                  multiple: int) -> tuple[int, str]:
  """The largest per-device batch (a multiple of `multiple`) whose peak fits `capacity`.

  Peak memory is close to linear in the batch (activations grow with it, the state does not),
  so a line through two compiles predicts the answer. Each prediction is compiled and the line
  redrawn through the nearest fitting and overflowing batches (regula falsi with the Illinois
  fix, so a curved peak cannot stall it), at most MAX_REFINES times.
  """
  peaks = {first.per_device_batch: first.peak}

  def measure(batch: int) -> float:
    peaks[batch] = compiler.compile(batch)[2].peak
    return peaks[batch] - capacity

  start = first.per_device_batch
  other = 2 * start if first.peak <= capacity else start // 2 // multiple * multiple
  if other >= multiple:
    measure(other)
  residuals = {b: p - capacity for b, p in peaks.items()}
  lo = max(((b, r) for b, r in residuals.items() if r <= 0), default=None)  # Fits.
  hi = min(((b, r) for b, r in residuals.items() if r > 0), default=None)  # Overflows.
  last_fit = None
  for _ in range(MAX_REFINES):
    if len(residuals) < 2 or (lo and hi and hi[0] - lo[0] <= multiple):
      break
    (b1, r1), (b2, r2) = (lo, hi) if lo and hi else sorted(
        sorted(residuals.items(), key=lambda br: abs(br[1]))[:2])
    if b1 == b2 or (r2 - r1) / (b2 - b1) <= 0:
      break
    guess = max(int(b1 - r1 * (b2 - b1) / (r2 - r1)) // multiple * multiple,
                lo[0] + multiple if lo else multiple)
    if hi:
      guess = min(guess, hi[0] - multiple)
    if guess < multiple or guess in peaks:
      break
    residuals[guess] = measure(guess)
    fits = residuals[guess] <= 0
    if fits:
      lo = (guess, residuals[guess])
    else:
      hi = (guess, residuals[guess])
    if lo and hi and fits == last_fit:  # The other end stuck twice: halve its weight.
      hi, lo = ((hi[0], hi[1] / 2), lo) if fits else (hi, (lo[0], lo[1] / 2))
    last_fit = fits
  best = lo[0] if lo else 0
  tried = ', '.join(str(b) for b in sorted(peaks))
  if not best:
    return 0, f'none of the per-device batches compiled ({tried}) fits'
  exact = best + multiple in peaks
  return best, (f'compiled at per-device batch {tried}; the largest fitting is {best}'
                + (f' and {best + multiple} does not' if exact else
                   f' ({best + multiple} not compiled: the search stopped)'))


def plan(config: ml_collections.ConfigDict, *, num_classes: Optional[int] = None,
         device_memory_gib: Optional[float] = None, peak_tflops: Optional[float] = None,
         mfu: float = 0.5, search: bool = True) -> Plan:
  """Compiles the config's train step for the current devices and sizes up the run."""
  num_classes = num_classes or config.get('num_classes')
  if not num_classes:
    raise ConfigError('the config has no num_classes and the planner does not read datasets: '
                      'pass --num_classes=N (or set config.num_classes in the config file)')
  if not 0 < mfu <= 1:
    raise ConfigError(f'--mfu={mfu} must be in (0, 1]')
  for name, value in (('device_memory_gib', device_memory_gib), ('peak_tflops', peak_tflops)):
    if value is not None and not (math.isfinite(value) and value > 0):
      raise ConfigError(f'--{name}={value} must be a positive number')
  experiment.check_config(config)
  compiler = Compiler(config, num_classes)
  experiment.check_batch(config, sharding.make_mesh(config.get('mesh', 'data:-1')),
                         eval_too=False)  # Eval is not planned.
  dp, accum = compiler.data_parallel(), config.get('accum_steps', 1)
  exp, compiled, memory = compiler.compile(config.batch // dp)
  state = exp.abstract_state
  result = Plan(
      model=config.model, devices=jax.device_count(), platform=jax.default_backend(),
      mesh=dict(exp.mesh.shape), batch=config.batch, per_device_batch=config.batch // dp,
      accum_steps=accum, num_params=sum(x.size for x in jax.tree.leaves(state.params)),
      params_bytes=shard_bytes(state.params), opt_state_bytes=shard_bytes(state.opt_state),
      batch_bytes=shard_bytes(abstract_batch(exp, config.batch)), memory=memory,
      model_flops_per_step=float(exp.flops_per_image) * config.batch,
      xla_flops_per_step=xla_flops(compiled) * jax.device_count(),
      total_steps=config.total_steps,
      averaged_params_bytes=shard_bytes(getattr(state, 'averaged_params', {})))
  result.unsplit_note = sharding.unsplit_note(state.params, exp.mesh) or ''
  result.memory_note = '; '.join(cpu_memory_notes(config, exp.model))
  loops = [name for name, on in (('scan', exp.model.scan), ('accum_steps', accum > 1)) if on]
  if loops:
    result.xla_flops_note = (f'XLA counts a loop body once, so with {" and ".join(loops)} its '
                             'figure is low by about the trip count')
  if device_memory_gib:
    result.device_memory_bytes = int(device_memory_gib * GIB)
    result.fits = memory.peak <= result.device_memory_bytes
    if search:
      result.max_per_device_batch, result.max_batch_note = largest_batch(
          compiler, memory, result.device_memory_bytes, accum)
  if peak_tflops:
    result.peak_tflops, result.mfu = peak_tflops, mfu
    result.step_seconds = result.model_flops_per_step / (
        result.devices * peak_tflops * 1e12 * mfu)
    result.total_days = result.step_seconds * config.total_steps / 86400
  result.compiles, result.compile_seconds = compiler.compiles, compiler.seconds
  return result


def _gib(n: float) -> str:
  return f'{n / GIB:8.2f} GiB' if n >= GIB / 10 else f'{n / 2**20:8.2f} MiB'


def format_plan(p: Plan) -> str:
  """The human-readable report."""
  mesh = ' '.join(f'{k}={v}' for k, v in p.mesh.items())
  m = p.memory
  lines = [
      f'{p.model} ({p.num_params / 1e6:.1f}M params) on {p.devices} {p.platform} devices, '
      f'mesh {mesh}',
      f'batch {p.batch} = {p.per_device_batch} per device'
      + (f' in {p.accum_steps} micro-batches' if p.accum_steps > 1 else ''),
      f'per-device memory (XLA {p.platform} compile of the train step):',
      f'  parameters       {_gib(p.params_bytes)}',
      f'  optimizer state  {_gib(p.opt_state_bytes)}',
      *([f'  Polyak average   {_gib(p.averaged_params_bytes)}'] if p.averaged_params_bytes else []),
      f'  batch            {_gib(p.batch_bytes)}',
      f'  activations/temp {_gib(m.temp)}',
      f'  peak             {_gib(m.peak)}  (arguments {_gib(m.argument).strip()} + outputs '
      f'{_gib(m.output).strip()} - donated {_gib(m.alias).strip()} + temp)',
  ]
  if p.memory_note:
    lines.append(f'  ({p.memory_note})')
  if p.unsplit_note:
    lines.append(f'  params {p.unsplit_note}')
  if p.device_memory_bytes:
    verdict = 'fits' if p.fits else 'does NOT fit'
    lines.append(f'  device memory    {_gib(p.device_memory_bytes)}  {verdict} '
                 f'({100 * p.memory_used:.0f}% used)')
  if p.max_per_device_batch is not None:
    lines.append(f'largest per-device batch that fits: {p.max_per_device_batch} (global '
                 f'{p.max_batch}); '
                 f'{p.max_batch_note}')
  ratio = p.xla_flops_per_step / p.model_flops_per_step if p.model_flops_per_step else 0
  lines.append(f'FLOPs per step: model (3 x forward x batch) {p.model_flops_per_step:.3e}; '
               f'XLA cost analysis {p.xla_flops_per_step:.3e} ({ratio:.2f}x)'
               + (f'; {p.xla_flops_note}' if p.xla_flops_note else ''))
  if p.step_seconds is not None:
    lines.append(f'at {p.peak_tflops:g} TFLOP/s per device and MFU {p.mfu:g}: '
                 f'{p.step_seconds:.3f} s/step; {p.total_steps} steps = {p.total_days:.2f} days')
  lines.append(f'({p.compiles} compile{"s" * (p.compiles != 1)}, {p.compile_seconds:.0f} s)')
  return '\n'.join(lines)
