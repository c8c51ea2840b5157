"""Few-shot linear probes: the closed form, the periodic hook in the training loop, the CLI.

Thresholds are conservative versions of measured values (digits: 10 classes, chance 0.1).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import config_files
from vit_jax import sharding
from vit_jax.checkpoints import npz
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError
from vit_jax.evaluation import fewshot
from vit_jax.training import experiment
from vit_jax.training import loop
from vit_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHOTS = (1, 5, 10)
# Not the CLI's defaults, so that the CLI's agreement with the in-loop probe shows its flags
# reach the evaluator.
PROBE_SPLIT, PROBE_L2_REG = 'train[:60%]', 30.0
# Steps are cheap at 16 px (~5 ms per image on 2 cores); compiling and evaluating dominate.
TRAIN = dict(dataset='digits', image_size=16, total_steps=100, batch=64, warmup_steps=10,
             base_lr=3e-3, eval_every=0, progress_every=50, checkpoint_every=1000,
             pp=ml_collections.ConfigDict({'train': {'crop': 'random_crop', 'random_crop_pad': 1,
                                                     'flip': False},
                                           # Not the default: the CLI must take it from the
                                           # checkpoint's config.
                                           'eval': {'crop': 'resize_crop'}}))


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
def test_probe_is_ridge_on_standardised_features(per_class, dim):
  """The paper's regularised least squares onto {-1, 1}^K, written out here, with fewer
  examples than dimensions (20 < 32) and more (80 > 4)."""
  x, y = _clusters(per_class=per_class, dim=dim, spread=2.0)
  x_test, y_test = _clusters(per_class=50, dim=dim, spread=2.0, seed=0)
  reg = 3.0
  xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
  t = 2.0 * np.eye(10)[y] - 1.0
  w = np.linalg.lstsq(np.vstack([xs, np.sqrt(reg) * np.eye(dim)]),
                      np.vstack([t - t.mean(0), np.zeros((dim, 10))]), rcond=None)[0]
  expected = np.argmax(((x_test - x.mean(0)) / (x.std(0) + 1e-6)) @ w + t.mean(0), axis=1)
  got = fewshot.linear_probe_accuracy(x, y, x_test, y_test, reg)
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
  # Each was a TypeError or ValueError traceback, or a bad split name, at the first probe.
  for malformed in ((), ({'digits': ('train', 'test')},), {'digits': 'train'},
                    {'digits': ('train',)}, {'digits': ('train', 5)}, 5):
    with pytest.raises(ConfigError, match=r"give dataset names, or a mapping name -> "):
      fewshot.datasets_from_config(malformed)


@pytest.mark.parametrize('setting,message', [
    (dict(batch=12), 'few-shot batch 12 is not divisible by the 8 data-parallel devices: use a '
     'multiple of 8 (--batch; config.fewshot.batch)'),
    # An empty --shots printed an empty table after extracting every feature.
    (dict(shots=()), 'few-shot shots [] must be positive counts, at least one'),
    (dict(shots=(5, 0)), 'few-shot shots [5, 0] must be positive counts'),
    (dict(seeds=0), 'few-shot seeds=0 must be positive'),
    # sklearn's traceback, after extracting every feature.
    (dict(l2_reg=-1.0), 'few-shot l2_reg=-1.0 must be >= 0: the ridge penalty (--l2_reg; '
     'config.fewshot.l2_reg)')])
def test_bad_settings_stop_before_any_feature_is_computed(setting, message):
  mesh = sharding.make_mesh('data:-1')
  with pytest.raises(ConfigError) as error:
    fewshot.FewShotEvaluator(model=None, mesh=mesh, params_shardings=None,
                             datasets={'digits': ('train', 'test')}, image_size=16, channels=1,
                             **setting)
  assert str(error.value).startswith(message)


@pytest.mark.parametrize('datasets,shots,message', [
    ({'digitz': ('train', 'test')}, (1,), "unknown dataset 'digitz'"),
    ({'digits': ('train', 'tset')}, (1,), "digits has no split 'tset'"),
    # digits has 10 classes: 25 shots need 250 examples, train[:200] holds 200.
    ({'digits': ('train[:200]', 'test')}, (5, 25), 'few-shot 25 shots of 10 classes need 250 '
     'training examples; digits[train[:200]] holds 200: use fewer shots')])
def test_datasets_that_cannot_serve_the_probe_stop_it_before_any_feature(
    prepared_data_dir, datasets, shots, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    fewshot.FewShotEvaluator(model=None, mesh=sharding.make_mesh('data:-1'),
                             params_shardings=None, datasets=datasets, image_size=16,
                             channels=1, shots=shots, data_dir=prepared_data_dir)


def test_a_training_run_checks_its_probe_before_writing_the_workdir(prepared_data_dir, tmp_path):
  # It failed at the first probe (config.fewshot.every steps in), losing the steps since the last
  # checkpoint.
  config = _config(prepared_data_dir)
  config.fewshot = ml_collections.ConfigDict(dict(datasets=('digitz',), every=100))
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match="unknown dataset 'digitz'"):
    loop.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_a_misspelt_probe_key_is_an_error():
  # shot, seed and l2 ran the default shots, seeds and penalty without a word.
  config = config_files.get_config('default')
  config.fewshot = ml_collections.ConfigDict(dict(datasets=('digits',), every=10, shot=(1, 2),
                                                  seed=1, l2=5.0))
  with pytest.raises(ConfigError, match=r"^config.fewshot has unknown keys \['l2', 'seed', 'shot'\]: "
                     'its keys are datasets, every, shots, seeds, l2_reg, batch$'):
    experiment.check_config(config)


def _config(data_dir: str) -> ml_collections.ConfigDict:
  config = config_files.get_config('default')
  config.update(dict(TRAIN, data_dir=data_dir))
  config.fewshot = ml_collections.ConfigDict(dict(datasets={'digits': (PROBE_SPLIT, 'test')},
                                                  shots=SHOTS, seeds=2, every=50,
                                                  l2_reg=PROBE_L2_REG))
  return config


def _cli(data_dir: str, *args: str) -> dict:
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.fewshot', '--dataset=digits',
       '--shots=' + ','.join(map(str, SHOTS)), '--seeds=2', f'--train_split={PROBE_SPLIT}',
       f'--l2_reg={PROBE_L2_REG}', '--json', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TFDS_DATA_DIR=data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not re.search(r'^I\d{4} .*\.py:\d+\]', proc.stderr, re.M), proc.stderr  # No INFO lines.
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['l2_reg'] == PROBE_L2_REG
  return {f'fewshot/digits_{k}shot': result['accuracy'][str(k)] for k in SHOTS}


def test_fewshot_during_training_and_from_the_cli(prepared_data_dir, tmp_path,
                                                  tmp_path_factory):
  config = _config(prepared_data_dir)
  exp = experiment.build(config)
  init_state = exp.init_state()
  evaluator = fewshot.from_experiment(exp)
  untrained = evaluator.scalars(init_state.params)
  # A .npz holds no config, so the CLI resizes (the default pp.eval.crop); a workdir's
  # checkpoint brings its config's crop.
  untrained_resized = dataclasses.replace(evaluator, eval_pp=pp_options.EVAL_DEFAULTS).scalars(
      init_state.params)
  untrained_npz = str(tmp_path_factory.mktemp('npz') / 'untrained.npz')
  npz.save_npz(jax.device_get(init_state.params), untrained_npz)
  untrained_workdir = str(tmp_path_factory.mktemp('untrained'))
  with Checkpointer(untrained_workdir) as checkpointer:
    checkpointer.save(0, init_state, {'step': 0, 'config': config.to_dict()})
  final = loop.train_and_evaluate(config, str(tmp_path), exp=exp)
  rows = [r for r in read_jsonl(str(tmp_path / 'metrics.jsonl')) if 'fewshot/digits_1shot' in r]
  assert [r['step'] for r in rows] == [50, 100]
  trained = {k: v for k, v in final.items() if k.startswith('fewshot/')}
  assert set(trained) == {f'fewshot/digits_{k}shot' for k in SHOTS}
  # Measured 1/5/10-shot: trained 0.82/0.88/0.89 after its 100 steps (its features separate
  # the digits it was trained on; 0.96 each after 200), untrained 0.23/0.43/0.51 (random ViT
  # features are far from chance on digits, hence Gaussian noise for "chance" above).
  for k in SHOTS:
    assert trained[f'fewshot/digits_{k}shot'] > 0.7, (trained, untrained)
    assert trained[f'fewshot/digits_{k}shot'] > untrained[f'fewshot/digits_{k}shot'] + 0.1

  # The same params, splits, penalty, crop and seeds as the in-loop probes: the same
  # accuracies. The untrained features are where these matter (the trained ones give ~0.96
  # with any): resized, without --train_split they are 0.30/0.49/0.61, without --l2_reg
  # 0.32/0.45/0.56; from the workdir, resized rather than with its crop 0.34/0.54/0.63.
  assert _cli(prepared_data_dir, f'--checkpoint={untrained_npz}',
              f'--model={config.model}') == pytest.approx(untrained_resized, abs=0.01)
  assert _cli(prepared_data_dir,
              f'--checkpoint={untrained_workdir}') == pytest.approx(untrained, abs=0.01)
  assert _cli(prepared_data_dir, f'--checkpoint={tmp_path}') == pytest.approx(trained, abs=0.01)
