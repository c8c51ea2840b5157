"""`vit_jax.analyze`: the four figures and their numbers for a workdir and for an exported .npz."""
import json
import os
import subprocess
import sys

import jax
from matplotlib import image as mpimg
import ml_collections
import numpy as np
from PIL import Image
import pytest
import skimage.data

from vit_jax.analysis import from_checkpoint
from vit_jax.checkpoints import npz
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify
from vit_jax.training import experiment
from vit_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('rollout', 'distance', 'posemb', 'filters')


@pytest.fixture(scope='module')
def workdir(prepared_data_dir, tmp_path_factory) -> str:
  """A ViT-Mu_4 workdir as vit_jax.main writes it (two steps: the analyses need no accuracy)."""
  config = ml_collections.ConfigDict(dict(
      model='ViT-Mu_4', dataset='fashion_mnist', data_dir=prepared_data_dir, image_size=28,
      channels=1, pp={'train': {'crop': 'resize'}}, batch=16, total_steps=2, base_lr=1e-3,
      warmup_steps=1, eval_every=0, progress_every=2, seed=0))
  path = str(tmp_path_factory.mktemp('analyze') / 'workdir')
  loop.train_and_evaluate(config, path, exp=experiment.build(config, devices=jax.devices()[:1]))
  return path


def _check_outputs(out_dir, grid, num_shown: int, num_averaged: int) -> None:
  for name in NAMES:
    image = mpimg.imread(os.path.join(out_dir, f'{name}.png'))
    assert image.ndim == 3 and min(image.shape[:2]) > 50
  with open(os.path.join(out_dir, 'rollout.json'), encoding='utf-8') as f:
    assert np.array(json.load(f)['rollout']).shape == (num_shown, *grid)
  with open(os.path.join(out_dir, 'distance.json'), encoding='utf-8') as f:
    distance = json.load(f)
  assert distance['num_images'] == num_averaged
  assert np.array(distance['mean_attention_distance']).shape == (4, 2)  # Mu: 4 layers, 2 heads.
  with open(os.path.join(out_dir, 'posemb.json'), encoding='utf-8') as f:
    assert np.array(json.load(f)['cosine_similarity']).shape == (*grid, *grid)
  with open(os.path.join(out_dir, 'filters.json'), encoding='utf-8') as f:
    assert np.array(json.load(f)['components']).shape == (16, 4, 4, 1)  # rank 4*4*1 = 16.


def test_cli_on_a_workdir_uses_its_dataset(workdir, tmp_path):
  out_dir = str(tmp_path / 'figures')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS='')
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--checkpoint={workdir}',
                         f'--out_dir={out_dir}', '--num_images=4', '--verbosity=-1'],
                        capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr
  assert sorted(proc.stdout.split()) == sorted(
      os.path.join(out_dir, f'{name}.{ext}') for name in NAMES for ext in ('png', 'json'))
  _check_outputs(out_dir, (7, 7), num_shown=4, num_averaged=32)


def test_npz_with_photos_and_a_chosen_subset(workdir, prepared_data_dir, tmp_path):
  path = str(tmp_path / 'mu4.npz')
  npz.save_npz(classify.load_checkpoint(workdir).params, path)
  photos = [str(tmp_path / 'astronaut.jpg'), str(tmp_path / 'coffee.png')]
  Image.fromarray(skimage.data.astronaut()).save(photos[0])
  Image.fromarray(skimage.data.coffee()).save(photos[1])
  out_dir = str(tmp_path / 'all')
  results = from_checkpoint.analyze_checkpoint(path, out_dir, model='ViT-Mu_4', images=photos)
  assert sorted(results) == sorted(NAMES)
  _check_outputs(out_dir, (7, 7), num_shown=2, num_averaged=2)
  some = str(tmp_path / 'some')
  from_checkpoint.analyze_checkpoint(path, some, model='ViT-Mu_4', dataset='digits',
                             data_dir=prepared_data_dir, which=['rollout'])
  assert sorted(os.listdir(some)) == ['rollout.json', 'rollout.png']
  with pytest.raises(ConfigError, match='names no dataset'):
    from_checkpoint.analyze_checkpoint(path, some, model='ViT-Mu_4')
