"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), in the released checkpoints' layout.

Submodule names are fixed explicitly (`embedding`, `Transformer/encoderblock_{i}/...`) so that the
parameter tree *is* the layout of the released `.npz` files: loading one is unflattening it.
How parameters and activations map onto a device mesh lives in `vit_jax.sharding` (rules keyed
by these names), never here; the one hint here is the logical name of the residual stream.
"""
import functools
from typing import Any, Callable, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import ConfigError
from vit_jax.models import matmul
from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.dropout import Dropout
from vit_jax.models import resnet as resnet_lib

Dtype = Any

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': matmul.dots_with_no_batch_dims_saveable,
}


def sincos2d_posemb(height: int, width: int, dim: int, temperature: float = 10_000.) -> jnp.ndarray:
  """Fixed 2D sin-cos position embedding (MoCo v3 / big_vision style), shape (1, h*w, dim)."""
  if dim % 4:
    raise ConfigError(f'posemb=sincos2d needs hidden_size divisible by 4, got {dim}')
  y, x = np.mgrid[:height, :width]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4 - 1))
  y = np.einsum('m,d->md', y.flatten(), omega)
  x = np.einsum('m,d->md', x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)[None]


class AddPositionEmbs(nn.Module):
  """Learned 1D position embeddings, one per token (the paper's default)."""
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pe = self.param('pos_embedding', self.posemb_init,
                    (1,) + x.shape[1:], jnp.float32)
    return x + pe.astype(x.dtype)


class PatchEmbedding(nn.Module):
  """nn.Conv(kernel = stride = patch, 'VALID') as one matmul over flattened patches.

  Same parameters (`kernel` (ph, pw, C, D), `bias` (D)) and initialisation as the conv. On CPU
  the strided conv's forward + backward ran at ~64 GFLOP per CPU-second, the matmul at ~87.
  """
  features: int
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    ph, pw = self.patch_size
    b, h, w, c = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (ph, pw, c, self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    patches = x.reshape(b, h // ph, ph, w // pw, pw, c)
    y = matmul.einsum_for(self.dtype)('bhpwqc,pqcd->bhwd', patches, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  recompute_gelu: bool = False  # Save its input, not its intermediates (Encoder1DBlock).

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
    dense = lambda features, name: nn.Dense(  # pylint: disable=g-long-lambda
        features, dtype=self.dtype, name=name,
        dot_general=matmul.dot_general_for(self.dtype, laid_out_on_cpu=True),
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim, 'Dense_0')(x)
    gelu = functools.partial(nn.gelu, approximate=self.gelu_approximate)
    y = (jax.checkpoint(gelu, prevent_cse=False) if self.recompute_gelu else gelu)(y)
    y = Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return Dropout(self.dropout_rate)(y, deterministic=deterministic)


def _layer_norm(name: str, dtype: Dtype, recompute: bool = False) -> nn.LayerNorm:
  layer_norm = nn.remat(nn.LayerNorm, prevent_cse=False) if recompute else nn.LayerNorm
  return layer_norm(epsilon=1e-6, dtype=dtype, name=name, scale_init=nn.initializers.ones,
                    bias_init=nn.initializers.zeros)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x)).

  `lean_residuals`: the LayerNorms and the GELU keep only their inputs for the backward pass and
  recompute their element-wise intermediates there. Under `nn.scan` every value saved for the
  backward pass is written out per layer (XLA cannot fuse across the loop); unrolled, XLA's
  fusion drops them by itself (ViT-S/16's train step, XLA:CPU: 1.22 -> 0.69 GiB of temp scanned,
  0.89 unrolled either way).
  """
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  attention_impl: str = 'auto'
  lean_residuals: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    y = _layer_norm('LayerNorm_0', self.dtype, self.lean_residuals)(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.attention_dropout_rate,
        implementation=self.attention_impl, name='MultiHeadDotProductAttention_1')(
            y, deterministic=deterministic)
    x = x + Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = _layer_norm('LayerNorm_2', self.dtype, self.lean_residuals)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, dropout_rate=self.dropout_rate,
                 gelu_approximate=self.gelu_approximate,
                 recompute_gelu=self.lean_residuals, name='MlpBlock_3')(
                     y, deterministic=deterministic)
    return x + y


class _ScanBlock(Encoder1DBlock):
  """The same block with the (carry, out) signature `nn.scan` wants, and lean residuals."""
  lean_residuals: bool = True

  def __call__(self, x, deterministic):  # pylint: disable=arguments-renamed
    return super().__call__(x, deterministic), None


class Encoder(nn.Module):
  """Position embeddings, a stack of blocks (unrolled or scanned), final LayerNorm."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  attention_impl: str = 'auto'
  posemb: str = 'learn'
  remat: str = 'none'
  scan: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if self.posemb == 'learn':
      x = AddPositionEmbs(name='posembed_input')(x)
    x = Dropout(self.dropout_rate)(x, deterministic=not train)
    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        gelu_approximate=self.gelu_approximate, attention_impl=self.attention_impl)
    policy = REMAT_POLICIES[self.remat]
    if self.scan:
      block = _ScanBlock
      if self.remat != 'none':
        block = nn.remat(block, policy=policy, static_argnums=(2,), prevent_cse=False)
      x, _ = nn.scan(
          block, variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
          length=self.num_layers)(
              name='encoderblock', **block_kwargs)(x, not train)
    else:
      block = Encoder1DBlock
      if self.remat != 'none':
        block = nn.remat(block, policy=policy, static_argnums=(2,))
      for i in range(self.num_layers):
        x = block(name=f'encoderblock_{i}', **block_kwargs)(x, not train)
    return _layer_norm('encoder_norm', self.dtype)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform())(probe, x)
    y = y + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype,
                     gelu_approximate=self.gelu_approximate)(
                         nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(y), deterministic=True)
    return y[:, 0]


