"""Our released-layout .npz files read by an independent reader: timm's loader of the released ViTs.

The layout tests (test_models.py) check names and shapes; this checks meaning: every tensor lands
where timm's PyTorch ViT, which runs the released checkpoints, expects it, so both give the same
logits. The big_vision-layout files other tests load are checked the same way against timm's
big_vision branch, and timm's own state dicts (.safetensors) read back to the params timm loaded.
Needs torch and timm (`make test-interop` installs them in a venv of their own, ~8 GB).
"""
import functools
import logging

import pytest

# Before TensorFlow (which vit_jax's .npz module loads): torch's triton segfaults loaded after it.
torch = pytest.importorskip('torch', reason='make test-interop installs torch and timm')
timm = pytest.importorskip('timm', reason='make test-interop installs torch and timm')
from timm.models import _hub as timm_hub  # pylint: disable=wrong-import-position
from timm.models import vision_transformer as timm_vit  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-order
import jax.numpy as jnp
import numpy as np
import PIL.Image
import skimage.data

import param_trees
from safetensors.torch import save_file
from vit_jax import models
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import restore
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify

pytestmark = pytest.mark.interop

NUM_CLASSES = 7
# Flax's nn.gelu (the released code's) is the tanh approximation; timm's default is the exact erf.
_GELU = functools.partial(torch.nn.GELU, approximate='tanh')


def _timm_vit(patch: int, width: int, heads: int, **kwargs):
  kwargs.setdefault('num_classes', NUM_CLASSES)
  return timm_vit.VisionTransformer(img_size=224, patch_size=patch, embed_dim=width, depth=12,
                                    num_heads=heads, act_layer=_GELU, **kwargs)


# name, overrides, timm's model of the same architecture, tolerance on the logits.
CASES = {
    'ViT-Ti_16': ({}, lambda: _timm_vit(16, 192, 3), 1e-5),
    'ViT-S_32': ({}, lambda: _timm_vit(32, 384, 6), 1e-5),
    # i21k's released checkpoints have a tanh pre-logits layer, which timm no longer builds: its
    # features go through the layer by hand below.
    'ViT-B_16 pre-logits': ({'representation_size': 768},
                            lambda: _timm_vit(16, 768, 12, num_classes=0), 1e-5),
    # big_vision's gap: the encoder's last LayerNorm, then the mean (timm's fc_norm=False).
    'ViT-S_16 gap': ({'classifier': 'gap'},
                     lambda: _timm_vit(16, 384, 6, global_pool='avg', class_token=False,
                                       fc_norm=False), 1e-5),
    'ViT-S_16 map': ({'classifier': 'map'},
                     lambda: _timm_vit(16, 384, 6, global_pool='map', class_token=False), 1e-5),
    # timm standardises the stem's kernels as (w - mean) / sqrt(var + 1e-8); the released StdConv
    # (ours) as (w - mean) / (std + 1e-5): hence the looser bound.
    'R50+ViT-B_16': ({}, lambda: timm.create_model('vit_base_r50_s16_224', act_layer=_GELU,
                                                   num_classes=NUM_CLASSES), 5e-5),
    'R26+ViT-S_32': ({}, lambda: timm.create_model('vit_small_r26_s32_224', act_layer=_GELU,
                                                   num_classes=NUM_CLASSES), 5e-5),
}


@functools.lru_cache(maxsize=None)
def _photos() -> np.ndarray:
  """Four of scikit-image's sample photos at 224 px, scaled to [-1, 1] as the eval pipeline does."""
  photos = (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket())
  resized = [jax.image.resize(p.astype(np.float32), (224, 224, 3), 'bilinear') for p in photos]
  return np.stack(resized) / 127.5 - 1


def _perturbed_params(model):
  """Init params plus noise: a zero head, zero biases and unit norms would hide swapped tensors."""
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))['params']
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _timm_logits(timm_model, path: str, overrides) -> np.ndarray:
  theirs_model = timm_model().eval()
  with torch.no_grad():
    timm_vit._load_weights(theirs_model, path)  # pylint: disable=protected-access
    theirs = theirs_model(torch.from_numpy(_photos()).permute(0, 3, 1, 2).float())
    if overrides.get('representation_size'):
      saved = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
      theirs = torch.tanh(theirs @ saved['pre_logits/kernel'] + saved['pre_logits/bias'])
      theirs = theirs @ saved['head/kernel'] + saved['head/bias']
  return theirs.numpy()


