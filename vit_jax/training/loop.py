"""The pre-training loop: data -> jitted step -> metrics, evaluation and checkpoints.

No host sync on a training step's path except every `progress_every` steps (metrics fetched
as one window) and at checkpoints (the loss is checked finite before a state is saved); the first
step (its compile time), evaluations, few-shot probes and a profile's first and last steps wait
for the device too.
"""
import contextlib
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterable, Optional

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax.checkpoints.manager import Checkpointer, StateStructureChanged
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError, RunStopped, TrainingDiverged, check_not_a_file
from vit_jax.models import matmul
from vit_jax.training import metrics as metrics_lib
from vit_jax.training import perf
from vit_jax.training import profiling
from vit_jax.training import state as state_lib
from vit_jax.training import step as step_lib
from vit_jax.training.experiment import Experiment, build


class _StopSignal:
  """Turns SIGTERM (a TPU preemption notice) and a first Ctrl-C into a flag the loop checks
  between steps, so the run saves and stops; a second Ctrl-C interrupts at once.

  Single process only: with several, a per-process flag would stop them at different steps
  (a hang), so JAX's preemption service keeps SIGTERM and `reached_preemption` agrees a step.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[int] = None  # The signal's number.
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1:
      # A signal ignored when we started (`cmd &` in a script: SIGINT) stays ignored.
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                        if signal.getsignal(s) is not signal.SIG_IGN}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
      logging.warning('Ctrl-C: saving a checkpoint and stopping (Ctrl-C again to stop without '
                      'saving)')
    else:
      logging.warning('SIGTERM received: saving a checkpoint and stopping')
    self.received = signum

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def evaluate(exp: Experiment, eval_step: Callable, params: Any,
             eval_data: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Accuracy (top-1, top-5 when > 5 classes) and loss over every example of the eval split."""
  totals = None
  for batch in global_batch.prefetch_to_mesh(eval_data, exp.mesh):
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)  # No host sync.
  totals = jax.device_get(totals)
  count = float(totals.pop('count'))
  name = eval_name(exp.config)
  return {f'{name}/{k}': float(v) / count for k, v in totals.items()} | {
      f'{name}/examples': count}


def eval_name(config: ml_collections.ConfigDict) -> str:
  """'test' for the test split; 'val' for a held-out slice of the train split (minival)."""
  split = config.get('eval_split', 'test').split('[')[0]
  return 'val' if split == config.get('train_split', 'train').split('[')[0] else split


def make_eval_data(exp: Experiment) -> Iterable[dict[str, np.ndarray]]:
  """The eval split as this process's padded batches, re-iterable for every evaluation."""
  config = exp.config
  return input_pipeline.make_eval_iterator(
      dataset=config.dataset, split=config.get('eval_split', 'test'),
      data_dir=config.get('data_dir'), global_batch=config.get('batch_eval', config.batch),
      image_size=config.image_size, channels=config.get('channels', 3),
      pp=config.get('pp', ml_collections.ConfigDict()))


def config_changes(saved: Optional[dict], config: ml_collections.ConfigDict) -> list[str]:
  """`key: old -> new` for each setting that differs from the checkpoint's config: a resumed run
  takes the new ones (a larger total_steps trains on; a new batch moves the schedule and the
  data position), so they are named rather than taken silently."""
  if not saved:
    return []
  as_saved = json.loads(json.dumps(config.to_dict(), default=str))  # Tuples as JSON keeps them.
  old = flax.traverse_util.flatten_dict(saved, sep='.')
  new = flax.traverse_util.flatten_dict(as_saved, sep='.')
  # A key added to the configs since, set to its off value (polyak_decay) or to the default taken
  # while it was unset (pp.eval.crop_fraction), changes nothing.
  defaults = json.loads(json.dumps(pp_options.defaults_by_key()))  # Tuples as saved: lists.
  added_unchanged = {key for key in new.keys() - old.keys()
                     if not new[key] or (key in defaults and new[key] == defaults[key])}
  return [f'{key}: {old.get(key, "unset")} -> {new.get(key, "unset")}'
          for key in sorted((old.keys() | new.keys()) - added_unchanged)
          if old.get(key) != new.get(key)]


