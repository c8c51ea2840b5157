"""Profiles of the real step: traces for TensorBoard's profile plugin (XProf), and where the
step's time goes, per XLA op, summarised from the same trace.

The trace of a jitted step holds one event per XLA op (kernel on accelerators, thunk on CPU)
with the op's HLO name. The compiled module's text maps each HLO name to the model scope that
emitted it (its `op_name` metadata), so the summary reads as the model does:
'backward VisionTransformer/Transformer/encoderblock_*/MlpBlock_3/Dense_0/dot_general'.
"""
import collections
import glob
import logging
import os
import re
import statistics
import tempfile
from typing import Any, Callable, Optional

import jax
from jax.profiler import ProfileData

from vit_jax.errors import ConfigError, check_not_a_file

_INSTRUCTION = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_LAYER_INDEX = re.compile(r'(encoderblock_|block|unit)\d+')  # ViT layers, ResNet stages / units.
_TRANSFORMS = re.compile(r'^(?:\w+\()+|\)+$')


def scope_of(op_name: str) -> tuple[str, str]:
  """('forward' | 'backward' | 'other', the model scope without transforms and layer index)
  of an HLO op_name such as 'jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/...';
  'other' is the step's work outside the model (optimizer, clipping, metric sums)."""
  parts = [part.lstrip('(') for part in op_name.split('/')]  # '(' opens a combined op's names.
  if parts and parts[0].startswith(('jit(', 'pjit(')):
    parts = parts[1:]
  # A jitted library function called inside (jax.random.fold_in, jnp.clip) is named by the call
  # site and the function: what follows its name is the name stack of the function's first,
  # cached trace, which may come from another call site (e.g. 'PatchEmbedding.__call__').
  nested = next((i for i, p in enumerate(parts) if p.startswith(('jit(', 'pjit('))), None)
  if nested is not None:
    parts = parts[:nested + 1]
  if any(p.startswith('transpose(') for p in parts):
    direction = 'backward'
  elif any(p.startswith('jvp(') for p in parts) or len(parts) > 1:
    direction = 'forward'
  else:
    direction = 'other'
  parts = [_TRANSFORMS.sub('', p) for p in parts]
  return direction, _LAYER_INDEX.sub(r'\1*', '/'.join(p for p in parts if p))