@pytest.mark.parametrize('case', list(CASES))
def test_timm_loads_our_npz_and_gives_our_logits(case, tmp_path):
  overrides, timm_model, tolerance = CASES[case]
  model = models.create(case.split()[0], num_classes=NUM_CLASSES, **overrides)
  params = _perturbed_params(model)
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(_photos())))
  path = str(tmp_path / 'params.npz')
  npz.save_npz(params, path)
  assert np.abs(ours).max() > 0.5  # Logits of a size that a misplaced tensor would change.
  np.testing.assert_allclose(_timm_logits(timm_model, path, overrides), ours, rtol=0,
                             atol=tolerance * np.abs(ours).max())


# big_vision's layout (tests/param_trees.big_vision_npz writes it), read by timm's big_vision
# branch; its token model adds the position embeddings before prepending the class token.
BIG_VISION_CASES = {
    'ViT-S_16': ({}, lambda: _timm_vit(16, 384, 6, no_embed_class=True)),
    'ViT-S_16 gap scanned': ({'classifier': 'gap'}, CASES['ViT-S_16 gap'][1]),
}


@pytest.mark.parametrize('case', list(BIG_VISION_CASES))
def test_the_big_vision_files_of_the_tests_are_big_visions_layout(case, tmp_path):
  """What test_checkpoints_interop loads as big_vision's files, timm reads as big_vision's too,
  to the logits of the model they were written from; and they load back here."""
  overrides, timm_model = BIG_VISION_CASES[case]
  model = models.create(case.split()[0], num_classes=NUM_CLASSES, **overrides)
  params = _perturbed_params(model)
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(_photos())))
  path = str(tmp_path / 'big_vision.npz')
  param_trees.big_vision_npz(jax.device_get(params), path, scanned='scanned' in case)
  np.testing.assert_allclose(_timm_logits(timm_model, path, overrides), ours, rtol=0,
                             atol=1e-5 * np.abs(ours).max())
  loaded = npz.match_params(npz.load_npz(path), params, what=path)
  np.testing.assert_allclose(model.apply({'params': loaded}, jnp.asarray(_photos())), ours,
                             rtol=0, atol=1e-5 * np.abs(ours).max())


