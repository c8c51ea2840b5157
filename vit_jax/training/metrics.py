"""Where metrics go: clu writers (TensorBoard + log), `metrics.jsonl`, and a live progress line."""
import json
import logging
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per step with every scalar: easy to read back from scripts and tests.

  Local files are appended line by line; object stores (gs://) cannot append, so there the
  file is rewritten whole on each flush. A run resumed at `start_step` moves the rows of later
  steps (trained by a process that died before its next checkpoint, and now trained again) to
  `superseded_path`, so metrics.jsonl holds one trajectory and no row is lost.
  """

  def __init__(self, path: str, start_step: int = 0):
    self._path, self._remote = path, '://' in path
    self._rows = []
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        rows = [row for row in f.read().splitlines() if row.strip()]
      steps = [_step_of(row) for row in rows]
      later = [row for row, step in zip(rows, steps) if step is not None and step > start_step]
      unreadable = [row for row, step in zip(rows, steps) if step is None]
      self._rows = [row for row, step in zip(rows, steps) if step is not None and
                    step <= start_step]
      if later:
        _append_rows(superseded_path(path), later)
      if unreadable:  # A row cut short (a full disk, a kill mid-write): kept, out of the way.
        _append_rows(path + '.unreadable', unreadable)
        logging.warning('%d rows of %s could not be read (cut short?): moved to %s.unreadable',
                        len(unreadable), path, path)
      if (later or unreadable) and not self._remote:
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
          f.write(''.join(row + '\n' for row in self._rows))
        os.replace(path + '.tmp', path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
    if self._remote:
      self._rows.append(row)
    else:
      with open(self._path, 'a', encoding='utf-8') as f:
        f.write(row + '\n')

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self) -> None:
    if self._remote:
      with tf.io.gfile.GFile(self._path, 'w') as f:
        f.write(''.join(row + '\n' for row in self._rows))

  def close(self) -> None:
    self.flush()


def _parsed(row: str) -> Optional[dict]:
  """A row as written, or None for one cut short (a full disk, a kill mid-write)."""
  try:
    parsed = json.loads(row)
    parsed['step'] = int(parsed['step'])
    return parsed
  except (ValueError, KeyError, TypeError):
    return None


def _step_of(row: str) -> Optional[int]:
  parsed = _parsed(row)
  return None if parsed is None else parsed['step']


def superseded_path(path: str) -> str:
  """Where a resumed run keeps the rows of the steps it trains again."""
  return path.removesuffix('.jsonl') + '.superseded.jsonl'


def _append_rows(path: str, rows: list[str]) -> None:
  """Through tf.io.gfile, rewritten whole: object stores cannot append."""
  old = ''
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      old = f.read()
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(old + ''.join(row + '\n' for row in rows))


def create_writer(workdir: str, start_step: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard + logging (+ JSON lines) on process 0; other processes only log."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl'), start_step)])


def read_jsonl(path: str) -> list[dict]:
  """The readable rows of a run's metrics.jsonl (local or gs://), one dict a step that wrote
  any."""
  with tf.io.gfile.GFile(path) as f:
    return [row for row in map(_parsed, f.read().splitlines()) if row is not None]


# Logged as the window's last step has them, as big_vision and MaxText log the schedule (a
# window's mean lags it: ten times the last step's rate at the end of a cosine decay).
_LAST_STEP_VALUES = frozenset({'learning_rate'})


def mean_of(step_metrics: list[Mapping[str, Any]], prefix: str) -> dict[str, float]:
  """Fetches a window of per-step device metrics at once (one host sync) and averages them (the
  learning rate: the last step's)."""
  fetched = jax.device_get(step_metrics)
  return {f'{prefix}/{k}': float(fetched[-1][k] if k in _LAST_STEP_VALUES
                                 else np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


class Progress:
  """A live line: step, loss, img/s and ETA (carriage-return updated on a terminal), and the
  evaluations' results on lines of their own, so stdout tells how the run goes."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps, self.start_step, self.stream = total_steps, start_step, sys.stdout
    self.start_time = time.monotonic()
    self.enabled = jax.process_index() == 0
    self._live = False  # The last line ended in '\r' and is still being updated.

  def note(self, text: str) -> None:
    """A line that stays (the live line, if any, is kept above it)."""
    if self.enabled:
      self._write(('\n' if self._live else '') + text + '\n')
      self._live = False

  def report(self, step: int, scalars: Mapping[str, float]) -> None:
    """An evaluation's results: accuracies in %, losses as they are."""
    parts = [f'{k} {100 * v:.2f}%' if 'accuracy' in k or k.endswith('shot') else f'{k} {v:.4f}'
             for k, v in scalars.items() if not k.endswith('/examples')]
    self.note(' | '.join([f'step {step}/{self.total_steps}', *parts]))

  def update(self, step: int, loss: float, img_per_sec: Optional[float]) -> None:
    if not self.enabled:
      return
    elapsed = time.monotonic() - self.start_time
    rate = (step - self.start_step) / elapsed if elapsed > 0 else 0
    eta = _duration((self.total_steps - step) / rate) if rate else '?'
    speed = f'{img_per_sec:,.0f} img/s' if img_per_sec else '- img/s'
    line = (f'step {step}/{self.total_steps} | loss {loss:.4f} | {speed} | '
            f'elapsed {_duration(elapsed)} | ETA {eta}')
    self._live = self.stream.isatty()
    self._write(line + ('\r' if self._live else '\n'))

  def _write(self, text: str) -> None:
    """A closed stdout (`| head`, a terminal gone) stops the lines, not the training."""
    try:
      self.stream.write(text)
      self.stream.flush()
    except BrokenPipeError:
      self.enabled = False
      logging.warning('stdout was closed: training goes on without progress lines (metrics.jsonl '
                      'has them)')
      # Python's own flush of stdout at exit would fail again, with a traceback.
      os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
