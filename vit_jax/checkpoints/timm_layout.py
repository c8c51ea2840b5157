"""timm's PyTorch ViT weights (`.safetensors`, as timm and the Hugging Face hub save them) in the
released layout, so the weights timm users already have fine-tune, evaluate and analyse here.

timm made its ViT weights from the released `.npz` files (its loader, `_load_weights`, maps each
tensor); this is that mapping inverted, for the ViTs the released layout holds: a class token
(with or without its own position embedding), or global average pooling after the encoder's
LayerNorm. Every tensor of the file must find its place: the options the layout cannot hold are
one line naming them (`UNSUPPORTED`), and so is any other tensor left over.

The tensors do not tell the architecture's name, its head count, its pooling or the input
normalisation its weights expect; the `config.json` that timm saves beside them (the Hugging Face
hub's layout) tells the name, the pooling and the normalisation (and the head count, when the
model was made with one given) and how timm evaluates them (crop_pct, mean and std: readers of
the weights preprocess as timm does), and is read when it is there. What neither tells is
assumed: the head count is the named model's, and without a config.json the pooling is the class
token's output when there is one, else the mean (timm's global_pool='token' and 'avg').
"""
import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Optional

import flax
import numpy as np
import safetensors
import safetensors.numpy
import tensorflow as tf

from vit_jax import models
from vit_jax.checkpoints import npz
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError, first_line

Params = dict[str, Any]

# Keys of timm options with no place in the released layout, and what they are.
UNSUPPORTED = {
    r'^patch_embed\.backbone\.': 'a hybrid ResNet stem (use the released R50+ViT .npz)',
    r'^patch_embed\.norm\.': 'a LayerNorm on the patch embeddings (embed_norm_layer)',
    r'^attn_pool\.': "a MAP head (global_pool='map')",
    r'^fc_norm\.': "a LayerNorm after the pooling (fc_norm, timm's default for global_pool='avg')",
    r'^norm_pre\.': 'a LayerNorm before the encoder (pre_norm, as CLIP)',
    r'^reg_token$': 'register tokens',
    r'^dist_token$': "a distillation token (DeiT's distilled models)",
    r'^blocks\.\d+\.(ls\d|gamma_\d)': 'layer scale',
    r'^blocks\.\d+\.attn\.[qk]_norm\.': 'q/k normalisation',
    r'^blocks\.\d+\.(attn|mlp)\.norm\.': 'a LayerNorm inside the blocks (scale_attn_norm / '
                                         'scale_mlp_norm)',
    r'^blocks\.\d+\.attn\.[qv]_bias$': "separate q and v biases (EVA's, BEiT's)",
    r'(^|\.)rope\.': 'rotary position embeddings',
}
_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_SAFETENSORS_ERRORS = (safetensors.SafetensorError, OSError, ValueError, tf.errors.OpError)
_SHOWN = 3  # Keys named in a message: enough to recognise the model.
_POOLS = {True: 'token', False: 'avg'}  # Has a class token -> the pooling the layout holds.


@dataclasses.dataclass(frozen=True)
class HubConfig:
  """What timm's config.json beside the weights says that their tensors do not."""
  path: str
  architecture: str
  global_pool: Optional[str]  # None in configs older than timm's recording of it.
  mean: Optional[tuple[float, ...]]
  std: Optional[tuple[float, ...]]
  num_heads: Optional[int]  # In model_args when given to create_model, else None.
  # Per class index: label_descriptions' text for its label_names entry, else that name (an
  # ImageNet synset: 'n01440764' -> 'tench, Tinca tinca'); None when the file names none.
  class_names: Optional[tuple[str, ...]] = None
  # timm's eval transform: crop_pct (None: timm's default), interpolation and crop_mode.
  crop_pct: Optional[float] = None
  interpolation: Optional[str] = None
  crop_mode: Optional[str] = None

  def eval_pp(self) -> dict[str, Any]:
    """The pp.eval options of timm's eval transform for these weights: its crop, and the mean and
    std the weights expect (timm's ViTs: 0.5, the released ones'; DeiT's: ImageNet's)."""
    defaults = pp_options.EVAL_DEFAULTS
    return {'crop': 'timm', 'crop_fraction': self.crop_pct or defaults['crop_fraction'],
            'mean': self.mean or defaults['mean'], 'std': self.std or defaults['std']}


