"""Checkpoint interop: .npz round trips, layout conversion, posemb resizing, transfer, errors."""
import functools
import os
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import tensorflow as tf

import param_trees

from vit_jax import models
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import posemb as posemb_lib
from vit_jax.checkpoints import restore
from vit_jax.checkpoints import transfer
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify

POSEMB = 'Transformer/posembed_input/pos_embedding'


@functools.lru_cache(maxsize=None)
def _variables(num_classes=10, size=(32, 32), seed=0, **overrides):
  """A tiny model and random float32 params of its shapes (cheaper than running its init)."""
  model = models.create('ViT-Mu_4', num_classes=num_classes, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                        flax.linen.meta.unbox(shapes)['params'])
  return model, flax.core.unfreeze(params)


def _one_line_error(fn, *substrings):
  with pytest.raises(ConfigError) as info:
    fn()
  message = str(info.value)
  assert '\n' not in message
  for s in substrings:
    assert s in message, (s, message)
  return message


# --- Position embeddings. ---


def _released_resize(posemb, new_grid, num_prefix):
  """The released vision_transformer procedure, written out independently (rectangular grids)."""
  tok, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  side = int(np.sqrt(len(grid)))
  grid = grid.reshape(side, side, -1)
  zoom = (new_grid[0] / side, new_grid[1] / side, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([tok, grid], axis=1)


@pytest.mark.parametrize('old,new,num_prefix', [
    (7, (14, 14), 1), (4, (6, 10), 1), (5, (3, 7), 0)])
def test_resize_posemb_matches_the_released_zoom(old, new, num_prefix):
  posemb = np.random.RandomState(0).randn(1, num_prefix + old * old, 16).astype(np.float32)
  resized = posemb_lib.resize_posemb(posemb, new, num_prefix_tokens=num_prefix)
  assert resized.dtype == np.float32
  assert resized.shape == (1, num_prefix + new[0] * new[1], 16)
  np.testing.assert_allclose(resized, _released_resize(posemb, new, num_prefix), atol=1e-6)
  np.testing.assert_array_equal(resized[:, :num_prefix], posemb[:, :num_prefix])


def test_resize_posemb_is_corner_aligned_bilinear():
  """Independent of scipy: separable linear interpolation with the corners aligned."""
  rng = np.random.RandomState(1)
  grid = rng.randn(4, 5, 3).astype(np.float32)
  posemb = np.concatenate([rng.randn(1, 1, 3), grid.reshape(1, 20, 3)], axis=1).astype(np.float32)
  weights = lambda n_old, n_new: np.stack(  # Row i: how new position i mixes the old ones.
      [np.interp(np.linspace(0, n_old - 1, n_new), np.arange(n_old), e) for e in np.eye(n_old)], 1)
  expected = np.einsum('ih,jw,hwd->ijd', weights(4, 6), weights(5, 9), grid).reshape(1, 54, 3)
  resized = posemb_lib.resize_posemb(posemb, (6, 9), old_grid=(4, 5))
  np.testing.assert_allclose(resized[:, 1:], expected, atol=1e-6)
  # jax.image.resize centres pixels differently: it is not the released method.
  other = jax.image.resize(grid, (6, 9, 3), 'linear').reshape(1, 54, 3)
  assert np.abs(other - expected).max() > 1e-2


def test_resize_posemb_keeps_dtype_and_needs_a_grid_when_not_square():
  posemb = np.ones((1, 1 + 12, 8), jnp.bfloat16)
  assert posemb_lib.resize_posemb(posemb, (6, 8), old_grid=(3, 4)).dtype == jnp.bfloat16
  _one_line_error(lambda: posemb_lib.resize_posemb(posemb, (6, 8)), '12 patch tokens', 'grid')


# --- .npz save/load. ---


def test_save_load_round_trip_is_bit_exact(tmp_path):
  _, params = _variables()
  path = str(tmp_path / 'ckpt.npz')
  npz.save_npz(params, path)
  loaded = npz.match_params(npz.load_npz(path), params, what=path)
  param_trees.assert_bit_identical(loaded, params)
  assert [p for p in os.listdir(tmp_path)] == ['ckpt.npz']  # No temp file left behind.


def test_scanned_params_save_unrolled_and_load_back_scanned(tmp_path):
  model, params = _variables(scan=True)
  path = str(tmp_path / 'scanned.npz')
  npz.save_npz(params, path)
  with np.load(path) as data:
    assert 'Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel' in data.files
    assert not any(k.startswith('Transformer/encoderblock/') for k in data.files)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  loaded = npz.match_params(npz.load_npz(path), abstract, what=path)
  param_trees.assert_bit_identical(loaded, params)
  # ... and into the unrolled model, equal to its blocks one by one.
  _, unrolled = _variables()
  loaded = npz.match_params(npz.load_npz(path), unrolled, what=path)
  np.testing.assert_array_equal(
      loaded['Transformer']['encoderblock_2']['LayerNorm_0']['scale'],
      params['Transformer']['encoderblock']['LayerNorm_0']['scale'][2])


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
  _, params = _variables()
  path = str(tmp_path / 'ckpt.npz')
  npz.save_npz(params, path)
  before = open(path, 'rb').read()

  def crash(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(np, 'savez', crash)
  with pytest.raises(KeyboardInterrupt):
    npz.save_npz(params, path)
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['ckpt.npz']


def test_released_hybrid_groupnorm_shapes_load(tmp_path):
  """flax.nn saved the released hybrids' GroupNorm scale/bias as (1, 1, 1, C)."""
  model = models.create('R8+ViT-Mu_8', num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                        flax.linen.meta.unbox(shapes)['params'])
  flat = param_trees.flat(params)
  legacy = {k: v.reshape(1, 1, 1, -1) if '/gn' in f'/{k}' and k.endswith(('/scale', '/bias'))
            else v for k, v in flat.items()}
  assert legacy['gn_root/scale'].shape == (1, 1, 1, 32)
  assert legacy['block2/unit1/gn_proj/bias'].shape == (1, 1, 1, 256)
  path = str(tmp_path / 'released_hybrid.npz')
  np.savez(path, **legacy)
  loaded = npz.match_params(npz.load_npz(path), params, what=path)
  param_trees.assert_bit_identical(loaded, params)


def test_object_store_paths_save_and_load(tmp_path):
  """gs:// (the released checkpoints' home) goes through tf.io.gfile; its in-memory ram://
  filesystem stands in for it here, without tell() on its writer, as object stores may be."""
  _, params = _variables()
  path = f'ram://{tmp_path.name}/exported/ckpt.npz'
  npz.save_npz(params, path)
  loaded = npz.match_params(npz.load_npz(path), params, what=path)
  param_trees.assert_bit_identical(loaded, params)
  assert tf.io.gfile.listdir(f'ram://{tmp_path.name}/exported') == ['ckpt.npz']
  _one_line_error(lambda: npz.load_npz(path + '.missing'), 'does not exist')
  truncated = path.replace('ckpt', 'truncated')
  with tf.io.gfile.GFile(path, 'rb') as f, tf.io.gfile.GFile(truncated, 'wb') as g:
    g.write(f.read(5000))
  _one_line_error(lambda: npz.load_npz(truncated), truncated, 'corrupt')


@pytest.mark.parametrize('prefix', ['params/', 'opt/target/'])
def test_prefixed_keys_load(tmp_path, prefix):
  _, params = _variables()
  flat = {prefix + k: np.asarray(v) for k, v in param_trees.flat(params).items()}
  flat['opt/state/step'] = np.zeros(())  # Optimizer state next to the params: ignored.
  path = str(tmp_path / 'old.npz')
  np.savez(path, **flat)
  loaded = npz.match_params(npz.load_npz(path), params, what=path)
  param_trees.assert_bit_identical(loaded, params)


def test_mismatched_keys_are_listed_in_one_line():
  _, params = _variables()
  flat = {k: np.asarray(v) for k, v in param_trees.flat(params).items()}
  del flat['Transformer/encoder_norm/bias']
  flat['Transformer/extra/kernel'] = np.zeros((3,))
  flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'] = np.zeros((64, 128))
  loaded = flax.traverse_util.unflatten_dict(flat, sep='/')
  _one_line_error(
      lambda: npz.match_params(loaded, params, what='ckpt.npz'),
      'missing: [Transformer/encoder_norm/bias]', 'unexpected: [Transformer/extra/kernel]',
      'shape mismatch (checkpoint vs model): Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel '
      '(64, 128) vs (64, 256)', '--config.model', 'ckpt.npz')


def test_head_or_posemb_mismatch_points_to_transfer():
  _, params = _variables()
  _, other = _variables(num_classes=3, size=(48, 32))
  _one_line_error(lambda: npz.match_params(other, params, what='ckpt.npz'),
                  'head/kernel (64, 3) vs (64, 10)', f'{POSEMB} (1, 97, 64) vs (1, 65, 64)',
                  'transfer_params')


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path):
  missing = str(tmp_path / 'nope.npz')
  _one_line_error(lambda: npz.load_npz(missing), missing, 'does not exist')
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'this is not a zip file at all')
  message = _one_line_error(lambda: npz.load_npz(str(garbage)), str(garbage),
                            'not a readable .npz', 'neither a zip archive (.npz) nor a .npy')
  assert 'pickle' not in message  # numpy's own advice, allow_pickle=True, is no fix (and unsafe)
  _, params = _variables()
  good = str(tmp_path / 'good.npz')
  npz.save_npz(params, good)
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(open(good, 'rb').read()[:5000])
  _one_line_error(lambda: npz.load_npz(str(truncated)), str(truncated), 'corrupt')
  with zipfile.ZipFile(tmp_path / 'bad_member.npz', 'w') as z:
    z.writestr('cls.npy', b'\x93NUMPY truncated header')
  _one_line_error(lambda: npz.load_npz(str(tmp_path / 'bad_member.npz')), 'bad_member.npz')
  single = str(tmp_path / 'single.npy')
  np.save(single, np.zeros(3))
  _one_line_error(lambda: npz.load_npz(single), single, 'is a single .npy array')
  with zipfile.ZipFile(tmp_path / 'not_npy.npz', 'w') as z:  # numpy returns such members as bytes.
    z.writestr('head/kernel', b'garbage')
  _one_line_error(lambda: npz.load_npz(str(tmp_path / 'not_npy.npz')),
                  'head/kernel is not an array')
  np.savez(tmp_path / 'objects.npz', cls=np.array([{'a': 1}], dtype=object))
  _one_line_error(lambda: npz.load_npz(str(tmp_path / 'objects.npz')),
                  'an entry holds pickled Python objects')
  np.savez(tmp_path / 'other.npz', a=np.zeros(3), b=np.ones(2))
  _one_line_error(lambda: npz.load_npz(str(tmp_path / 'other.npz')),
                  'holds no ViT params', 'it has a, b', 'the .npz of a ViT')


