"""The paper's analyses: math on constructed cases, then the model and the files end to end."""
import itertools
import json
import logging
import math
import tracemalloc

import flax
import jax
import jax.numpy as jnp
from matplotlib import image as mpimg
import numpy as np
import pytest

import param_trees

from vit_jax import models
from vit_jax.analysis import attention, distance, filters, plots, posemb_similarity, run
from vit_jax.errors import ConfigError
from vit_jax.models import scan_layout
from vit_jax.models import vit

GRID, PATCH = (3, 4), (2, 3)  # Non-square on purpose.
N = GRID[0] * GRID[1]


def _softmax_attention(rng, layers, batch, heads, tokens):
  weights = np.exp(rng.normal(size=(layers, batch, heads, tokens, tokens)) * 2)
  return weights / weights.sum(axis=-1, keepdims=True)


def _brute_force_mean_distance(key_of=None):
  """Mean over query patches of the distance to every key patch (or to `key_of(query)`)."""
  cells = list(itertools.product(range(GRID[0]), range(GRID[1])))
  dist = lambda a, b: math.hypot((a[0] - b[0]) * PATCH[0], (a[1] - b[1]) * PATCH[1])
  if key_of:
    return sum(dist(q, key_of(q)) for q in cells) / len(cells)
  return sum(dist(q, k) for q in cells for k in cells) / len(cells)**2


# Mean attention distance.


def test_uniform_attention_over_patches_gives_mean_pairwise_centre_distance():
  attn = np.zeros((2, 3, 2, 1 + N, 1 + N))
  attn[..., 1:] = 1 / N  # Queries (class token's row too) spread evenly over the patch keys.
  got = distance.mean_attention_distance(attn, GRID, PATCH, num_prefix_tokens=1)
  assert got.shape == (2, 2)
  np.testing.assert_allclose(got, _brute_force_mean_distance(), rtol=1e-12)


def test_class_token_share_is_renormalised_away_unless_asked_not_to():
  attn = np.full((1, 1, 1, 1 + N, 1 + N), 1 / (1 + N))  # Uniform over all keys, class included.
  expected = _brute_force_mean_distance()
  renormalised = distance.mean_attention_distance(attn, GRID, PATCH, 1)
  raw = distance.mean_attention_distance(attn, GRID, PATCH, 1, renormalize=False)
  np.testing.assert_allclose(renormalised, expected, rtol=1e-12)
  np.testing.assert_allclose(raw, expected * N / (1 + N), rtol=1e-12)


def test_distance_of_one_hot_attention():
  local = np.broadcast_to(np.eye(N), (2, 1, 3, N, N))
  np.testing.assert_allclose(distance.mean_attention_distance(local, GRID, PATCH, 0), 0)
  to_corner = np.zeros((1, 1, 1, N, N))
  to_corner[..., 0] = 1  # Every query looks at the top-left patch only.
  np.testing.assert_allclose(distance.mean_attention_distance(to_corner, GRID, PATCH, 0),
                             _brute_force_mean_distance(key_of=lambda q: (0, 0)), rtol=1e-12)


def test_distance_rejects_a_grid_that_does_not_match():
  with pytest.raises(ConfigError, match='does not match'):
    distance.mean_attention_distance(np.zeros((1, 1, 1, N, N)), GRID, PATCH, 1)


# Attention rollout.


def test_identity_attention_rolls_out_to_identity():
  eye = np.broadcast_to(np.eye(1 + N), (3, 2, 4, 1 + N, 1 + N))
  np.testing.assert_allclose(attention.rollout_matrix(eye), np.broadcast_to(np.eye(1 + N),
                                                                            (2, 1 + N, 1 + N)))
  # The class token keeps everything for itself: nothing flows from the patches.
  np.testing.assert_allclose(attention.attention_rollout(eye, classifier='token'), 0)
  # Averaging identity rows over all tokens (all patches for 'gap') is uniform.
  eye = np.broadcast_to(np.eye(N), (3, 2, 4, N, N))
  np.testing.assert_allclose(attention.attention_rollout(eye, classifier='gap'), 1 / N)


def test_class_token_attending_to_one_patch_gives_a_one_hot_map():
  attn = np.broadcast_to(np.eye(1 + N), (1, 1, 2, 1 + N, 1 + N)).copy()
  attn[..., 0, :] = 0
  attn[..., 0, 1 + 5] = 1  # Class token attends to patch 5 only; the residual keeps the rest.
  expected = np.zeros(N)
  expected[5] = 0.5
  np.testing.assert_allclose(attention.attention_rollout(attn, classifier='token')[0], expected)


