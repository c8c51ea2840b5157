"""Few-shot linear probes: the closed form, the periodic hook in the training loop, the CLI.

Thresholds are conservative versions of measured values (digits: 10 classes, chance 0.1).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

import config_files
from vit_jax.errors import ConfigError
from vit_jax.evaluation import fewshot
from vit_jax.training import experiment
from vit_jax.training import loop
from vit_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHOTS = (1, 5, 10)
# Steps are cheap at 16 px (~5 ms per image on 2 cores); compiling and evaluating dominate.
TRAIN = dict(dataset='digits', image_size=16, total_steps=200, batch=64, warmup_steps=20,
             base_lr=3e-3, eval_every=0, progress_every=50, checkpoint_every=1000,
             pp=ml_collections.ConfigDict({'train': {'crop': 'random_crop', 'random_crop_pad': 1,
                                                     'flip': False}}))


def _clusters(num_classes=10, per_class=40, dim=32, spread=0.5, seed=0):
  """Gaussian blobs around random class centres: linearly separable up to the spread."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim))
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_probe_separates_clusters_and_noise_stays_at_chance():
  x, y = _clusters()
  x_test, y_test = _clusters(seed=0, per_class=20)
  separable = fewshot.fewshot_accuracies(x, y, x_test, y_test, shots=(1, 5), seeds=3)
  assert min(np.mean(a) for a in separable.values()) > 0.9
  rng = np.random.default_rng(1)
  noise = fewshot.fewshot_accuracies(rng.normal(size=(2000, 64)), rng.integers(0, 10, 2000),
                                     rng.normal(size=(2000, 64)), rng.integers(0, 10, 2000),
                                     shots=(1, 5, 25), seeds=3)
  # Measured 0.09-0.11 (chance 0.1).
  assert all(abs(np.mean(a) - 0.1) < 0.04 for a in noise.values()), noise


@pytest.mark.parametrize('per_class,dim', [(2, 32), (8, 4)])
def test_primal_and_dual_forms_agree(per_class, dim):
  """Fewer examples than dimensions takes the dual branch; both are the same ridge solution."""
  x, y = _clusters(per_class=per_class, dim=dim, spread=2.0)
  x_test, y_test = _clusters(per_class=50, dim=dim, spread=2.0, seed=0)
  reg = 3.0
  xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
  t = 2.0 * np.eye(10)[y] - 1.0
  w = np.linalg.lstsq(np.vstack([xs, np.sqrt(reg) * np.eye(dim)]),
                      np.vstack([t - t.mean(0), np.zeros((dim, 10))]), rcond=None)[0]
  expected = np.argmax(((x_test - x.mean(0)) / (x.std(0) + 1e-6)) @ w + t.mean(0), axis=1)
  got = fewshot.linear_probe_accuracy(x, y, x_test, y_test, 10, reg)
  assert got == pytest.approx(np.mean(expected == y_test))


def test_shots_are_per_class_without_replacement():
  labels = np.repeat(np.arange(4), 6)
  idx = fewshot.sample_shots(labels, 5, np.random.default_rng(0))
  assert len(set(idx)) == 20 and np.all(np.bincount(labels[idx]) == 5)
  with pytest.raises(ConfigError, match='fewer than 7 shots'):
    fewshot.sample_shots(labels, 7, np.random.default_rng(0))


def test_datasets_from_config():
  assert fewshot.datasets_from_config(('digits',)) == {'digits': ('train', 'test')}
  assert fewshot.datasets_from_config({'digits': ['train[:500]', 'test']}) == {
      'digits': ('train[:500]', 'test')}
  with pytest.raises(ConfigError):
    fewshot.datasets_from_config(())


def _config(data_dir: str) -> ml_collections.ConfigDict:
  config = config_files.get_config('default')
  config.update(dict(TRAIN, data_dir=data_dir))
  config.fewshot = ml_collections.ConfigDict(dict(datasets={'digits': ('train', 'test')},
                                                  shots=SHOTS, seeds=2, every=100))
  return config


def test_fewshot_during_training_and_from_the_cli(prepared_data_dir, tmp_path):
  config = _config(prepared_data_dir)
  exp = experiment.build(config)
  untrained = fewshot.from_experiment(exp).scalars(exp.init_state().params)
  final = loop.train_and_evaluate(config, str(tmp_path), exp=exp)
  rows = [r for r in read_jsonl(str(tmp_path / 'metrics.jsonl')) if 'fewshot/digits_1shot' in r]
  assert [r['step'] for r in rows] == [100, 200]
  trained = {k: v for k, v in final.items() if k.startswith('fewshot/')}
  assert set(trained) == {f'fewshot/digits_{k}shot' for k in SHOTS}
  # Measured 1/5/10-shot: trained 0.62/0.77/0.73, untrained 0.18/0.37/0.43 (random ViT features
  # are far from chance on digits, hence Gaussian noise for "chance" above).
  assert trained['fewshot/digits_1shot'] > 0.4, (trained, untrained)
  assert trained['fewshot/digits_10shot'] > 0.55, (trained, untrained)
  for k in SHOTS:
    assert trained[f'fewshot/digits_{k}shot'] > untrained[f'fewshot/digits_{k}shot'] + 0.1

  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.fewshot', f'--checkpoint={tmp_path}', '--dataset=digits',
       '--shots=' + ','.join(map(str, SHOTS)), '--seeds=2', '--json'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TFDS_DATA_DIR=prepared_data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for k in SHOTS:  # The same params, splits and seeds as the last in-loop evaluation.
    assert result['accuracy'][str(k)] == pytest.approx(trained[f'fewshot/digits_{k}shot'],
                                                       abs=0.01)