# --- Transfer. ---


def test_transfer_replaces_head_drops_pre_logits_and_resizes_posemb():
  _, pretrained = _variables(representation_size=64, seed=1)
  model, init = _variables(num_classes=5, size=(48, 32), seed=2)
  lines = []
  params = transfer.transfer_params(pretrained, init, new_grid=(12, 8), log=lines.append)
  assert params['head']['kernel'].shape == (64, 5)
  assert not np.any(params['head']['kernel'])
  assert 'pre_logits' not in params
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 97, 64)
  expected = posemb_lib.resize_posemb(
      pretrained['Transformer']['posembed_input']['pos_embedding'], (12, 8))
  np.testing.assert_array_equal(params['Transformer']['posembed_input']['pos_embedding'],
                                expected)
  rest = lambda p: {k: v for k, v in param_trees.flat(p).items()  # pylint: disable=g-long-lambda
                    if not k.startswith(('head/', 'pre_logits/')) and k != POSEMB}
  param_trees.assert_bit_identical(rest(params), rest(pretrained))
  assert model.apply({'params': params}, jnp.ones((2, 48, 32, 3))).shape == (2, 5)
  text = '\n'.join(lines)
  for s in ('head/kernel set to zeros (64, 5) (pre-trained (64, 10))', 'dropped pre_logits/kernel',
            f'resized {POSEMB} (1, 65, 64) -> (1, 97, 64)'):
    assert s in text, (s, text)


