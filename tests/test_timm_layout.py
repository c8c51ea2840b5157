"""timm's `.safetensors` ViT weights read into the released layout (checkpoints/timm_layout.py).

Without torch here, the reference is timm's ViT forward written in numpy in timm's conventions
(Linear weights (out, in), a conv weight (out, in, h, w), q, k, v as the rows of one qkv weight):
our model given the converted params must give its logits, so a wrong transpose, split or head
order shows. `make test-interop` checks the same files against timm itself.
"""
import json
import logging
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from safetensors.numpy import save_file
import tensorflow as tf

import config_files
import param_trees
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import restore
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.data import preprocess
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify
from vit_jax.training import experiment
from vit_jax.training import finetune
from vit_jax.training import loop

WIDTH, MLP, HEADS, LAYERS, PATCH, IMAGE = 64, 256, 2, 4, 4, 8  # ViT-Mu_4 on 8 px grey images.
HALF = {'mean': (0.5,), 'std': (0.5,)}  # The inputs of timm's ViTs: [-1, 1], as the released.


def _timm_state(seed: int = 0, classes: int = 5, cls_token: bool = True,
                embed_class: bool = True, *, width: int = WIDTH, mlp: int = MLP,
                layers: int = LAYERS, patch: int = PATCH) -> dict[str, np.ndarray]:
  """Random weights under timm's names and shapes (of a ViT-Mu_4 unless told), for a one-channel
  image of IMAGE px (ViT-Ti_16's grid is 1x1)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  tokens = max(IMAGE // patch, 1) ** 2 + int(cls_token and embed_class)
  state = {'patch_embed.proj.weight': normal(width, 1, patch, patch),
           'patch_embed.proj.bias': normal(width), 'pos_embed': normal(1, tokens, width),
           'norm.weight': 1 + normal(width), 'norm.bias': normal(width),
           'head.weight': normal(classes, width), 'head.bias': normal(classes)}
  if cls_token:
    state['cls_token'] = normal(1, 1, width)
  for i in range(layers):
    state |= {f'blocks.{i}.{k}': v for k, v in {
        'norm1.weight': 1 + normal(width), 'norm1.bias': normal(width),
        'attn.qkv.weight': normal(3 * width, width), 'attn.qkv.bias': normal(3 * width),
        'attn.proj.weight': normal(width, width), 'attn.proj.bias': normal(width),
        'norm2.weight': 1 + normal(width), 'norm2.bias': normal(width),
        'mlp.fc1.weight': normal(mlp, width), 'mlp.fc1.bias': normal(mlp),
        'mlp.fc2.weight': normal(width, mlp), 'mlp.fc2.bias': normal(width)}.items()}
  return state


def _layer_norm(x, weight, bias):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * weight + bias


def _timm_logits(state: dict[str, np.ndarray], images: np.ndarray,
                 heads: int = HEADS) -> np.ndarray:
  """timm's VisionTransformer.forward in numpy (float64), with its default, exact GELU (the
  released models' is the tanh approximation)."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  linear = lambda x, name: x @ s[f'{name}.weight'].T + s.get(f'{name}.bias', 0)
  b, grid = len(images), IMAGE // PATCH
  patches = images.reshape(b, grid, PATCH, grid, PATCH, 1).transpose(0, 1, 3, 5, 2, 4)
  x = np.einsum('bhwcij,dcij->bhwd', patches, s['patch_embed.proj.weight'])
  x = x.reshape(b, grid * grid, WIDTH) + s['patch_embed.proj.bias']
  cls = np.broadcast_to(s['cls_token'], (b, 1, WIDTH)) if 'cls_token' in s else None
  if cls is not None and s['pos_embed'].shape[1] == grid * grid:  # no_embed_class
    x = np.concatenate([cls, x + s['pos_embed']], axis=1)
  else:
    x = (x if cls is None else np.concatenate([cls, x], axis=1)) + s['pos_embed']
  for i in range(LAYERS):
    p = f'blocks.{i}.'
    y = linear(_layer_norm(x, s[p + 'norm1.weight'], s[p + 'norm1.bias']), p + 'attn.qkv')
    q, k, v = y.reshape(b, -1, 3, heads, WIDTH // heads).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(WIDTH // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(b, -1, WIDTH)
    x = x + linear(attended, p + 'attn.proj')
    h = linear(_layer_norm(x, s[p + 'norm2.weight'], s[p + 'norm2.bias']), p + 'mlp.fc1')
    h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
    x = x + linear(h, p + 'mlp.fc2')
  x = _layer_norm(x, s['norm.weight'], s['norm.bias'])
  return linear(x[:, 0] if 'cls_token' in s else x.mean(1), 'head')


def _images() -> np.ndarray:
  return np.random.default_rng(7).uniform(-1, 1, (3, IMAGE, IMAGE, 1))


@pytest.mark.parametrize('kind', ['class token', 'no_embed_class', 'gap', 'no biases'])
def test_our_model_on_the_converted_weights_gives_timms_logits(kind, tmp_path):
  """Through the readers' loader (infer, analyze, fewshot): the architecture from the model's
  name and the file's keys, the resolution from its position embeddings."""
  state = _timm_state(cls_token=kind != 'gap', embed_class=kind != 'no_embed_class')
  if kind == 'no biases':  # qkv_bias=False, proj_bias=False: zero biases, the same layers.
    state = {k: v for k, v in state.items()
             if not re.match(r'blocks\.\d+\.(attn|mlp)\.\w+\.bias$', k)}
  path = str(tmp_path / 'model.safetensors')
  save_file(state, path)
  checkpoint = classify.load_checkpoint(path, 'ViT-Mu_4')
  assert checkpoint.model.classifier == ('gap' if kind == 'gap' else 'token')
  assert not checkpoint.model.gelu_approximate
  assert (checkpoint.image_size, checkpoint.channels, checkpoint.pretrained.source) == (
      IMAGE, 1, path)
  ours = np.asarray(checkpoint.model.apply({'params': checkpoint.params},
                                           jnp.asarray(_images(), jnp.float32)))
  theirs = _timm_logits(state, _images())
  assert np.abs(theirs).max() > 0.5  # Logits of a size that a misplaced tensor would change.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())


def test_a_timm_file_fine_tunes_from_its_weights_with_a_new_head(prepared_data_dir, tmp_path):
  """The fine-tune's start: the file's weights, a zero head for digits' 10 classes, position
  embeddings resized to 16 px (a 4x4 grid)."""
  path = str(tmp_path / 'model.safetensors')
  save_file(_timm_state(), path)
  config = config_files.get_config('finetune/digits')
  config.update(data_dir=prepared_data_dir, init=path, model='ViT-Mu_4', image_size=16, channels=1)
  pre = restore.load(path, config.model)
  exp = experiment.build(finetune.with_architecture(config, pre.model, pre.model_overrides,
                                                    pre.channels))
  assert not exp.model.gelu_approximate  # timm's GELU, kept for fine-tuning too.
  params = param_trees.flat(jax.device_get(finetune.initial_state(exp, pre).params))
  converted = param_trees.flat(pre.params)
  assert params['head/kernel'].shape == (WIDTH, 10) and not params['head/kernel'].any()
  assert params[npz.POSEMB_KEY].shape == (1, 1 + 4 * 4, WIDTH)
  for key in ('embedding/kernel', 'cls', 'Transformer/encoderblock_3/MlpBlock_3/Dense_1/kernel'):
    np.testing.assert_array_equal(params[key], converted[key])


def test_fine_tuning_normalises_as_the_weights_expect_and_resuming_keeps_it(
    prepared_data_dir, tmp_path, monkeypatch):
  """DeiT's weights fine-tune on inputs normalised by the mean and std they expect, trained and
  evaluated alike; a resumed fine-tune takes them from its saved config, not from the command
  line's [-1, 1] default."""
  deit = _hub_snapshot(tmp_path / 'deit', _timm_state(), 'vit_mu_patch4_8', mean=(0.485,),
                       std=(0.229,), num_heads=HEADS)
  runs = []  # The configs fine-tuning would train with.
  monkeypatch.setattr(finetune, 'initial_state', lambda *args, **kwargs: None)
  monkeypatch.setattr(finetune.loop, 'train_and_evaluate',
                      lambda config, *args, **kwargs: runs.append(config))
  command_line = config_files.get_config('finetune/digits')
  command_line.update(data_dir=prepared_data_dir, init=deit, model='ViT-Mu_4', image_size=16)
  workdir = str(tmp_path / 'fine_tune')
  finetune.finetune(command_line.copy_and_resolve_references(), workdir)
  with Checkpointer(workdir) as checkpointer:  # What that run saves.
    checkpointer.save(2, {'w': np.zeros(3)}, {'step': 2, 'config': runs[0].to_dict()})
  finetune.finetune(command_line.copy_and_resolve_references(), workdir)
  for config in runs:
    for part in ('train', 'eval'):
      assert (config.pp[part].mean, config.pp[part].std) == ((0.485,), (0.229,)), part
  assert loop.config_changes(json.loads(json.dumps(runs[0].to_dict())), runs[1]) == []


def test_bfloat16_weights_and_a_headless_file_load(tmp_path):
  """The hub's files are often bfloat16; a file saved with num_classes=0 has no head."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  state = {k: v for k, v in _timm_state().items() if not k.startswith('head.')}
  path = str(tmp_path / 'bf16.safetensors')
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, path)
  pretrained = restore.load(path, 'ViT-Mu_4')
  assert 'head' not in pretrained.params and pretrained.num_classes == 0
  kernel = pretrained.params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, state['blocks.0.mlp.fc1.weight'].astype(ml_dtypes.bfloat16).astype(np.float32).T)


ONES = np.ones(WIDTH, np.float32)


@pytest.mark.parametrize('change,message', [
    ({'fc_norm.weight': ONES}, r'has what the released ViT layout does not hold: a LayerNorm '
                               r"after the pooling \(fc_norm, timm's default for "
                               r"global_pool='avg'\) \(fc_norm\.weight\)\. Only plain timm ViTs"),
    ({'attn_pool.latent': ONES[None, None]}, r'a MAP head'),
    ({'blocks.0.ls1.gamma': ONES}, r'hold: layer scale \(blocks\.0\.ls1\.gamma\)\.'),
    ({'blocks.0.gamma_1': ONES, 'dist_token': ONES[None, None]},  # Each option is named.
     r"hold: a distillation token \(DeiT's distilled models\) \(dist_token\); layer scale "
     r'\(blocks\.0\.gamma_1\)\.'),
    ({'patch_embed.norm.weight': ONES}, r'a LayerNorm on the patch embeddings'),
    ({'patch_embed.backbone.stem.conv.weight': np.ones((8, 3, 7, 7), np.float32)},
     r'a hybrid ResNet stem \(use the released R50\+ViT \.npz\)'),
    ({'blocks.0.attn.relative_position_bias_table': ONES, 'blocks.1.attn.relative_position_index':
      ONES},  # Any tensor left over, named.
     r'has tensors the released ViT layout has no place for: blocks\.0\.attn\.relative_position_'
     r'bias_table, blocks\.1\.attn\.relative_position_index\. Only plain timm ViTs load'),
    ({'norm.weight': None}, r"lacks 'norm\.weight', which a timm ViT has"),
    ({'patch_embed.proj.weight': None}, r'holds no timm ViT \(no patch_embed\.proj\.weight'),
])
def test_what_the_released_layout_cannot_hold_is_one_line_naming_it(change, message, tmp_path):
  state = _timm_state()
  for key, value in change.items():
    if value is None:
      del state[key]
    else:
      state[key] = value
  path = str(tmp_path / 'model.safetensors')
  save_file(state, path)
  with pytest.raises(ConfigError, match=message) as error:
    restore.load(path, 'ViT-Mu_4')
  assert '\n' not in str(error.value) and path in str(error.value)


def test_unreadable_files_and_a_missing_model_are_one_line(tmp_path):
  path = str(tmp_path / 'model.safetensors')
  save_file(_timm_state(), path)
  with pytest.raises(ConfigError, match='holds no architecture: name the model'):
    restore.load(path)
  with pytest.raises(ConfigError, match=r'is 64 wide, the model named 192: name the model it was '
                                        'trained as$'):
    restore.load(path, 'ViT-Ti_16')
  (tmp_path / 'folder.safetensors').mkdir()
  with pytest.raises(ConfigError, match=r'folder\.safetensors is a directory: point it at the '
                                        r'model\.safetensors file inside$'):
    restore.load(str(tmp_path / 'folder.safetensors'), 'ViT-Mu_4')
  truncated = str(tmp_path / 'truncated.safetensors')
  with open(path, 'rb') as f, open(truncated, 'wb') as out:
    out.write(f.read()[:2000])
  with pytest.raises(ConfigError, match=r'is not a readable \.safetensors file \(.*\): it is '
                                        'corrupt or truncated; re-download or re-save it$'):
    restore.load(truncated, 'ViT-Mu_4')


def _hub_snapshot(folder, state: dict[str, np.ndarray], architecture: str, pool: str = 'token',
                  mean: tuple[float, ...] = (0.5,) * 3, std: tuple[float, ...] = (0.5,) * 3,
                  labels: Optional[dict] = None, eval_transform: Optional[dict] = None,
                  **model_args) -> str:
  """The hub's layout, as timm's save_for_hf writes it: the weights and config.json in one
  folder (`labels`: its label_names and label_descriptions; `eval_transform`: pretrained_cfg's
  crop_pct, interpolation, crop_mode)."""
  folder.mkdir()
  save_file(state, str(folder / 'model.safetensors'))
  (folder / 'config.json').write_text(json.dumps({
      'architecture': architecture, 'num_classes': 5, 'num_features': WIDTH, 'global_pool': pool,
      **(labels or {}),
      'model_args': {'in_chans': 1, 'num_classes': 5, 'global_pool': pool, **model_args},
      'pretrained_cfg': {'tag': 'augreg_in21k', 'mean': mean, 'std': std,
                         **(eval_transform or {})}}))
  return str(folder / 'model.safetensors')


def test_the_hub_config_beside_the_file_names_its_model(tmp_path):
  state = _timm_state(width=192, mlp=768, layers=12, patch=16)
  path = _hub_snapshot(tmp_path / 'ti', state, 'vit_tiny_patch16_224')
  pretrained = restore.load(path)  # No model named: its config.json's, ViT-Ti_16.
  assert pretrained.model == 'ViT-Ti_16'
  from_folder = restore.load(str(tmp_path / 'ti'))  # The folder, as timm takes it.
  assert (from_folder.model, from_folder.source) == ('ViT-Ti_16', path)
  param_trees.assert_bit_identical(from_folder.params, pretrained.params)
  assert pretrained.params['Transformer']['encoderblock_11']['MlpBlock_3']['Dense_0'][
      'kernel'].shape == (192, 768)
  assert classify.load_checkpoint(path).model.num_heads == 3
  with pytest.raises(ConfigError, match=(
      r"holds timm's vit_tiny_patch16_224 \(its config\.json says\), which is ViT-Ti_16 here, "
      r"not ViT-S_16: name ViT-Ti_16 as the model \(--model; fine-tuning's --config\.model\)$")):
    restore.load(path, 'ViT-S_16')
  gap = _hub_snapshot(tmp_path / 'gap', _timm_state(), 'vit_base_patch16_gap_224', 'avg')
  with pytest.raises(ConfigError, match=(
      r"holds no architecture \(its config\.json names timm's vit_base_patch16_gap_224, which "
      r"has no name here\): name the model it was trained as \(--model; fine-tuning's "
      r'--config\.model\), e\.g\. ViT-B_16$')):
    restore.load(gap)


@pytest.mark.parametrize('cls_token,pool,refusal', [
    (True, 'token', None), (False, 'avg', None),
    (True, 'avg', r"pools the mean of the patch tokens beside a class token \(global_pool='avg'\), "
                  r'which the released ViT layout does not hold'),
    (False, 'max', r"pools global_pool='max', which the released ViT layout does not hold: only "
                   r"timm's global_pool='token' \(with a class token\) or 'avg' \(without "
                   r"one\) load$"),
])
def test_the_hub_configs_pooling_is_read_or_refused(cls_token, pool, refusal, tmp_path):
  state = _timm_state(cls_token=cls_token)
  path = _hub_snapshot(tmp_path / 'hub', state, 'vit_mu_patch4_8', pool)
  if refusal:
    with pytest.raises(ConfigError, match=refusal) as error:
      restore.load(path, 'ViT-Mu_4')
    assert '\n' not in str(error.value) and 'config.json' in str(error.value)
    return
  checkpoint = classify.load_checkpoint(path, 'ViT-Mu_4')
  assert checkpoint.model.classifier == {'token': 'token', 'avg': 'gap'}[pool]
  ours = checkpoint.model.apply({'params': checkpoint.params}, jnp.asarray(_images(), jnp.float32))
  theirs = _timm_logits(state, _images())
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())


def test_a_head_count_the_hub_config_gives_is_the_models(tmp_path, caplog):
  """timm records num_heads in model_args when create_model was given it: read, the logits are
  timm's, and nothing is assumed (no warning)."""
  state = _timm_state()
  path = _hub_snapshot(tmp_path / 'hub', state, 'vit_mu_patch4_8', num_heads=4)
  with caplog.at_level(logging.WARNING):
    checkpoint = classify.load_checkpoint(path, 'ViT-Mu_4')
  assert checkpoint.model.num_heads == 4 and not caplog.records
  ours = checkpoint.model.apply({'params': checkpoint.params}, jnp.asarray(_images(), jnp.float32))
  theirs = _timm_logits(state, _images(), heads=4)
  assert np.abs(theirs - _timm_logits(state, _images())).max() > 1e-3  # The heads matter.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())


def test_what_the_hub_config_says_is_assumed_is_logged(tmp_path, caplog):
  plain = _hub_snapshot(tmp_path / 'plain', _timm_state(width=192, mlp=768, layers=12, patch=16),
                        'vit_tiny_patch16_224')
  other = _hub_snapshot(tmp_path / 'other', _timm_state(), 'vit_mu_patch4_8')
  with caplog.at_level(logging.WARNING):
    restore.load(plain)
    assert not caplog.records
    restore.load(other, 'ViT-Mu_4')
  assert [r.getMessage() for r in caplog.records] == [
      f"{tmp_path / 'other' / 'config.json'}: timm's vit_mu_patch4_8 is not one of its plain ViTs "
      "(vit_<size>_patch<N>_<res>), so its head count is taken as ViT-Mu_4's (2); if timm's is "
      'another, its outputs here are wrong']


def test_readers_normalise_as_the_hub_config_says(tmp_path):
  """DeiT's weights expect ImageNet's mean and std: infer, analyze and few-shot feed them
  (pixels / 255 - mean) / std, not [-1, 1]. A mean per channel of another channel count is one
  line (broadcast, it made grey images 3-channel)."""
  deit = _hub_snapshot(tmp_path / 'deit', _timm_state(), 'vit_mu_patch4_8', mean=(0.485,),
                       std=(0.229,), num_heads=HEADS, eval_transform={'crop_pct': 1.0})
  checkpoint = classify.load_checkpoint(deit, 'ViT-Mu_4')
  assert (checkpoint.eval_pp['mean'], checkpoint.eval_pp['std']) == ((0.485,), (0.229,))
  photo = np.random.default_rng(0).integers(0, 256, (8, 8, 1), np.uint8)  # Not resampled: 8 px.
  np.testing.assert_allclose(checkpoint.preprocess(photo), (photo / 255 - 0.485) / 0.229,
                             rtol=0, atol=1e-5)
  colour = _hub_snapshot(tmp_path / 'colour', _timm_state(), 'vit_mu_patch4_8',
                         mean=(0.485, 0.456, 0.406), num_heads=HEADS)
  with pytest.raises(ConfigError, match=r'^pp\.eval\.mean=\(0\.485, 0\.456, 0\.406\) has 3 values '
                                        r'for 1-channel inputs: give one, or one per channel$'):
    classify.load_checkpoint(colour, 'ViT-Mu_4')


def test_the_hub_configs_label_names_label_the_classes(tmp_path, caplog):
  """As timm's hub models name ImageNet's classes: synsets in label_names, their words in
  label_descriptions (infer printed class indices)."""
  synsets = ['n01440764', 'n01443537', 'n01484850', 'n01491361', 'n01494475']
  words = {'n01440764': 'tench, Tinca tinca', 'n01443537': 'goldfish, Carassius auratus',
           'n01484850': 'great white shark', 'n01491361': 'tiger shark'}  # The 5th: none.
  named = _hub_snapshot(tmp_path / 'list', _timm_state(), 'vit_mu_patch4_8',
                        labels={'label_names': synsets, 'label_descriptions': words})
  classifier = classify.Classifier.from_checkpoint(named, 'ViT-Mu_4')
  assert [classifier.label(i) for i in range(5)] == [
      'tench, Tinca tinca', 'goldfish, Carassius auratus', 'great white shark', 'tiger shark',
      'n01494475']
  # {index: name} where the indices have gaps: the gaps are their index.
  gaps = _hub_snapshot(tmp_path / 'gaps', _timm_state(), 'vit_mu_patch4_8',
                       labels={'label_names': {'0': 'cat', '3': 'dog'}})
  assert classify.Classifier.from_checkpoint(gaps, 'ViT-Mu_4').class_names == [
      'cat', '1', '2', 'dog', '4']
  # Names for another head: class indices, and a warning; --labels still wins.
  other = _hub_snapshot(tmp_path / 'other', _timm_state(), 'vit_mu_patch4_8',
                        labels={'label_names': synsets[:3]})
  with caplog.at_level(logging.WARNING):
    assert classify.Classifier.from_checkpoint(other, 'ViT-Mu_4').class_names is None
  assert 'names 3 classes but the head has 5; using class indices' in caplog.text
  given = classify.Classifier.from_checkpoint(named, 'ViT-Mu_4', class_names=list('abcde'))
  assert given.class_names == list('abcde')


def test_timm_weights_are_read_with_the_crop_timm_evaluates_them_with(tmp_path, caplog):
  """A config.json's crop_pct makes the eval crop timm's at that fraction (timm's 0.875 when it
  names none); --crop overrides the crop, not the fraction; a bare file is resized, as a .npz;
  an interpolation or crop mode other than timm's bicubic 'center' is logged, not refused."""
  augreg = {'crop_pct': 0.9, 'interpolation': 'bicubic', 'crop_mode': 'center'}
  path = _hub_snapshot(tmp_path / 'augreg', _timm_state(), 'vit_mu_patch4_8', eval_transform=augreg)
  checkpoint = classify.load_checkpoint(path, 'ViT-Mu_4')
  assert checkpoint.eval_pp == {'crop': 'timm', 'crop_fraction': 0.9, **HALF}
  photo = np.random.default_rng(0).integers(0, 256, (30, 20, 1), np.uint8)
  np.testing.assert_array_equal(  # 8 px: the shorter side to 8, the longer to 12, rows 2:10.
      checkpoint.preprocess(photo), preprocess.eval_image(tf.constant(photo), 8, 1, {
          'crop': 'timm', 'crop_fraction': 0.9, **HALF}).numpy())
  assert classify.load_checkpoint(path, 'ViT-Mu_4', eval_pp={'crop': 'resize'}).eval_pp == {
      'crop': 'resize', 'crop_fraction': 0.9, **HALF}
  assert classify.load_checkpoint(path, 'ViT-Mu_4', eval_pp={'crop_fraction': 1.0}).eval_pp == {
      'crop': 'timm', 'crop_fraction': 1.0, **HALF}
  unstated = _hub_snapshot(tmp_path / 'unstated', _timm_state(), 'vit_mu_patch4_8')
  assert classify.load_checkpoint(unstated, 'ViT-Mu_4').eval_pp == {
      'crop': 'timm', 'crop_fraction': 0.875, **HALF}
  bare = str(tmp_path / 'bare.safetensors')
  save_file(_timm_state(), bare)
  assert classify.load_checkpoint(bare, 'ViT-Mu_4').eval_pp == {
      'crop': 'resize', 'crop_fraction': 0.875, **HALF}
  squash = _hub_snapshot(tmp_path / 'squash', _timm_state(), 'vit_mu_patch4_8', num_heads=2,
                         eval_transform={'crop_pct': 1.0, 'interpolation': 'bilinear',
                                         'crop_mode': 'squash'})
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert classify.load_checkpoint(squash, 'ViT-Mu_4').eval_pp == {
        'crop': 'timm', 'crop_fraction': 1.0, **HALF}
  assert [r.getMessage() for r in caplog.records] == [
      f"{tmp_path / 'squash' / 'config.json'}: timm evaluates these weights with interpolation "
      "'bilinear' and crop_mode 'squash'; vit_jax's crop 'timm' is timm's bicubic 'center' crop, "
      'so their pixels differ slightly']
  wide = _hub_snapshot(tmp_path / 'wide', _timm_state(), 'vit_mu_patch4_8',
                       eval_transform={'crop_pct': 1.2})
  with pytest.raises(ConfigError, match=r"config\.json, beside the weights, is not timm's "
                                        r'\(crop_pct 1\.2 is not in \(0, 1\]\): re-download it'):
    restore.load(wide, 'ViT-Mu_4')


def test_a_broken_or_foreign_config_json_beside_the_file(tmp_path):
  path = str(tmp_path / 'model.safetensors')
  save_file(_timm_state(), path)
  (tmp_path / 'config.json').write_text('{"architectures": ["ViTForImageClassification"]}')
  # transformers' config.json, not timm's: passed over.
  assert restore.load(path, 'ViT-Mu_4').model == 'ViT-Mu_4'
  (tmp_path / 'config.json').write_text('{"architecture": "vit_tiny_patch16_224", ')
  (tmp_path / 'torch').mkdir()
  (tmp_path / 'torch' / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(ConfigError, match=r'torch holds pytorch_model\.bin, a pickle, which is not '
                                        r'read here: save its state dict as model\.safetensors '
                                        r'beside it \(safetensors\.torch\.save_file\)$'):
    restore.load(str(tmp_path / 'torch'))
  with pytest.raises(ConfigError, match=r'config\.json, beside the weights, is not readable JSON '
                                        r'\(.*\): re-download it, or remove it to load the '
                                        'weights without it$') as error:
    restore.load(path, 'ViT-Mu_4')
  assert '\n' not in str(error.value)
  (tmp_path / 'config.json').write_text('{"architecture": "x", "pretrained_cfg": {"mean": 0.5}}')
  with pytest.raises(ConfigError, match=r"config\.json, beside the weights, is not timm's \(.*\): "
                                        're-download it'):
    restore.load(path, 'ViT-Mu_4')
