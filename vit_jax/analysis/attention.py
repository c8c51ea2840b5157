"""Attention weights read from the model itself, and attention rollout (the paper's Figure 6).

Rollout (Abnar & Zuidema, 2020) estimates how much each input token contributes to each output
token by chaining the per-layer attention, with the residual connection counted as an identity.
"""
import functools
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import ConfigError


def _sown(block: Mapping[str, Any]) -> jnp.ndarray:
  """The weights one encoder block (or the scanned stack) sowed; `sow` keeps them in a tuple."""
  return block['MultiHeadDotProductAttention_1']['attention'][0]


@functools.partial(jax.jit, static_argnums=0)  # Compiled once per model and batch shape.
def _layer_attention(model: nn.Module, variables: Mapping[str, Any],
                     images: jnp.ndarray) -> jnp.ndarray:
  blocks = model.apply(variables, images, train=False, mutable='intermediates')[1]
  blocks = blocks['intermediates']['Transformer']
  if 'encoderblock' in blocks:  # Scanned: one entry, layers stacked on axis 0.
    return _sown(blocks['encoderblock'])
  return jnp.stack([_sown(blocks[f'encoderblock_{i}']) for i in range(len(blocks))])


def attention_batches(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray, *,
                      batch_size: int = 8) -> Iterator[np.ndarray]:
  """Attention weights of every encoder layer, [layers, b, heads, T, T] (float32), for
  `batch_size` images at a time: an analysis that reduces each batch holds one batch's worth
  however many images it averages over.

  Runs the model's own forward pass with 'intermediates' mutable, so the weights are exactly the
  ones the model uses; works for the unrolled and the scanned layout.
  """
  for start in range(0, len(images), batch_size):
    attn = _layer_attention(model, variables, jnp.asarray(images[start:start + batch_size]))
    yield np.asarray(attn, np.float32)


def collect_attention(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray, *,
                      batch_size: int = 32) -> np.ndarray:
  """All of `attention_batches` at once, [layers, B, heads, T, T]: for a look at a few images."""
  return np.concatenate(list(attention_batches(model, variables, images, batch_size=batch_size)),
                        axis=1)


def num_prefix_tokens(classifier: str) -> int:
  """Tokens before the patches in the encoder: the class token for 'token' models, else none."""
  return 1 if classifier == 'token' else 0


def rollout_matrix(attn: np.ndarray) -> np.ndarray:
  """Joint attention of the top layer's outputs over the input tokens, [B, T, T].

  Per layer: heads averaged, identity added for the residual, rows renormalised (so each layer is
  0.5 * attention + 0.5 * identity); layers are chained as A_L @ ... @ A_1. Every row is a
  distribution over input tokens (non-negative, sums to one).
  """
  aug = np.mean(attn, axis=2, dtype=np.float64)  # [L, B, T, T], without a float64 copy first.
  aug += np.eye(aug.shape[-1])
  aug /= aug.sum(axis=-1, keepdims=True)
  joint = aug[0]
  for layer in aug[1:]:
    joint = layer @ joint
  return joint


def attention_rollout(attn: np.ndarray, *, classifier: str) -> np.ndarray:
  """Per-patch rollout map, [B, grid_tokens], patches in row-major grid order.

  'token': the class token's row of the rollout over the patch columns; the remainder of the row
  (1 - sum) is what the class token keeps from itself, so identity attention maps to all zeros.
  'gap': the mean over all output tokens' rows (all are patches), which sums to one; identity
  attention maps to the uniform 1 / grid_tokens. Values are not rescaled; plots normalise them.
  """
  if classifier not in ('token', 'gap'):
    raise ConfigError(f'attention rollout needs classifier "token" or "gap", got {classifier!r} '
                      '(the MAP head\'s attention is not recorded): leave "rollout" out')
  joint = rollout_matrix(attn)
  rows = joint[:, 0] if classifier == 'token' else joint.mean(axis=1)
  return rows[:, num_prefix_tokens(classifier):]


def rollout_map(rollout: np.ndarray, grid: tuple[int, int], image_size: tuple[int, int], *,
                method: str = 'bilinear') -> np.ndarray:
  """Upsamples per-patch maps [B, gh * gw] to [B, height, width] for overlaying on the images.

  The grid is explicit because it need not be square; `method` is any `jax.image.resize` method
  ('nearest' shows the patch blocks, 'bilinear' matches the paper's smooth overlays).
  """
  gh, gw = grid
  rollout = np.asarray(rollout, np.float32)
  if rollout.shape[-1] != gh * gw:
    raise ConfigError(f'rollout has {rollout.shape[-1]} patches but the grid {gh}x{gw} has '
                      f'{gh * gw}: pass the grid of the images the attention came from')
  maps = rollout.reshape(-1, gh, gw)
  return np.asarray(jax.image.resize(maps, (len(maps), *image_size), method=method))