def test_transfer_keeps_pre_logits_into_a_scanned_model():
  _, pretrained = _variables(representation_size=64, seed=1)
  model, init = _variables(num_classes=5, representation_size=64, scan=True)
  params = transfer.transfer_params(pretrained, init, keep_pre_logits=True, log=lambda _: None)
  param_trees.assert_bit_identical(params['pre_logits'], pretrained['pre_logits'])
  np.testing.assert_array_equal(
      params['Transformer']['encoderblock']['MlpBlock_3']['Dense_1']['bias'][3],
      pretrained['Transformer']['encoderblock_3']['MlpBlock_3']['Dense_1']['bias'])
  assert model.apply({'params': params}, jnp.ones((1, 32, 32, 3))).shape == (1, 5)


def test_transfer_errors():
  _, pretrained = _variables(seed=1)
  _, init = _variables(num_classes=5)
  _one_line_error(lambda: transfer.transfer_params(pretrained, init, keep_pre_logits=True),
                  'the checkpoint has no pre-logits layer to keep: drop keep_pre_logits')
  _, with_pre_logits = _variables(seed=1, representation_size=24)
  _one_line_error(lambda: transfer.transfer_params(with_pre_logits, init, keep_pre_logits=True),
                  'in the new model too', "representation_size to the checkpoint's (24)")
  _, gap = _variables(num_classes=5, classifier='gap')
  _one_line_error(lambda: transfer.transfer_params(pretrained, gap), 'class token', 'classifier')
  _, wide = _variables(num_classes=5, size=(48, 32))
  _one_line_error(lambda: transfer.transfer_params(pretrained, wide), '96 patch tokens', 'grid')
  broken = {k: v for k, v in pretrained.items() if k != 'embedding'}
  _one_line_error(lambda: transfer.transfer_params(broken, init),
                  'missing: [embedding/bias, embedding/kernel]', '--config.model')