# timm's own files: a timm ViT loads a .npz with timm's loader and saves its state dict as timm
# and the hub do (model.safetensors); that file reads here to the params the .npz held (timm's
# token model with no_embed_class: the same model, a zero position embedding for the class token).
@pytest.mark.parametrize('case', ['ViT-Ti_16', 'ViT-S_32', 'ViT-S_16 gap', 'big_vision ViT-S_16'])
def test_timm_state_dicts_read_back_to_the_params_timm_loaded(case, tmp_path):
  big_vision = case.startswith('big_vision ')
  name = case.removeprefix('big_vision ')
  overrides, timm_model = (BIG_VISION_CASES[name] if big_vision else CASES[name][:2])
  model = models.create(name.split()[0], num_classes=NUM_CLASSES, **overrides)
  params = jax.device_get(_perturbed_params(model))
  path = str(tmp_path / 'params.npz')
  if big_vision:
    param_trees.big_vision_npz(params, path)
  else:
    npz.save_npz(params, path)
  theirs = timm_model().eval()
  timm_vit._load_weights(theirs, path)  # pylint: disable=protected-access
  safetensors_path = str(tmp_path / 'model.safetensors')
  save_file(theirs.state_dict(), safetensors_path)
  loaded = restore.load(safetensors_path, name.split()[0], overrides)
  if not big_vision:
    param_trees.assert_bit_identical(loaded.params, params)
  ours = model.apply({'params': params}, jnp.asarray(_photos()))
  np.testing.assert_allclose(model.apply({'params': loaded.params}, jnp.asarray(_photos())), ours,
                             rtol=0, atol=1e-5 * np.abs(ours).max())
  # The model a timm file builds here runs timm's default, exact GELU, as timm's ViTs do.
  for block in theirs.blocks:
    block.mlp.act = torch.nn.GELU()
  with torch.no_grad():
    exact = theirs(torch.from_numpy(_photos()).permute(0, 3, 1, 2).float()).numpy()
  from_file = loaded.create_model(NUM_CLASSES).apply({'params': loaded.params},
                                                     jnp.asarray(_photos()))
  np.testing.assert_allclose(from_file, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize('timm_model,option', [
    (CASES['ViT-S_16 map'][1], 'a MAP head'),
    (CASES['R26+ViT-S_32'][1], 'a hybrid ResNet stem'),
    (lambda: _timm_vit(16, 384, 6, global_pool='avg', class_token=False), 'fc_norm'),
    (lambda: _timm_vit(16, 384, 6, init_values=0.1), 'layer scale')])
def test_timm_options_the_released_layout_lacks_are_one_line(timm_model, option, tmp_path):
  path = str(tmp_path / 'model.safetensors')
  save_file(timm_model().state_dict(), path)
  with pytest.raises(ConfigError, match=option):
    restore.load(path, 'ViT-S_16')


def _saved_for_the_hub(architecture: str, folder, **kwargs) -> tuple[object, str]:
  """A timm model, its weights perturbed, saved as timm saves for the hub (save_for_hf:
  model.safetensors beside its config.json)."""
  theirs = timm.create_model(architecture, num_classes=NUM_CLASSES, **kwargs).eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for parameter in theirs.parameters():
      parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
  timm_hub.save_for_hf(theirs, str(folder), safe_serialization=True)
  return theirs, str(folder / 'model.safetensors')


def test_timms_hub_folders_name_their_model_pooling_and_normalisation(tmp_path, caplog):
  theirs, path = _saved_for_the_hub('vit_tiny_patch16_224', tmp_path / 'plain')
  loaded = restore.load(path)  # The model from timm's config.json.
  assert loaded.model == 'ViT-Ti_16'
  with torch.no_grad():
    exact = theirs(torch.from_numpy(_photos()).permute(0, 3, 1, 2).float()).numpy()
  ours = loaded.create_model(NUM_CLASSES).apply({'params': loaded.params}, jnp.asarray(_photos()))
  np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
  # The mean of the patch tokens beside a class token, which no tensor shows.
  _, path = _saved_for_the_hub('vit_tiny_patch16_224', tmp_path / 'avg', global_pool='avg',
                               fc_norm=False)
  with pytest.raises(ConfigError, match="pools the mean of the patch tokens beside a class token"):
    restore.load(path)
  _, path = _saved_for_the_hub('deit_tiny_patch16_224', tmp_path / 'deit')
  with caplog.at_level(logging.WARNING):
    deit = restore.load(path)
  assert deit.model == 'ViT-Ti_16' and not caplog.records
  assert (deit.eval_pp()['mean'], deit.eval_pp()['std']) == (  # ImageNet's, for readers.
      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize('architecture,eval_pp', [
    ('vit_tiny_patch16_224', {'crop': 'timm', 'crop_fraction': 0.9, 'mean': (0.5,),
                              'std': (0.5,)}),
    ('deit_tiny_patch16_224', {'crop': 'timm', 'crop_fraction': 0.9,
                               'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)})])
def test_timms_weights_score_the_pixels_timm_evaluates_them_on(architecture, eval_pp, tmp_path):
  """timm's own eval transform (resolve_data_config and create_transform on the images PIL
  reads: its crop_pct, bicubic, central crop, mean and std) against ours on real photos saved as
  JPEGs, wide and tall, read from the config.json beside the weights; then the logits of infer's
  classifier and of timm's model."""
  theirs, path = _saved_for_the_hub(architecture, tmp_path / 'hub')
  data_config = timm.data.resolve_data_config({}, model=theirs)
  assert (data_config['crop_pct'], data_config['interpolation']) == (eval_pp['crop_fraction'],
                                                                     'bicubic')
  transform = timm.data.create_transform(**data_config)
  classifier = classify.Classifier.from_checkpoint(path)
  assert classifier.checkpoint.eval_pp == eval_pp
  photos = {'astronaut': skimage.data.astronaut(), 'coffee': skimage.data.coffee(),
            'chelsea': skimage.data.chelsea(), 'rocket': skimage.data.rocket().transpose(1, 0, 2)}
  paths = [str(tmp_path / f'{name}.jpg') for name in photos]
  for path, photo in zip(paths, photos.values()):
    PIL.Image.fromarray(photo).save(path, quality=95)
  ours = np.stack([classifier.checkpoint.read(path) for path in paths])
  timms = torch.stack([transform(PIL.Image.open(path).convert('RGB')) for path in paths])
  timms = timms.permute(0, 2, 3, 1).numpy()  # (x / 255 - mean) / std, as ours.
  levels = np.abs(ours - timms) * 255 * np.array(eval_pp['std'])  # PIL's 8-bit passes: 1 or 2.
  assert levels.max() < 2.01 and levels.mean() < 0.01, (levels.max(), levels.mean())
  with torch.no_grad():
    expected = theirs(torch.from_numpy(timms).permute(0, 3, 1, 2)).numpy()
  infer = np.stack([p.logits for p in classifier.classify_files(paths)])
  np.testing.assert_allclose(infer, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
  if eval_pp['mean'] == (0.5,):  # A .npz says none of it: --crop and --crop_fraction do.
    # (Its model runs the released tanh GELU, not timm's exact one: logits ~5e-4 apart.)
    npz_path = str(tmp_path / 'weights.npz')
    npz.save_npz(classifier.checkpoint.params, npz_path)
    from_npz = classify.load_checkpoint(npz_path, 'ViT-Ti_16',
                                        eval_pp={'crop': 'timm', 'crop_fraction': 0.9})
    np.testing.assert_array_equal(np.stack([from_npz.read(path) for path in paths]), ours)