def test_rollout_rows_are_distributions_chained_top_layer_first():
  attn = _softmax_attention(np.random.default_rng(0), 2, 3, 4, 1 + N)
  joint = attention.rollout_matrix(attn)
  assert joint.shape == (3, 1 + N, 1 + N) and (joint >= 0).all()
  np.testing.assert_allclose(joint.sum(-1), 1, rtol=1e-12)
  layer = lambda l: 0.5 * attn[l].mean(axis=1) + 0.5 * np.eye(1 + N)
  np.testing.assert_allclose(joint, layer(1) @ layer(0), rtol=1e-10)
  gap = attention.attention_rollout(attn[..., 1:, 1:] / attn[..., 1:, 1:].sum(-1, keepdims=True),
                                    classifier='gap')
  np.testing.assert_allclose(gap.sum(-1), 1, rtol=1e-12)
  np.testing.assert_allclose(attention.attention_rollout(attn, classifier='token'), joint[:, 0, 1:])


def test_rollout_rejects_map_models():
  with pytest.raises(ConfigError, match='leave "rollout" out'):
    attention.attention_rollout(np.zeros((1, 1, 1, N, N)), classifier='map')


def test_rollout_map_upsamples_a_non_square_grid():
  maps = np.random.default_rng(0).random((2, N))
  nearest = attention.rollout_map(maps, GRID, (6, 12), method='nearest')
  np.testing.assert_allclose(nearest[1], np.kron(maps[1].reshape(GRID), np.ones(PATCH)), rtol=1e-6)
  np.testing.assert_allclose(attention.rollout_map(np.full((1, N), 0.3), GRID, (6, 12)), 0.3,
                             rtol=1e-6)
  with pytest.raises(ConfigError, match='grid'):
    attention.rollout_map(maps, (4, 4), (8, 8))


# Position-embedding similarity.


def test_posemb_similarity_is_symmetric_with_unit_diagonal_and_ignores_the_class_token():
  posemb = np.random.default_rng(0).normal(size=(1, 1 + N, 16))
  sim = posemb_similarity.posemb_cosine_similarity(posemb, GRID, 1)
  assert sim.shape == GRID + GRID
  flat = sim.reshape(N, N)
  np.testing.assert_allclose(np.diag(flat), 1, rtol=1e-12)
  np.testing.assert_allclose(flat, flat.T, rtol=1e-12)
  posemb[0, 0] *= 100
  np.testing.assert_allclose(posemb_similarity.posemb_cosine_similarity(posemb, GRID, 1), sim)
  with pytest.raises(ConfigError, match='grid'):
    posemb_similarity.posemb_cosine_similarity(posemb, GRID, 0)


def test_row_plus_column_embeddings_give_the_known_similarity():
  rows, cols = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing='ij')
  posemb = np.concatenate([np.eye(GRID[0])[rows.ravel()], np.eye(GRID[1])[cols.ravel()]], axis=1)
  sim = posemb_similarity.posemb_cosine_similarity(posemb, GRID, 0)
  for i, j, k, l in itertools.product(range(GRID[0]), range(GRID[1]), range(GRID[0]),
                                      range(GRID[1])):
    assert sim[i, j, k, l] == pytest.approx(((i == k) + (j == l)) / 2)


# Embedding-filter principal components.


def test_pca_recovers_known_components_and_variance():
  rng = np.random.default_rng(0)
  shape, num_filters = (4, 4, 3), 200
  basis, _ = np.linalg.qr(rng.normal(size=(int(np.prod(shape)), 2)))  # Orthonormal c1, c2.
  coeffs = rng.normal(size=(num_filters, 2))
  coeffs, _ = np.linalg.qr(coeffs - coeffs.mean(0))  # Zero-mean, orthonormal: exact variances.
  weights = coeffs * [3, 1]  # Variance ratio 9:1.
  offset = rng.normal(size=basis.shape[0])  # A common mean, which centring must remove.
  samples = weights @ basis.T + offset + 1e-6 * rng.normal(size=(num_filters, basis.shape[0]))
  kernel = samples.T.reshape(*shape, num_filters)
  components, ratio = filters.embedding_filter_pcs(kernel, 2)
  assert components.shape == (2, *shape)
  np.testing.assert_allclose(ratio, [0.9, 0.1], atol=1e-6)
  flat = components.reshape(2, -1)
  np.testing.assert_allclose(np.abs(flat @ basis), np.eye(2), atol=1e-5)
  assert (flat[np.arange(2), np.abs(flat).argmax(1)] > 0).all()  # The sign convention.
  with pytest.raises(ConfigError, match='num_components'):
    filters.embedding_filter_pcs(kernel, 49)


# The model and the files.