def test_transfer_regrids_at_the_same_token_count():
  _, pretrained = _variables(seed=1)
  _, init = _variables(num_classes=5)
  lines = []
  params = transfer.transfer_params(pretrained, init, old_grid=(4, 16), new_grid=(8, 8),
                                    log=lines.append)
  np.testing.assert_array_equal(
      params['Transformer']['posembed_input']['pos_embedding'],
      posemb_lib.resize_posemb(pretrained['Transformer']['posembed_input']['pos_embedding'],
                               (8, 8), old_grid=(4, 16)))
  assert any(line.startswith(f'transfer: resized {POSEMB}') for line in lines)


def test_a_npz_file_with_another_extension_or_none_loads_as_a_npz(tmp_path):
  """Only a folder can be a workdir: a file is read as a .npz, whatever its name."""
  _, params = _variables()
  for name in ('CKPT.NPZ', 'ckpt'):
    npz.save_npz(params, str(tmp_path / name))
    param_trees.assert_bit_identical(restore.load(str(tmp_path / name), 'ViT-Mu_4').params,
                                     params)


# --- Options a .npz shows in its keys; big_vision's layout. ---


def _photos() -> np.ndarray:
  """Two of scikit-image's photos at 32 px in [-1, 1], as the eval pipeline scales them."""
  return np.stack([jax.image.resize(p.astype(np.float32), (32, 32, 3), 'bilinear') / 127.5 - 1
                   for p in (skimage.data.astronaut(), skimage.data.coffee())])


@pytest.mark.parametrize('overrides', [
    {'representation_size': 24},  # ImageNet-21k's released checkpoints have a pre-logits layer.
    {'classifier': 'gap'},
    {'classifier': 'map', 'posemb': 'sincos2d'},
    {'patch_size': (4, 8)}])  # No name gives it; the image size was guessed from square patches.
def test_a_npz_needs_only_its_model_name_for_the_options_its_keys_show(overrides, tmp_path):
  model, params = _variables(**overrides)
  path = str(tmp_path / 'ckpt.npz')
  npz.save_npz(params, path)
  pretrained = restore.load_for_reading(path, 'ViT-Mu_4', image_size=32)
  assert pretrained.model_overrides == overrides
  if overrides.get('posemb') != 'sincos2d':
    assert restore.load(path, 'ViT-Mu_4').image_size == 32
  photos = _photos()
  classifier = classify.Classifier(classify.load_checkpoint(path, 'ViT-Mu_4', image_size=32),
                                   batch_size=2)
  expected = np.asarray(model.apply({'params': params}, jnp.asarray(photos)))
  np.testing.assert_allclose(classifier.logits(photos), expected,
                             atol=1e-5 * np.abs(expected).max())  # Other batch, other floats.
  # What the user gives still wins (fine-tuning's model_overrides).
  assert restore.load(path, 'ViT-Mu_4', {'classifier': 'token'}).model_overrides == {
      **overrides, 'classifier': 'token'}


@pytest.mark.parametrize('overrides,scanned', [
    ({}, False), ({}, True), ({'classifier': 'gap'}, False),
    ({'classifier': 'map', 'posemb': 'sincos2d'}, True)])
def test_big_vision_npz_files_load_as_the_same_model(overrides, scanned, tmp_path):
  """Also the position embeddings' place before 2022 (`Transformer/pos_embedding`, cls row first),
  which big_vision's loader still reads."""
  model, params = _variables(**overrides)
  path = str(tmp_path / 'big_vision.npz')
  param_trees.big_vision_npz(params, path, scanned=scanned)
  assert 'params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' in np.load(path) or scanned
  pretrained = restore.load(path, 'ViT-Mu_4')
  assert pretrained.model_overrides == overrides
  loaded = npz.match_params(pretrained.params, params, what=path)
  images = jnp.asarray(_photos())
  expected = np.asarray(model.apply({'params': params}, images))
  np.testing.assert_allclose(model.apply({'params': loaded}, images), expected,
                             atol=1e-5 * np.abs(expected).max())
  if 'cls' in params:  # The class token's posemb row moved into it, so the row is zero here.
    assert not np.any(loaded['Transformer']['posembed_input']['pos_embedding'][:, 0])
  if overrides.get('posemb') != 'sincos2d':  # Before 2022: the released posemb, in the encoder.
    old = {k: v for k, v in np.load(path).items()
           if k not in ('params/pos_embedding', 'params/cls')}
    old['params/Transformer/pos_embedding'] = params['Transformer']['posembed_input'][
        'pos_embedding']
    old.update({'params/cls': params['cls']} if 'cls' in params else {})
    np.savez(tmp_path / 'old.npz', **old)
    param_trees.assert_bit_identical(
        npz.match_params(npz.load_npz(str(tmp_path / 'old.npz')), params, what='old'), params)