def _restore(checkpointer: Checkpointer, exp: Experiment,
             config: ml_collections.ConfigDict) -> tuple[Any, Optional[dict]]:
  """The newest checkpoint; when none fits this config's state, the error names the settings
  changed since the newest was written, or that none did."""
  try:
    return checkpointer.restore_latest(exp.abstract_state)
  except StateStructureChanged as e:
    resumed = _start_average(checkpointer, exp) if exp.keeps_average else None
    if resumed:
      return resumed
    error = e
  except ConfigError as e:
    error = e
  try:
    saved = checkpointer.restore_meta().get('config')
  except Exception:  # pylint: disable=broad-except
    saved = None
  if saved is None:  # An unreadable meta: the error above stands as it is.
    raise error
  changes = config_changes(saved, config)
  if changes:
    raise ConfigError(f'{error}; changed since the newest: {"; ".join(changes)}') from error
  if isinstance(error, StateStructureChanged):
    raise ConfigError(f'{error}; no setting changed since the newest: the code or the optax or '
                      'flax release that wrote them built another state') from error
  raise error


def _start_average(checkpointer: Checkpointer,
                   exp: Experiment) -> Optional[tuple[Any, dict]]:
  """Averaging turned on since the checkpoint, and nothing else in the state changed: the
  average starts at its params (as a fresh run's starts at the initial ones)."""
  try:
    state, meta = checkpointer.restore_latest(state_lib.without_average(exp.abstract_state))
  except StateStructureChanged:
    return None  # Something else changed too: the first error names it all.
  logging.warning('polyak_decay=%s is new since the checkpoint at step %d: the average starts at '
                  "that step's params", exp.config.polyak_decay, int(state.step))
  return jax.jit(state_lib.with_average, out_shardings=exp.state_shardings)(state), meta


def _polyak_note(decay: float, total_steps: int) -> str:
  """What is kept and evaluated, and where the decay's warm-up keeps it below the one asked
  for all run."""
  note = (f'keeping the Polyak average of the params (polyak_decay={decay}), which evaluations '
          'and the checkpoints\' readers take')
  reached = step_lib.polyak_warmup(total_steps)
  if reached < decay:
    note += (f'; its warm-up, (1 + n) / (10 + n) after n steps, holds the decay below {decay} '
             f'all run: {reached:.5f} at step {total_steps}')
  return note


