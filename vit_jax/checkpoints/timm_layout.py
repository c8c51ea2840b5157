"""timm's PyTorch ViT weights (`.safetensors`, as timm and the Hugging Face hub save them) in the
released layout, so the weights timm users already have fine-tune, evaluate and analyse here.

timm made its ViT weights from the released `.npz` files (its loader, `_load_weights`, maps each
tensor); this is that mapping inverted, for the ViTs the released layout holds: a class token
(with or without its own position embedding), or global average pooling after the encoder's
LayerNorm. The options it cannot hold are one line naming them (`UNSUPPORTED`).
"""
import re
from typing import Any

import flax
import numpy as np
import safetensors
import safetensors.numpy
import tensorflow as tf

from vit_jax.checkpoints import npz
from vit_jax.errors import ConfigError

Params = dict[str, Any]

# Key fragments of timm options with no place in the released layout, and what they are.
UNSUPPORTED = {
    'patch_embed.backbone.': 'a hybrid ResNet stem (use the released R50+ViT .npz)',
    'attn_pool.': "a MAP head (global_pool='map')",
    'fc_norm.': 'a LayerNorm after the pooling (fc_norm)',
    'norm_pre.': 'a LayerNorm before the encoder (pre_norm, as CLIP)',
    'reg_token': 'register tokens',
    '.ls1.': 'layer scale',
    '.q_norm.': 'q/k normalisation',
    '.norm.': 'a LayerNorm inside the blocks (scale_attn_norm / scale_mlp_norm)',
}
_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_SAFETENSORS_ERRORS = (safetensors.SafetensorError, OSError, ValueError, tf.errors.OpError)


def is_safetensors(path: str) -> bool:
  return path.lower().endswith('.safetensors')


def _read(path: str) -> dict[str, np.ndarray]:
  """The file's tensors, as stored; object stores (gs://) through tf.io.gfile."""
  try:
    if '://' in path:
      with tf.io.gfile.GFile(path, 'rb') as f:
        return safetensors.numpy.load(f.read())
    return safetensors.numpy.load_file(path)
  except _SAFETENSORS_ERRORS as e:
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'checkpoint {path} is not a readable .safetensors file ({cause}): it is '
                      'corrupt or truncated; re-download or re-save it') from e


def _check_supported(state: dict[str, np.ndarray], path: str) -> None:
  if not {'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'} <= state.keys():
    shown = ', '.join(sorted(state)[:5])
    raise ConfigError(f'checkpoint {path} holds no timm ViT (no patch_embed.proj.weight and '
                      f'blocks.0.attn.qkv.weight; it has {shown}): point the checkpoint path at '
                      "the model.safetensors of a timm VisionTransformer")
  for fragment, option in UNSUPPORTED.items():
    key = next((k for k in sorted(state) if fragment in k), None)
    if key:
      raise ConfigError(f'checkpoint {path} has {key}: {option}, which the released ViT layout '
                        'does not hold; only timm ViTs with a class token, or global average '
                        'pooling without fc_norm, load')


def _block(state: dict[str, np.ndarray], prefix: str, num_heads: int) -> dict[str, np.ndarray]:
  """One encoder block: torch's Linear weights are (out, in), flax's kernels (in, out), and the
  attention's q, k, v rows split per head."""
  linear = lambda name: state[f'{prefix}{name}.weight'].T
  width = state[f'{prefix}attn.qkv.weight'].shape[1]
  head_dim = width // num_heads
  qkv_bias = state.get(f'{prefix}attn.qkv.bias', np.zeros(3 * width, np.float32))
  block = {'LayerNorm_0/scale': state[f'{prefix}norm1.weight'],
           'LayerNorm_0/bias': state[f'{prefix}norm1.bias'],
           'LayerNorm_2/scale': state[f'{prefix}norm2.weight'],
           'LayerNorm_2/bias': state[f'{prefix}norm2.bias'],
           'MlpBlock_3/Dense_0/kernel': linear('mlp.fc1'),
           'MlpBlock_3/Dense_0/bias': state[f'{prefix}mlp.fc1.bias'],
           'MlpBlock_3/Dense_1/kernel': linear('mlp.fc2'),
           'MlpBlock_3/Dense_1/bias': state[f'{prefix}mlp.fc2.bias'],
           'MultiHeadDotProductAttention_1/out/kernel':
               linear('attn.proj').reshape(num_heads, head_dim, width),
           'MultiHeadDotProductAttention_1/out/bias': state[f'{prefix}attn.proj.bias']}
  kernels = np.split(linear('attn.qkv'), 3, axis=1)
  for name, kernel, bias in zip(('query', 'key', 'value'), kernels, np.split(qkv_bias, 3)):
    block[f'MultiHeadDotProductAttention_1/{name}/kernel'] = kernel.reshape(width, num_heads,
                                                                            head_dim)
    block[f'MultiHeadDotProductAttention_1/{name}/bias'] = bias.reshape(num_heads, head_dim)
  return block


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
    return flax.traverse_util.unflatten_dict(_released_layout(state, num_heads), sep='/')
  except KeyError as e:
    raise ConfigError(f'checkpoint {path} lacks {e}, which a timm ViT has: it is not one, or one '
                      'with options the released layout does not hold') from e


def _released_layout(state: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """Flat released-layout keys ('/'-joined) from timm's."""
  flat = {'embedding/kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
          'embedding/bias': state['patch_embed.proj.bias'],
          'Transformer/posembed_input/pos_embedding': (
              npz.with_class_token_row(state['pos_embed']) if 'cls_token' in state
              else state['pos_embed']),
          'Transformer/encoder_norm/scale': state['norm.weight'],
          'Transformer/encoder_norm/bias': state['norm.bias']}
  if 'cls_token' in state:
    flat['cls'] = state['cls_token']
  if 'head.weight' in state:
    flat |= {'head/kernel': state['head.weight'].T, 'head/bias': state['head.bias']}
  for layer in sorted({int(m[1]) for m in map(_BLOCK.match, state) if m}):
    flat |= {f'Transformer/encoderblock_{layer}/{k}': v
             for k, v in _block(state, f'blocks.{layer}.', num_heads).items()}
  return flat