def read_hub_config(weights: str) -> Optional[HubConfig]:
  """timm's config.json beside `weights`, if there is one; one without 'architecture' is not
  timm's (transformers' names 'architectures') and is passed over."""
  path = os.path.join(os.path.dirname(weights), 'config.json')
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      config = json.load(f)
  except (ValueError, tf.errors.OpError) as e:
    raise ConfigError(f'{path}, beside the weights, is not readable JSON ({e}): re-download it, '
                      'or remove it to load the weights without it') from e
  if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
    return None
  as_tuple = lambda values: tuple(map(float, values)) if values else None
  try:
    pretrained, model_args = config.get('pretrained_cfg') or {}, config.get('model_args') or {}
    pool = config.get('global_pool', model_args.get('global_pool'))
    num_heads = int(model_args['num_heads']) if 'num_heads' in model_args else None
    crop_pct = float(pretrained['crop_pct']) if pretrained.get('crop_pct') else None
    if crop_pct is not None and not 0 < crop_pct <= 1:
      raise ValueError(f'crop_pct {crop_pct} is not in (0, 1]')
    hub = HubConfig(path, config['architecture'], pool, as_tuple(pretrained.get('mean')),
                    as_tuple(pretrained.get('std')), num_heads, _class_names(config), crop_pct,
                    pretrained.get('interpolation'), pretrained.get('crop_mode'))
  except (AttributeError, TypeError, ValueError) as e:  # Not timm's dicts and lists of numbers.
    raise ConfigError(f"{path}, beside the weights, is not timm's ({e}): re-download it, or "
                      'remove it to load the weights without it') from e
  return hub


def _class_names(config: dict[str, Any]) -> Optional[tuple[str, ...]]:
  """timm's label_names (a list, or {index: name} where indices have gaps, the gaps then named
  by their index) with label_descriptions' text for each name that has one."""
  names, descriptions = config.get('label_names'), config.get('label_descriptions') or {}
  if not names:
    return None
  if hasattr(names, 'items'):
    by_index = {int(i): str(name) for i, name in names.items()}
    count = max(int(config.get('num_classes') or 0), max(by_index) + 1)
    names = [by_index.get(i, str(i)) for i in range(count)]
  return tuple(str(descriptions.get(name, name)) for name in names)


def load(path: str, model: Optional[str], model_overrides: dict[str, Any]
         ) -> tuple[str, Params, dict[str, Any], Optional[HubConfig]]:
  """The model a timm file is for (the named one, else the one its config.json names), its
  params in the released layout, the options timm's ViTs differ by (the exact GELU, and the
  config.json's head count), and that config.json, if any."""
  hub = read_hub_config(path)
  model = _model_name(path, model, hub)
  overrides = {'gelu_approximate': False}
  if hub and hub.num_heads:
    overrides['num_heads'] = hub.num_heads
  named = models.create(model, num_classes=1, **(overrides | model_overrides))
  params = load_safetensors(path, named.hidden_size, named.num_heads)
  if hub:
    _check_pooling(hub, has_class_token='cls' in params)
    _warn_of_assumptions(hub, model, named.num_heads)
  return model, params, overrides, hub


def _model_name(path: str, model: Optional[str], hub: Optional[HubConfig]) -> str:
  ours = models.released_name(hub.architecture) if hub else None
  if model and ours and model != ours:
    raise ConfigError(f"checkpoint {path} holds timm's {hub.architecture} (its config.json says), "
                      f'which is {ours} here, not {model}: name {ours} as the model (--model; '
                      "fine-tuning's --config.model)")
  if model or ours:
    return model or ours
  said = (f" (its config.json names timm's {hub.architecture}, which has no name here)" if hub
          else '')
  raise ConfigError(f'{path} holds no architecture{said}: name the model it was trained as '
                    "(--model; fine-tuning's --config.model), e.g. ViT-B_16")