def _check_finite(loss: float, step: int, last_saved: Optional[int],
                  params_finite: bool = True) -> None:
  """Before a save or an evaluation the params are checked too: the loss is that of the params
  before the step, and a finite gradient times a huge learning rate overflows them."""
  if not (np.isfinite(loss) and params_finite):
    kept = (f'the last good checkpoint (step {last_saved}) is kept' if last_saved is not None
            else 'no checkpoint was written')
    what = f'loss is {loss} at step {step}' if not np.isfinite(loss) else (
        f'the params are not finite after step {step}')
    raise TrainingDiverged(f'{what}; {kept}. Lower base_lr, lengthen warmup_steps or set '
                           'grad_norm_clip')


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Through tf.io.gfile, so a gs:// workdir gets it too (the metrics go the same way); written
  aside and renamed, so a full disk leaves a resumed run's config.json as it was, not empty."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'config.json')
    with tf.io.gfile.GFile(f'{path}.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    tf.io.gfile.rename(f'{path}.tmp', path, overwrite=True)


def _fewshot_evaluator(exp: Experiment):
  """config.fewshot's few-shot probe, or None (imported here: it loads scikit-learn, which runs
  without a probe do not need)."""
  if not exp.config.get('fewshot'):
    return None
  from vit_jax.evaluation import fewshot  # pylint: disable=g-import-not-at-top
  return fewshot.from_experiment(exp)


Evaluation = tuple[int, str, Callable[[Any], dict[str, float]]]  # every, prefix, params -> scalars


def _evaluations(exp: Experiment, eval_step: Callable, fewshot: Any) -> list[Evaluation]:
  """The run's evaluations: the eval split's every eval_every steps, the few-shot probe's every
  fewshot.every steps, each with the prefix of its metrics."""
  evaluations = []
  if exp.config.get('eval_every'):
    eval_data = make_eval_data(exp)
    evaluations.append((exp.config.eval_every, f'{eval_name(exp.config)}/',
                        lambda params: evaluate(exp, eval_step, params, eval_data)))
  if fewshot is not None:
    evaluations.append((exp.config.fewshot.every, 'fewshot/', fewshot.scalars))
  return evaluations


def _due(evaluations: list[Evaluation], step: int, total_steps: int) -> list[Evaluation]:
  return [e for e in evaluations if step % e[0] == 0 or step == total_steps]


def _unfinished(due: list[Evaluation], workdir: str, step: int) -> list[Evaluation]:
  """Those of the evaluations due at a resumed checkpoint's step that wrote no metrics (one
  failed or ran out of memory after the save, or a stop signal skipped them): a rerun makes
  them, even when there is nothing left to train. Process 0's metrics.jsonl decides for all."""
  if not due:
    return []
  written = set()
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() == 0 and tf.io.gfile.exists(path):
    written = {key for row in metrics_lib.read_jsonl(path) if row.get('step') == step
               for key in row}
  missing = np.array([not any(key.startswith(prefix) for key in written)
                      for _, prefix, _ in due])
  missing = multihost_utils.broadcast_one_to_all(missing)
  return [e for e, m in zip(due, missing) if m]


def _run_evaluations(evaluations: list[Evaluation], state: Any, *, step: int, writer: Any,
                     progress: metrics_lib.Progress) -> dict[str, float]:
  scalars = {}
  for _, _, run in evaluations:
    new = run(state_lib.eval_params(state))
    writer.write_scalars(step, new)
    progress.report(step, new)
    scalars |= new
  return scalars


def check_run(config: ml_collections.ConfigDict, workdir: str,
              num_classes: Optional[int] = None) -> None:
  """What needs neither the model nor a pre-trained checkpoint, checked before either is
  built or read: a ConfigError now, not at the first evaluation. The train (and eval) split
  exist, and their labels fit the head when its width is known (a label past the head is an
  all-zero target: silent non-learning), and share no example; the few-shot probe's datasets;
  the workdir."""
  splits = [config.get('train_split', 'train')]
  if config.get('eval_every'):
    splits.append(config.get('eval_split', 'test'))
  for split in splits:
    info = input_pipeline.get_info(config.dataset, split, config.get('data_dir'))
    if num_classes and info.num_classes and info.num_classes > num_classes:
      raise ConfigError(f'{config.dataset} has {info.num_classes} classes but the model\'s head '
                        f'{num_classes}: set --config.num_classes={info.num_classes} (or drop it '
                        'to read it from the dataset)')
  if len(splits) == 2:
    shared = input_pipeline.shared_examples(config.dataset, *splits, config.get('data_dir'))
    if shared:  # Its accuracy would be measured on images the run trains on.
      raise ConfigError(f'eval_split {splits[1]!r} shares {shared} examples with train_split '
                        f'{splits[0]!r}: hold them out of training, e.g. '
                        "--config.train_split='train[:90%]' --config.eval_split='train[90%:]'")
  pp_options.check_same_normalisation(config)
  if config.get('fewshot'):
    from vit_jax.evaluation import fewshot  # pylint: disable=g-import-not-at-top
    fewshot.check_config(config)
  check_not_a_file(workdir, 'workdir')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       exp: Optional[Experiment] = None, initial_state: Any = None) -> dict:
  """Trains (resuming from the newest checkpoint in `workdir`) and returns the final metrics;
  raises RunStopped once a stop signal or preemption notice has had the run save and stop.

  `initial_state` (fine-tuning) is used only when the workdir has no checkpoint yet.
  """
  exp = exp or build(config)
  check_run(config, workdir, exp.num_classes)  # build() skips the dataset given num_classes.
  matmul.warn_of_slow_bfloat16(exp.model.dtype)
  fewshot = _fewshot_evaluator(exp)
  tf.io.gfile.makedirs(workdir)
  with Checkpointer(workdir, keep=config.get('keep_checkpoints', 3)) as checkpointer:
    state, meta = _restore(checkpointer, exp, config)
    resumed = state is not None
    if resumed and not _all_finite(state.params):  # A fine-tune "diverged" at its first step.
      step = int(state.step)
      raise ConfigError(f'the checkpoint at step {step} in {workdir} holds NaN or infinite '
                        'params, which training never saves: it is damaged; move '
                        f'{os.path.join(workdir, "checkpoints", str(step))} away to resume from '
                        'the one before')
    if not resumed:
      state = initial_state if initial_state is not None else exp.init_state()
    else:
      logging.info('resumed from the checkpoint at step %d', int(state.step))
      changes = config_changes(meta.get('config'), config)
      if changes:
        logging.warning('resuming with settings changed since that checkpoint: %s',
                        '; '.join(changes))
    start_step, total_steps = int(state.step), config.total_steps
    progress = metrics_lib.Progress(total_steps, start_step)
    eval_step = exp.jit_eval_step()
    evaluations = _evaluations(exp, eval_step, fewshot)
    unfinished = (_unfinished(_due(evaluations, start_step, total_steps), workdir, start_step)
                  if resumed else [])
    if start_step >= total_steps and not unfinished:  # Before any step is compiled.
      progress.note(f'{workdir} already holds step {start_step} of total_steps={total_steps}: '
                    'nothing to train (a larger --config.total_steps trains on)')
      return {'step': start_step}
    save_config(config, workdir)  # After the restore: a config that cannot resume keeps the old.
    if exp.keeps_average:
      progress.note(_polyak_note(config.polyak_decay, total_steps))
    last_saved = start_step if checkpointer.all_steps() else None
    profiler = profiling.train_profiler(config, workdir, start_step)
    train_step = exp.jit_train_step()
    local_batches = input_pipeline.train_iterator(config, start_step)
    batches = global_batch.prefetch_to_mesh(local_batches, exp.mesh)
    writer = metrics_lib.create_writer(workdir, start_step)
    progress_every = config.get('progress_every', 100)
    checkpoint_every = config.get('checkpoint_every', 1000)
    window, window_start, final = [], None, {}
    saved_config = config.to_dict()  # Each checkpoint's meta holds it.
    # Closed (flushed) also on an error: gs:// metrics are only written by a flush.
    with _StopSignal() as stop, contextlib.closing(writer):
      if unfinished:
        progress.note(f'evaluating step {start_step} first: its run saved it but did not finish '
                      'its evaluations')
        final = _run_evaluations(unfinished, state, step=start_step, writer=writer,
                                 progress=progress)
        writer.flush()
      for step in range(start_step + 1, total_steps + 1):
        state, step_metrics = train_step(state, next(batches))
        window.append(step_metrics)
        if profiler is not None:
          profiler(step, step_metrics)
        if window_start is None:  # The first step compiles; rates are measured after it.
          jax.block_until_ready(step_metrics)
          window_start = (step, time.perf_counter())
        if window and (step % progress_every == 0 or step == total_steps):
          scalars = metrics_lib.mean_of(window, 'train')
          _check_finite(scalars['train/loss'], step, last_saved)
          steps_done, t0 = step - window_start[0], window_start[1]
          if steps_done:  # A window of the compiling step alone has no rate.
            scalars |= perf.throughput_metrics(steps_done * config.batch,
                                               time.perf_counter() - t0, exp.flops_per_image)
          writer.write_scalars(step, scalars)
          progress.update(step, scalars['train/loss'], scalars.get('perf/img_per_sec'))
          window, window_start = [], (step, time.perf_counter())
          checkpointer.raise_if_save_failed()  # A full disk stops the run now, not a save later.
        preempted = bool(stop.received) or checkpointer.reached_preemption(step)
        saving = preempted or step == total_steps or step % checkpoint_every == 0
        # No evaluation once a stop is asked for: the grace period is for the save.
        evals_due = [] if preempted else _due(evaluations, step, total_steps)
        if saving or evals_due:  # NaN params are neither saved nor evaluated.
          loss, finite = jax.device_get((step_metrics['loss'], _all_finite(state.params)))
          _check_finite(float(loss), step, last_saved, bool(finite))
        if saving:  # Before the evaluations, which then cannot cost it.
          checkpointer.save(step, state, {'step': step, 'config': saved_config})
          last_saved = step
        try:
          final |= _run_evaluations(evals_due, state, step=step, writer=writer, progress=progress)
        except TrainingDiverged:
          raise
        except Exception:
          if last_saved != step:  # An evaluation's failure does not cost the steps before it.
            logging.warning('the evaluation at step %d failed: saving the checkpoint of that '
                            'step first', step)
            checkpointer.save(step, state, {'step': step, 'config': saved_config})
          raise
        if saving or evals_due:
          writer.flush()  # The metrics up to a checkpoint survive with it.
          window_start = (step, time.perf_counter())  # Saves and evaluations are not in img/s.
        if preempted:
          if profiler is not None:
            profiler.cut_short(step)
          raise RunStopped(step, stop.received)
  return final | {'step': int(state.step)}