IMAGE_SHAPE = (2, 16, 12, 3)  # ViT-Mu_4: a 4x3 grid.


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).uniform(-1, 1, IMAGE_SHAPE).astype(np.float32)


@pytest.fixture(scope='module')
def tiny():
  model = models.create('ViT-Mu_4', num_classes=5)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros(IMAGE_SHAPE))
  return model, flax.core.unfreeze(flax.linen.meta.unbox(variables))


def test_collect_attention_is_the_same_unrolled_and_scanned_whole_and_chunked(tiny, images):
  model, variables = tiny
  attn = attention.collect_attention(model, variables, images)
  assert attn.shape == (4, 2, 2, 13, 13) and attn.dtype == np.float32
  np.testing.assert_allclose(attn.sum(-1), 1, rtol=1e-5)
  assert attn.std() > 1e-3  # Not uniform: the weights really come from the model.
  scanned = models.create('ViT-Mu_4', num_classes=5, scan=True)
  params = scan_layout.unrolled_to_scanned(variables['params'])
  np.testing.assert_allclose(
      attention.collect_attention(scanned, {'params': params}, images, batch_size=1), attn,
      atol=1e-6)


def test_collect_attention_compiles_once_per_model_and_shape(tiny, images, caplog):
  model, variables = tiny
  attention.collect_attention(model, variables, images)
  same = models.create('ViT-Mu_4', num_classes=5)  # Another instance of the same architecture.
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    attention.collect_attention(same, variables, images)
  assert not [r for r in caplog.records if 'Compiling' in r.getMessage()]


def test_rollout_and_distance_are_reduced_batch_by_batch_from_one_pass(tiny, tmp_path,
                                                                       attention_passes):
  """Of 19 images, the first 17 go through the model once, in batches of 8, 8 and 1: the rollout
  of the first 10 and the distance over all 17 are those of all their attention at once."""
  model, variables = tiny
  many = np.random.default_rng(1).uniform(-1, 1, (19, *IMAGE_SHAPE[1:])).astype(np.float32)
  results = run.analyze(model, variables, many, out_dir=tmp_path, which=('rollout', 'distance'),
                        num_shown=10, num_averaged=17)
  assert attention_passes == [17]
  attn = attention.collect_attention(model, variables, many)
  np.testing.assert_allclose(results['rollout']['rollout'].reshape(10, -1),
                             attention.attention_rollout(attn[:, :10], classifier='token'),
                             rtol=1e-6)
  np.testing.assert_allclose(results['distance']['mean_attention_distance'],
                             distance.mean_attention_distance(attn[:, :17], (4, 3), (4, 4), 1),
                             rtol=1e-6)
  assert results['distance']['num_images'] == 17
  # More shown than averaged: the distance is still over the first num_averaged only.
  results = run.analyze(model, variables, many, out_dir=tmp_path, which=('rollout', 'distance'),
                        num_shown=17, num_averaged=10)
  np.testing.assert_allclose(results['distance']['mean_attention_distance'],
                             distance.mean_attention_distance(attn[:, :10], (4, 3), (4, 4), 1),
                             rtol=1e-6)
  assert results['distance']['num_images'] == 10
  with pytest.raises(ConfigError, match='num_shown=0 and num_averaged=None must be positive'):
    run.analyze(model, variables, many, out_dir=tmp_path, which=('rollout',), num_shown=0)


def test_analyses_hold_one_batch_of_attention_not_all_of_it(tmp_path):
  """64 images of 64 px through ViT-Mu_4: 129 MiB of attention in all (4 layers, 2 heads, 257
  tokens), 16 MiB a batch. Holding all of it (and float64 copies) peaked at 648 MiB for the
  distance alone."""
  model = models.create('ViT-Mu_4', num_classes=5)
  many = np.random.default_rng(0).uniform(-1, 1, (64, 64, 64, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), many[:1])
  run.analyze(model, variables, many[:8], out_dir=tmp_path, which=('distance',))  # Compiles.
  all_attention = 4 * 64 * 2 * 257 * 257 * 4
  for which, kwargs in ((('distance',), {}), (('rollout', 'distance'), {'num_shown': 8})):
    tracemalloc.start()
    try:
      run.analyze(model, variables, many, out_dir=tmp_path, which=which, **kwargs)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < all_attention / 2, (which, peak / 2**20)


def _check_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  pixels = mpimg.imread(path)
  assert pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert pixels[..., :3].std() > 0.01  # Not blank.