def _check_pooling(hub: HubConfig, has_class_token: bool) -> None:
  """The released layout pools the class token's output, or the mean when it has none."""
  if hub.global_pool in (None, _POOLS[has_class_token]):
    return
  if hub.global_pool == 'avg':
    what = "the mean of the patch tokens beside a class token (global_pool='avg')"
  else:
    what = f'global_pool={hub.global_pool!r}'
  raise ConfigError(f'{hub.path} pools {what}, which the released ViT layout does not hold: only '
                    "timm's global_pool='token' (with a class token) or 'avg' (without one) load")


def _warn_of_assumptions(hub: HubConfig, model: str, num_heads: int) -> None:
  if not models.released_name(hub.architecture) and not hub.num_heads:
    logging.warning("%s: timm's %s is not one of its plain ViTs (vit_<size>_patch<N>_<res>), so "
                    "its head count is taken as %s's (%d); if timm's is another, its outputs "
                    'here are wrong', hub.path, hub.architecture, model, num_heads)
  if hub.interpolation not in (None, 'bicubic') or hub.crop_mode not in (None, 'center'):
    logging.warning("%s: timm evaluates these weights with interpolation %r and crop_mode %r; "
                    "vit_jax's crop 'timm' is timm's bicubic 'center' crop, so their pixels "
                    'differ slightly', hub.path, hub.interpolation, hub.crop_mode)


def is_safetensors(path: str) -> bool:
  return path.lower().endswith('.safetensors')


def weights_of_folder(path: str) -> str:
  """A hub folder (timm's save_for_hf, a snapshot in the hub's cache) stands for the
  model.safetensors in it, as for timm; any other path is itself."""
  if not tf.io.gfile.isdir(path) or tf.io.gfile.exists(os.path.join(path, 'checkpoints')):
    return path
  weights = os.path.join(path, 'model.safetensors')
  if tf.io.gfile.exists(weights):
    return weights
  if tf.io.gfile.exists(os.path.join(path, 'pytorch_model.bin')):
    raise ConfigError(f'{path} holds pytorch_model.bin, a pickle, which is not read here: save its '
                      'state dict as model.safetensors beside it (safetensors.torch.save_file)')
  return path


def _read(path: str) -> dict[str, np.ndarray]:
  """The file's tensors, as stored; object stores (gs://) through tf.io.gfile."""
  if os.path.isdir(path):
    raise ConfigError(f'checkpoint {path} is a directory: point it at the model.safetensors file '
                      'inside')
  try:
    if '://' in path:
      with tf.io.gfile.GFile(path, 'rb') as f:
        return safetensors.numpy.load(f.read())
    return safetensors.numpy.load_file(path)
  except _SAFETENSORS_ERRORS as e:
    raise ConfigError(f'checkpoint {path} is not a readable .safetensors file '
                      f'({first_line(e)}): it is corrupt or truncated; re-download or re-save '
                      'it') from e


def _named(keys: list[str]) -> str:
  more = f' (+{len(keys) - _SHOWN} more)' if len(keys) > _SHOWN else ''
  return ', '.join(sorted(keys)[:_SHOWN]) + more


def _check_supported(state: dict[str, np.ndarray], path: str) -> None:
  if not {'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'} <= state.keys():
    raise ConfigError(f'checkpoint {path} holds no timm ViT (no patch_embed.proj.weight and '
                      f'blocks.0.attn.qkv.weight; it has {_named(list(state))}): point the '
                      'checkpoint path at the model.safetensors of a timm VisionTransformer')
  found = []
  for pattern, option in UNSUPPORTED.items():
    key = next((k for k in sorted(state) if re.search(pattern, k)), None)
    if key:
      found.append(f'{option} ({key})')
  if found:
    raise ConfigError(f'checkpoint {path} has what the released ViT layout does not hold: '
                      f'{"; ".join(found)}. Only plain timm ViTs load: a class token, or global '
                      'average pooling without fc_norm')