def op_scopes(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (direction, scope), from a compiled module's `as_text()`.

  An op that XLA made of several (a combined all-reduce of all the gradients) is named by its
  opcode and its first part. A fusion XLA left unnamed takes the name of the computation it
  calls (its root's, else its first named op's); what XLA made itself (a max-pool gradient's
  iotas, some convolutions of the stem's gradient) is 'other', 'made by XLA: <root opcode>'."""
  instructions, computation_names, root_opcodes, computation = [], {}, {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    root, name, opcode = match.groups()
    op_name, calls = _OP_NAME.search(line), _CALLS.search(line)
    # jax's names are name stacks ('jit(train_step)/...'); XLA's own are 'broadcast.209'.
    op_name = op_name.group(1) if op_name and '/' in op_name.group(1) else None
    instructions.append((name, opcode, op_name, calls and calls.group(1)))
    if root:
      root_opcodes[computation] = opcode
    if op_name and (root or computation not in computation_names):
      computation_names[computation] = op_name
  scopes = {}
  for name, opcode, op_name, calls in instructions:
    op_name = op_name or computation_names.get(calls)
    if not op_name:
      scopes[name] = 'other', f'made by XLA: {root_opcodes.get(calls, opcode)}'
      continue
    parts = op_name.split(':')
    direction, scope = scope_of(parts[0])
    if len(parts) > 1:
      scope = f'{opcode} of {len(parts)}: {scope}, ...'
    scopes[name] = direction, scope
  return scopes


def _not_writable(logdir: str) -> Optional[str]:
  """Why a local folder cannot take a trace file (it is made if missing), or None."""
  try:
    os.makedirs(logdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=logdir):
      pass
  except OSError as e:
    return e.strerror or str(e)
  return None


def check_logdir(logdir: str, what: str = '--profile_dir') -> None:
  """A local trace folder is made now and must take a file: one line before anything is
  compiled, not the profiler's error once the steps have run."""
  if '://' in logdir:  # Remote storage: the profiler's own writer reports its errors.
    return
  check_not_a_file(logdir, what)
  reason = _not_writable(logdir)
  if reason:
    raise ConfigError(f'{what}={logdir} is not a writable folder ({reason}): pass a '
                      'folder you can write to (made if missing)')


def trace(run: Callable[[], Any], steps: int, logdir: str) -> str:
  """Runs `run` `steps` times under the profiler; the path of the trace (an .xplane.pb)."""
  jax.block_until_ready(run())  # Nothing of earlier calls runs inside the trace.
  before = set(_traces(logdir))
  with jax.profiler.trace(logdir):
    for _ in range(steps):
      jax.block_until_ready(run())
  new = sorted(set(_traces(logdir)) - before, key=os.path.getmtime)
  if not new:
    raise RuntimeError(f'the profiler wrote no trace under {logdir}')
  return new[-1]


def _traces(logdir: str) -> list[str]:
  return glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.xplane.pb'))


def _module_trace(xplane_path: str, module: str) -> tuple[list[tuple[Any, dict]], set]:
  """(event, stats) of the ops of `module`, and its executions' `run_id`s, in one pass.

  Ops come from the device planes where they hold any (kernels on GPUs, not their launches on
  the host), else from the host's (CPU thunks). A `run_id` is a stat of the ops on CPU and of
  the host's launch of the module on GPUs (whose kernels carry none)."""
  ops, run_ids = [], set()
  for plane in ProfileData.from_file(xplane_path).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if 'run_id' in stats and module in (stats.get('hlo_module'), stats.get('name')):
          run_ids.add(stats['run_id'])
        if stats.get('hlo_module') == module:
          ops.append((plane.name.startswith('/device:'), event, stats))
  on_device = [(event, stats) for device, event, stats in ops if device]
  return on_device or [(event, stats) for _, event, stats in ops], run_ids


def traced_steps(xplane_path: str, module: str) -> int:
  """How many executions of the compiled `module` (e.g. 'jit_train_step') the trace holds."""
  return len(_module_trace(xplane_path, module)[1])


def summarize(xplane_path: str, hlo_text: str, top: int = 20) -> list[dict]:
  """The `top` scopes by op time per traced step: ms, ops per step, share of all ops' time.

  Op times are summed over devices and threads: on CPU, XLA runs independent ops side by side
  on its threads, so their sum can exceed the step's wall time. An event is named by its
  `hlo_op` stat (a GPU kernel's own name is the kernel's); time the module text does not name
  (a kernel run inside a CUDA graph carries the graph's name) is kept, as 'other unattributed',
  so shares stay shares of the whole. Where every op names its step (a `run_id`: CPU), a scope's
  time per step is its median over the traced steps: tracing now and then stalls one CPU
  device's ops for a second, and the mean would charge the wait to the op the other device
  waited in (ViT-Ti/16's gradient all-reduce read 11-16% of the step instead of ~1.5%). GPU
  kernels name no step: their mean.
  """
  scopes, module = op_scopes(hlo_text), _module_name(hlo_text)
  ops, run_ids = _module_trace(xplane_path, module)
  by_step = all('run_id' in stats for _, stats in ops)
  seconds = collections.defaultdict(collections.Counter)  # scope -> step -> seconds
  calls = collections.defaultdict(collections.Counter)
  for event, stats in ops:
    where = scopes.get(stats.get('hlo_op', event.name), ('other', 'unattributed'))
    step = stats['run_id'] if by_step else None
    seconds[where][step] += event.duration_ns / 1e9
    calls[where][step] += 1

  def per_step(counts: collections.Counter) -> float:
    if by_step:
      return statistics.median(counts[run_id] for run_id in run_ids)
    return sum(counts.values()) / len(run_ids)

  step_seconds = {where: per_step(counts) for where, counts in seconds.items()}
  total = sum(step_seconds.values())
  ranked = sorted(step_seconds.items(), key=lambda item: -item[1])[:top]
  return [{'direction': direction, 'scope': scope, 'ms_per_step': s * 1e3,
           'ops_per_step': per_step(calls[(direction, scope)]), 'share': s / total}
          for (direction, scope), s in ranked]


def _module_name(hlo_text: str) -> str:
  match = re.search(r'^HloModule ([\w.\-]+)', hlo_text, re.MULTILINE)
  if not match:
    raise ValueError('not the text of a compiled HLO module')
  return match.group(1)


def format_summary(rows: list[dict]) -> str:
  """The top ops as a table: time per step, count, share of the op time, pass and scope."""
  lines = [f'{"ms/step":>8} {"ops":>5} {"share":>6}  where']
  lines += [f'{r["ms_per_step"]:8.1f} {r["ops_per_step"]:5.0f} {r["share"]:6.1%}  '
            f'{r["direction"]:<8} {r["scope"]}' for r in rows]
  return '\n'.join(lines)


class TrainProfiler:
  """Traces steps `first_step + 1` to `last_step` of the train loop into `logdir`.

  clu's periodic Profile action starts and stops the trace; the loop's device work is
  asynchronous, so the step before each boundary is waited for and the trace holds exactly
  those steps. Process 0 alone traces (processes on one host would share file names).
  """

  def __init__(self, logdir: str, first_step: int, steps: int):
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel  # TensorFlow:
    # imported here, so that the bench, which traces without it, runs where it is not installed.
    self.first_step, self.last_step = first_step, first_step + steps
    self._action = periodic_actions.Profile(
        logdir=logdir, num_profile_steps=steps, profile_duration_ms=None,
        first_profile=first_step, every_steps=None, every_secs=None)

  def __call__(self, step: int, step_outputs: Any) -> None:
    if step in (self.first_step, self.last_step):
      jax.block_until_ready(step_outputs)
    self._action(step)

  def cut_short(self, step: int) -> None:
    """A run stopped (a stop signal) inside the traced steps writes the steps traced so far;
    the process would otherwise end with the trace open and write nothing."""
    if not self.first_step <= step < self.last_step:
      return
    try:
      jax.profiler.stop_trace()
    except RuntimeError:  # The trace did not start; clu logged why.
      return
    logging.warning('the profile was cut short at step %d: it holds %d of the %d steps asked',
                    step, step - self.first_step, self.last_step - self.first_step)


def train_profiler(config: Any, workdir: str, start_step: int) -> Optional[TrainProfiler]:
  """config.profile_steps steps traced after config.profile_skip_steps of this run (at least
  the first, which compiles), as many as the run has; None when off or the run is too short."""
  if not config.get('profile_steps', 0) or jax.process_index() != 0:
    return None
  first = start_step + max(config.get('profile_skip_steps', 5), 1)
  steps = min(config.profile_steps, config.total_steps - first)
  if steps <= 0:
    logging.warning('no profile: the run ends at step %d, before the steps to trace',
                    config.total_steps)
    return None
  logdir = os.path.join(workdir, 'profile')
  reason = None if '://' in logdir else _not_writable(logdir)
  if reason:  # Found now, not at the traced steps (with no checkpoint yet).
    raise ConfigError(f'config.profile_steps cannot write its trace into {logdir} ({reason}): '
                      'move what is there away, or set --config.profile_steps=0')
  return TrainProfiler(logdir, first, steps)