def test_analyze_writes_every_figure_and_its_numbers(tiny, images, tmp_path):
  model, variables = tiny
  results = run.analyze(model, variables, images, out_dir=tmp_path)
  assert sorted(results) == sorted(run.ANALYSES)
  assert results['rollout']['rollout'].shape == (2, 4, 3)
  assert results['distance']['mean_attention_distance'].shape == (4, 2)
  max_distance = math.hypot(3 * 4, 2 * 4)
  assert (0 < results['distance']['mean_attention_distance']).all()
  assert (results['distance']['mean_attention_distance'] < max_distance).all()
  assert results['posemb']['cosine_similarity'].shape == (4, 3, 4, 3)
  assert results['filters']['components'].shape == (28, 4, 4, 3)
  for name in run.ANALYSES:
    _check_png(tmp_path / f'{name}.png')
    numbers = json.loads((tmp_path / f'{name}.json').read_text())
    assert sorted(numbers) == sorted(results[name])
  numbers = json.loads((tmp_path / 'distance.json').read_text())
  np.testing.assert_allclose(numbers['mean_attention_distance'],
                             results['distance']['mean_attention_distance'])


def test_analyze_a_scanned_gap_sincos_model_runs_only_what_is_asked(tiny, images, tmp_path):
  model = models.create('ViT-Mu_4', num_classes=5, scan=True, classifier='gap', posemb='sincos2d')
  params = dict(tiny[1]['params'], Transformer=dict(tiny[1]['params']['Transformer']))
  del params['cls'], params['Transformer']['posembed_input']  # Neither exists in this model.
  params = scan_layout.unrolled_to_scanned(params)
  results = run.analyze(model, {'params': params}, images, out_dir=tmp_path,
                        which=('rollout', 'posemb'))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'posemb.json', 'posemb.png', 'rollout.json', 'rollout.png']
  np.testing.assert_allclose(results['rollout']['rollout'].sum(axis=(1, 2)), 1, rtol=1e-6)
  sim = results['posemb']['cosine_similarity']
  # The fixed embedding of the 4 x 3 grid (row-major, as the encoder adds it), token by token.
  pe = np.asarray(vit.sincos2d_posemb(4, 3, 64))[0]
  pe = pe / np.linalg.norm(pe, axis=1, keepdims=True)
  np.testing.assert_allclose(sim.reshape(12, 12), pe @ pe.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name,overrides,which,size,match', [
    ('ViT-Mu_4', {}, ('rollout', 'attention'), 16, 'unknown analyses'),
    ('ViT-Mu_4', {'classifier': 'map'}, ('rollout',), 16, 'leave "rollout" out'),
    ('R14+ViT-Mu_8', {}, ('filters',), 16, 'a hybrid model, whose first .* leave "filters" out'),
    ('ViT-Mu_4', {}, ('posemb',), 14, 'does not divide'),
])
def test_analyze_refuses_what_cannot_run_before_any_work(name, overrides, which, size, match,
                                                         tmp_path):
  model = models.create(name, num_classes=5, **overrides)
  with pytest.raises(ConfigError, match=match):
    run.analyze(model, {}, np.zeros((1, size, size, 3)), out_dir=tmp_path / 'out', which=which)
  assert not (tmp_path / 'out').exists()


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
  out = tmp_path / 'figures.png'
  out.write_bytes(b'kept')
  model = models.create('ViT-Mu_4', num_classes=5)
  with pytest.raises(ConfigError, match=r'out_dir .*figures.png is a file: pass a directory'):
    run.analyze(model, {}, np.zeros((1, 16, 16, 3)), out_dir=out, which=('posemb',))
  assert out.read_bytes() == b'kept'


def test_analyze_the_embedded_default_whose_stem_pads_28_px_to_a_4x4_grid(tmp_path):
  model = models.create('R8+ViT-Mu_8', num_classes=10)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
  variables = param_trees.compiled_init(model, images[:1].shape)
  results = run.analyze(model, variables, images, out_dir=tmp_path,
                        which=('rollout', 'distance', 'posemb'))
  assert results['rollout']['rollout'].shape == (2, 4, 4)
  assert results['distance']['patch_size'] == (8, 8)
  # Tokens 8 px apart on a 4x4 grid: no two centres are more than 3 * 8 * sqrt(2) apart.
  distances = results['distance']['mean_attention_distance']
  assert distances.shape == (4, 2) and (0 < distances).all() and (distances < 34).all()
  assert results['posemb']['cosine_similarity'].shape == (4, 4, 4, 4)


def test_save_json_turns_arrays_into_lists(tmp_path):
  plots.save_json(tmp_path / 'x.json', {'a': np.arange(3), 'b': jnp.ones((1, 2)), 'c': (1, 2),
                                        'd': np.float32(0.5), 'e': 'text'})
  assert json.loads((tmp_path / 'x.json').read_text()) == {
      'a': [0, 1, 2], 'b': [[1.0, 1.0]], 'c': [1, 2], 'd': 0.5, 'e': 'text'}
