"""`vit_jax.analyze`: the four figures and their numbers for a workdir and for an exported .npz
(a hybrid's at the image size given), from one pass of the model."""
import json
import os
import re
import subprocess
import sys

import jax
from matplotlib import image as mpimg
import ml_collections
import numpy as np
from PIL import Image
import pytest
import skimage.data

import param_trees

from vit_jax import models
from vit_jax.analysis import from_checkpoint
from vit_jax.analysis import run
from vit_jax.analysis.filters import embedding_filter_pcs
from vit_jax.analysis.posemb_similarity import posemb_cosine_similarity
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import restore
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify
from vit_jax.training import experiment
from vit_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('rollout', 'distance', 'posemb', 'filters')


@pytest.fixture(scope='module')
def workdir(prepared_data_dir, tmp_path_factory) -> str:
  """A ViT-Mu_4 workdir as vit_jax.main writes it. The analyses need no accuracy, but three steps:
  the head starts at zero, so only the third moves the embeddings off their init (after two, the
  checkpoint's position embeddings and filters were still a fresh PRNGKey(0) model's)."""
  config = ml_collections.ConfigDict(dict(
      model='ViT-Mu_4', dataset='fashion_mnist', data_dir=prepared_data_dir, image_size=28,
      channels=1, pp={'train': {'crop': 'resize'}}, batch=16, total_steps=3, base_lr=1e-3,
      warmup_steps=1, eval_every=0, progress_every=2, seed=0, eval_split='test[:40]'))
  path = str(tmp_path_factory.mktemp('analyze') / 'workdir')
  loop.train_and_evaluate(config, path, exp=experiment.build(config, devices=jax.devices()[:1]))
  return path


def _check_outputs(out_dir, grid, num_shown: int, num_averaged: int, params) -> None:
  """Shapes of all four outputs; posemb.json and filters.json are the numbers of `params`."""
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
    similarity = np.array(json.load(f)['cosine_similarity'])
  assert similarity.shape == (*grid, *grid)
  # The checkpoint's own learned embeddings, its class token (the first of 1 + 7*7) dropped:
  # catches analysing freshly initialised params (training moved them: see the workdir test)
  # and dropping the wrong token (or none: 50 rows do not fill the grid).
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 7 * 7, 64)
  np.testing.assert_allclose(similarity, posemb_cosine_similarity(posemb, grid, 1), atol=1e-9)
  with open(os.path.join(out_dir, 'filters.json'), encoding='utf-8') as f:
    filters = json.load(f)
  components = np.array(filters['components'])
  assert components.shape == (16, 4, 4, 1)  # rank 4*4*1 = 16, under the 28 the paper shows.
  # The PCs of the checkpoint's 64 4x4 grey filters: catches a fresh init's filters too.
  expected, ratio = embedding_filter_pcs(params['embedding']['kernel'], 16)
  np.testing.assert_allclose(filters['explained_variance_ratio'], ratio, rtol=1e-9)
  np.testing.assert_allclose(components, expected, atol=1e-6)


def _check_about(out_dir, names, **about) -> None:
  """Each JSON names what its numbers come from (the params as infer --json names them)."""
  for name in names:
    with open(os.path.join(out_dir, f'{name}.json'), encoding='utf-8') as f:
      numbers = json.load(f)
    assert {key: numbers.get(key) for key in about} == about, name