def patch_on_image(model: 'VisionTransformer') -> tuple[int, int]:
  """One token's extent in input pixels: the patch, times the stride of a hybrid's stem."""
  stride = 1 if model.resnet is None else resnet_lib.total_stride(model.resnet.num_layers)
  return model.patch_size[0] * stride, model.patch_size[1] * stride


def token_grid(model: 'VisionTransformer', height: int, width: int) -> tuple[int, int]:
  """The encoder's patch grid at an image size (a hybrid's SAME-padded stem rounds up, so 28 px
  through a /8 stem is a 4x4 map), or a ConfigError when the patches do not tile it."""
  if model.resnet is not None:
    stride = resnet_lib.total_stride(model.resnet.num_layers)
    height, width = -(-height // stride), -(-width // stride)
  (ph, pw), on_image = model.patch_size, patch_on_image(model)
  if height % ph or width % pw:
    raise ConfigError(
        f'patch size {ph}x{pw} does not divide the {height}x{width} '
        f'{"feature map" if model.resnet else "image"}: choose an image size that is a '
        f'multiple of {on_image[0]}x{on_image[1]}')
  return height // ph, width // pw


class VisionTransformer(nn.Module):
  """ViT (optionally hybrid). Returns logits, or pre-logit features when `num_classes == 0`.

  Pre-logit features are always sown as intermediates/pre_logit_features (for few-shot probes).
  """
  num_classes: int
  patch_size: tuple[int, int]
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  representation_size: Optional[int] = None
  classifier: str = 'token'
  posemb: str = 'learn'
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  head_bias_init: float = 0.0
  gelu_approximate: bool = True
  resnet: Optional[resnet_lib.ResNetConfig] = None
  dtype: Dtype = jnp.float32
  remat: str = 'none'
  scan: bool = False
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    token_grid(self, images.shape[1], images.shape[2])  # A ConfigError before any work.
    x = images.astype(self.dtype)
    if self.resnet is not None:
      x = resnet_lib.resnet_stem(x, self.resnet, self.dtype)
    x = PatchEmbedding(self.hidden_size, self.patch_size, dtype=self.dtype, name='embedding')(x)
    gh, gw = x.shape[1:3]
    x = einops.rearrange(x, 'b h w d -> b (h w) d')
    if self.posemb == 'sincos2d':
      x = x + sincos2d_posemb(gh, gw, self.hidden_size).astype(x.dtype)
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros,
                       (1, 1, self.hidden_size), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])), x],
                          axis=1)
    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dtype=self.dtype, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        gelu_approximate=self.gelu_approximate, attention_impl=self.attention_impl,
        posemb=self.posemb, remat=self.remat, scan=self.scan, name='Transformer')(x, train=train)
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
                  gelu_approximate=self.gelu_approximate)(x)
    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, name='pre_logits',
                   dot_general=matmul.dot_general_for(self.dtype),
                   kernel_init=nn.initializers.lecun_normal(),
                   bias_init=nn.initializers.zeros)(x)
      x = jnp.tanh(x)
    self.sow('intermediates', 'pre_logit_features', x)  # Not 'pre_logits': that names the layer.
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head',
                    dot_general=matmul.dot_general_for(self.dtype),
                    kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.constant(self.head_bias_init))(x)