def _block(take: Callable[..., np.ndarray], prefix: str,
           num_heads: int) -> dict[str, np.ndarray]:
  """One encoder block: torch's Linear weights are (out, in), flax's kernels (in, out), and the
  attention's q, k, v rows split per head. A Linear saved without a bias (qkv_bias=False) gets a
  zero one, the same layer."""
  def linear(name: str) -> tuple[np.ndarray, np.ndarray]:
    kernel = take(f'{prefix}{name}.weight').T
    return kernel, take(f'{prefix}{name}.bias', np.zeros(kernel.shape[1], np.float32))
  qkv, qkv_bias = linear('attn.qkv')
  out, out_bias = linear('attn.proj')
  width = qkv.shape[0]
  head_dim = width // num_heads
  attention = {'out/kernel': out.reshape(num_heads, head_dim, width), 'out/bias': out_bias}
  for name, kernel, bias in zip(('query', 'key', 'value'), np.split(qkv, 3, axis=1),
                                np.split(qkv_bias, 3)):
    attention |= {f'{name}/kernel': kernel.reshape(width, num_heads, head_dim),
                  f'{name}/bias': bias.reshape(num_heads, head_dim)}
  (fc1, fc1_bias), (fc2, fc2_bias) = linear('mlp.fc1'), linear('mlp.fc2')
  return {'LayerNorm_0/scale': take(f'{prefix}norm1.weight'),
          'LayerNorm_0/bias': take(f'{prefix}norm1.bias'),
          'LayerNorm_2/scale': take(f'{prefix}norm2.weight'),
          'LayerNorm_2/bias': take(f'{prefix}norm2.bias'),
          'MlpBlock_3/Dense_0/kernel': fc1, 'MlpBlock_3/Dense_0/bias': fc1_bias,
          'MlpBlock_3/Dense_1/kernel': fc2, 'MlpBlock_3/Dense_1/bias': fc2_bias,
          **{f'MultiHeadDotProductAttention_1/{k}': v for k, v in attention.items()}}


def load_safetensors(path: str, hidden_size: int, num_heads: int) -> Params:
  """A timm ViT's `.safetensors` as released-layout params (float32 numpy); the head count, which
  the tensors do not show, comes from the model the user names (of `hidden_size`)."""
  state = {k: np.asarray(v, np.float32) for k, v in _read(path).items()}
  _check_supported(state, path)
  width = state['patch_embed.proj.weight'].shape[0]
  if width != hidden_size:
    raise ConfigError(f'checkpoint {path} is {width} wide, the model named {hidden_size}: name the '
                      'model it was trained as')
  try:
    flat = _released_layout(state, num_heads)
  except KeyError as e:
    raise ConfigError(f'checkpoint {path} lacks {e}, which a timm ViT has: it is not one, or one '
                      'with options the released layout does not hold') from e
  if state:  # What _released_layout did not take.
    raise ConfigError(f'checkpoint {path} has tensors the released ViT layout has no place for: '
                      f'{_named(list(state))}. Only plain timm ViTs load: a class token, or '
                      'global average pooling without fc_norm')
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _released_layout(state: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """Flat released-layout keys ('/'-joined) from timm's, taking each tensor out of `state`."""
  take = state.pop
  has_class_token = 'cls_token' in state
  posemb = take('pos_embed')
  flat = {'embedding/kernel': take('patch_embed.proj.weight').transpose(2, 3, 1, 0),
          'embedding/bias': take('patch_embed.proj.bias'),
          'Transformer/posembed_input/pos_embedding': (
              npz.with_class_token_row(posemb) if has_class_token else posemb),
          'Transformer/encoder_norm/scale': take('norm.weight'),
          'Transformer/encoder_norm/bias': take('norm.bias')}
  if has_class_token:
    flat['cls'] = take('cls_token')
  if 'head.weight' in state:
    flat |= {'head/kernel': take('head.weight').T, 'head/bias': take('head.bias')}
  for layer in sorted({int(m[1]) for m in map(_BLOCK.match, list(state)) if m}):
    flat |= {f'Transformer/encoderblock_{layer}/{k}': v
             for k, v in _block(take, f'blocks.{layer}.', num_heads).items()}
  return flat