def test_cli_on_a_workdir_uses_its_dataset_and_eval_split(workdir, tmp_path):
  out_dir = str(tmp_path / 'figures')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS='')
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--checkpoint={workdir}',
                         f'--out_dir={out_dir}', '--num_images=4'],
                        capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr
  assert not re.search(r'^I\d{4} .*\.py:\d+\]', proc.stderr, re.M), proc.stderr  # No INFO lines.
  assert sorted(proc.stdout.split()) == sorted(
      os.path.join(out_dir, f'{name}.{ext}') for name in NAMES for ext in ('png', 'json'))
  params = restore.load(workdir).params
  _check_outputs(out_dir, (7, 7), num_shown=4, num_averaged=32, params=params)
  _check_about(out_dir, NAMES, checkpoint=workdir, params=f'workdir {workdir} (step 3)',
               dataset='fashion_mnist', split='test[:40]', image_size=28, crop='resize')
  # Those pins tell the checkpoint from a fresh model: training moved what they compare by far
  # more than their tolerances (the third step moved similarities ~1e-2 and ratios ~3e-5).
  model = classify.load_checkpoint(workdir).model
  fresh = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))['params']
  fresh_posemb = fresh['Transformer']['posembed_input']['pos_embedding']
  moved = (posemb_cosine_similarity(params['Transformer']['posembed_input']['pos_embedding'],
                                    (7, 7), 1) - posemb_cosine_similarity(fresh_posemb, (7, 7), 1))
  assert np.abs(moved).max() > 1e-4
  ratios = [embedding_filter_pcs(p['embedding']['kernel'], 16)[1] for p in (params, fresh)]
  assert np.abs(ratios[0] - ratios[1]).max() > 1e-6


def test_npz_with_photos_and_a_chosen_subset(workdir, prepared_data_dir, tmp_path):
  path = str(tmp_path / 'mu4.npz')
  params = restore.load(workdir).params
  npz.save_npz(classify.load_checkpoint(workdir).params, path)
  photos = [str(tmp_path / 'astronaut.jpg'), str(tmp_path / 'coffee.png')]
  Image.fromarray(skimage.data.astronaut()).save(photos[0])
  Image.fromarray(skimage.data.coffee()).save(photos[1])
  out_dir = str(tmp_path / 'all')
  results = from_checkpoint.analyze_checkpoint(path, out_dir, model='ViT-Mu_4', images=photos)
  assert sorted(results) == sorted(NAMES)
  _check_outputs(out_dir, (7, 7), num_shown=2, num_averaged=2, params=params)
  _check_about(out_dir, NAMES, checkpoint=path, params=path, images=photos, image_size=28)
  some = str(tmp_path / 'some')
  from_checkpoint.analyze_checkpoint(path, some, model='ViT-Mu_4', dataset='digits',
                             data_dir=prepared_data_dir, which=['rollout'])
  assert sorted(os.listdir(some)) == ['rollout.json', 'rollout.png']
  _check_about(some, ['rollout'], checkpoint=path, dataset='digits', split='test[:32]')
  with pytest.raises(ConfigError, match='names no dataset'):
    from_checkpoint.analyze_checkpoint(path, some, model='ViT-Mu_4')
  one = str(tmp_path / 'one')  # --num_images was ignored for files.
  results = from_checkpoint.analyze_checkpoint(path, one, model='ViT-Mu_4', images=photos,
                                               num_images=1, which=['rollout', 'distance'])
  assert results['rollout']['rollout'].shape == (1, 7, 7)
  assert results['distance']['num_images'] == 2
  weights = str(tmp_path / 'weights')  # They asked for a dataset they do not read.
  results = from_checkpoint.analyze_checkpoint(path, weights, model='ViT-Mu_4',
                                               which=['posemb', 'filters'])
  assert sorted(os.listdir(weights)) == ['filters.json', 'filters.png', 'posemb.json',
                                         'posemb.png']
  _check_about(weights, ['posemb', 'filters'], checkpoint=path, images=None, dataset=None)
  with pytest.raises(ConfigError, match='not both'):
    from_checkpoint.analyze_checkpoint(path, some, model='ViT-Mu_4', images=photos,
                                       dataset='digits')


def test_cli_takes_image_files_as_arguments_over_a_workdirs_dataset(workdir, tmp_path):
  """The docstring's `... a.jpg b.png`: files after the flags are the images analysed."""
  photos = [str(tmp_path / 'camera.png'), str(tmp_path / 'coins.png')]
  Image.fromarray(skimage.data.camera()).save(photos[0])
  Image.fromarray(skimage.data.coins()).save(photos[1])
  out_dir = str(tmp_path / 'figures')
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--checkpoint={workdir}',
                         f'--out_dir={out_dir}', '--which=rollout', *photos],
                        capture_output=True, text=True, cwd=REPO, check=False,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=''))
  assert proc.returncode == 0, proc.stderr
  _check_about(out_dir, ['rollout'], images=photos, dataset=None)
  with open(os.path.join(out_dir, 'rollout.json'), encoding='utf-8') as f:
    assert np.array(json.load(f)['rollout']).shape == (2, 7, 7)


def test_another_dataset_than_the_workdirs_is_read_from_the_default_data_dir(
    workdir, prepared_data_dir, tmp_path, monkeypatch):
  """A workdir's data_dir holds its own dataset; another is found where TFDS looks by default
  ($TFDS_DATA_DIR) or in --data_dir."""
  read_from = []
  images = from_checkpoint.dataset_images
  monkeypatch.setattr(from_checkpoint, 'dataset_images', lambda ckpt, dataset, split, data_dir,
                      count: read_from.append((dataset, data_dir)) or images(
                          ckpt, dataset, split, prepared_data_dir, count))
  for dataset in (None, 'digits'):
    from_checkpoint.analyze_checkpoint(workdir, str(tmp_path / 'out'), dataset=dataset,
                                       which=['rollout'], num_images=2)
  assert read_from == [('fashion_mnist', prepared_data_dir), ('digits', None)]


def test_an_unknown_analysis_is_named_before_the_checkpoint_is_read(tmp_path):
  with pytest.raises(ConfigError, match=r"unknown analyses \['rolout'\]"):
    from_checkpoint.analyze_checkpoint(str(tmp_path / 'missing'), str(tmp_path / 'out'),
                                       which=['rolout'])


def test_a_wrong_split_is_named_as_given(workdir, tmp_path):
  with pytest.raises(ConfigError, match=r"fashion_mnist has no split 'validation': use one of"):
    from_checkpoint.analyze_checkpoint(workdir, str(tmp_path / 'out'), split='validation')


def test_a_hybrid_npz_is_analysed_at_the_image_size_given_in_one_pass(prepared_data_dir, tmp_path,
                                                                       attention_passes):
  """R8+ViT-Mu_8's position embeddings fit 25-32 px: at 28 the analyses are those of the 28 px
  eval images, from one pass of the model over the 4 images both analyses need."""
  model = models.create('R8+ViT-Mu_8', num_classes=10)
  params = param_trees.compiled_init(model, (1, 28, 28, 1))['params']
  path = str(tmp_path / 'hybrid.npz')
  npz.save_npz(params, path)
  which = ['rollout', 'distance']
  results = from_checkpoint.analyze_checkpoint(
      path, str(tmp_path / 'at_28'), model='R8+ViT-Mu_8', image_size=28, dataset='fashion_mnist',
      data_dir=prepared_data_dir, num_images=2, num_distance_images=4, which=which)
  assert attention_passes == [4]
  batch, = input_pipeline.make_eval_iterator(
      dataset='fashion_mnist', split='test[:4]', data_dir=prepared_data_dir, global_batch=4,
      image_size=28, channels=1, pp=ml_collections.ConfigDict(), process_index=0,
      process_count=1)
  direct = run.analyze(model, {'params': params}, batch['image'], out_dir=tmp_path / 'direct',
                       which=which, num_shown=2)
  np.testing.assert_allclose(results['rollout']['rollout'], direct['rollout']['rollout'],
                             rtol=1e-6)
  np.testing.assert_allclose(results['distance']['mean_attention_distance'],
                             direct['distance']['mean_attention_distance'], rtol=1e-6)
  # The flag reaches the loader: a size that does not fit the grid stops with one line.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS='')
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.analyze', f'--checkpoint={path}',
                         '--model=R8+ViT-Mu_8', '--image_size=24', f'--out_dir={tmp_path}/cli'],
                        capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert proc.returncode == 2
  assert proc.stderr.splitlines()[-1] == (
      f'error: image size 24 does not give the token grid of the position embeddings of {path}: '
      'pass an --image_size from 25 to 32')
