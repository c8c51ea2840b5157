"""The BiT ResNet stem of the hybrid ViT: weight-standardised convs with GroupNorm.

Names (`conv_root`, `gn_root`, `block{n}/unit{m}/conv1..3, gn1..3, conv_proj, gn_proj`) follow
the released R50+ViT checkpoints. The stem downsamples by 4 at the root and by 2 in every stage
after the first, so stages (3, 4, 9) turn 224 px into a 14x14 map that ViT embeds with 1x1 patches
(and the full ResNet-50's (3, 4, 6, 3) into 7x7).
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import matmul


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """The hybrid's stem: bottleneck units per stage (none: the root conv alone) and width."""
  num_layers: tuple[int, ...] = (3, 4, 9)
  width_factor: float = 1.0


def total_stride(num_layers: tuple[int, ...]) -> int:
  """Downsampling of the stem: 4 at the root, 2 in every stage after the first."""
  return 4 * 2**max(len(num_layers) - 1, 0)


def output_channels(config: ResNetConfig) -> int:
  """Channels of the stem's feature map: the last stage's (4 x its width), or the root conv's."""
  root = int(64 * config.width_factor)
  return root * 2**(len(config.num_layers) - 1) * 4 if config.num_layers else root


def weight_standardize(w: jnp.ndarray, axis: int | tuple[int, ...], eps: float) -> jnp.ndarray:
  """Zero mean, unit standard deviation per output filter: BiT's trick that lets GroupNorm train
  well. `eps` is added to the deviation, as in the code the released hybrids were trained with
  (not under the square root: for the small kernels weight decay leaves, the two differ)."""
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


def standardized_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """A conv kernel (h, w, in, out) standardised per output filter, as the stem uses it."""
  return weight_standardize(kernel, axis=(0, 1, 2), eps=1e-5)


class StdConv(nn.Conv):
  """Conv whose kernel is weight-standardised on every use (the stored kernel stays raw)."""

  def param(self, name: str, *args: Any, **kwargs: Any) -> Any:  # pylint: disable=arguments-differ
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = standardized_kernel(value)
    return value


class StdConv1x1(nn.Module):
  """`StdConv(features, (1, 1), (strides, strides), use_bias=False)` as the matmul it is, strided
  by slicing (SAME pads nothing at 1x1); the same parameter and initialiser. XLA:CPU ran the
  conv's gradients as convolutions of its own, 13% of the embedded default's train step
  (docs/performance.md)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    kernel = standardized_kernel(kernel)[0, 0]
    x = x[:, ::self.strides, ::self.strides]
    return matmul.einsum_for(self.dtype)('bhwc,cf->bhwf', x.astype(self.dtype),
                                         kernel.astype(self.dtype))


class BottleneckUnit(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 features), projection shortcut when the shape changes."""
  features: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    def conv(features: int, size: int, strides: int, name: str) -> nn.Module:
      if size == 1:
        return StdConv1x1(features, strides, dtype=self.dtype, name=name)
      return StdConv(features, (size, size), (strides, strides), use_bias=False, dtype=self.dtype,
                     name=name)
    gn = lambda name, **kw: nn.GroupNorm(dtype=self.dtype, name=name, **kw)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != 1:
      residual = gn('gn_proj')(conv(self.features * 4, 1, self.strides, 'conv_proj')(x))
    y = nn.relu(gn('gn1')(conv(self.features, 1, 1, 'conv1')(x)))
    y = nn.relu(gn('gn2')(conv(self.features, 3, self.strides, 'conv2')(y)))
    y = gn('gn3', scale_init=nn.initializers.zeros)(conv(self.features * 4, 1, 1, 'conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one strides."""
  num_units: int
  features: int
  first_stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for unit in range(self.num_units):
      x = BottleneckUnit(self.features, self.first_stride if unit == 0 else 1, dtype=self.dtype,
                         name=f'unit{unit + 1}')(x)
    return x


def max_pool(x: jnp.ndarray, window: int = 3, stride: int = 2) -> jnp.ndarray:
  """`nn.max_pool(x, (window,) * 2, (stride,) * 2, 'SAME')` as the maximum of `window` strided
  row views, then of `window` strided column views: the same values and, but for ties (shared
  here, not given to the first), the same gradient. XLA's CPU gradient of the pooling op
  (select-and-scatter, with iotas of the window indices) took ~9x as long on one device; of
  window**2 views at once, XLA fused the gradient into one loop that recomputed the maxima for
  every input pixel, ~13 ms a step in the embedded default's (docs/performance.md)."""
  pads = jax.lax.padtype_to_pads(x.shape[1:3], (window, window), (stride, stride), 'SAME')
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  height, width = ((size - window) // stride + 1 for size in x.shape[1:3])
  x = functools.reduce(jnp.maximum, [x[:, i:i + stride * (height - 1) + 1:stride]
                                     for i in range(window)])
  return functools.reduce(jnp.maximum, [x[:, :, j:j + stride * (width - 1) + 1:stride]
                                        for j in range(window)])


def resnet_stem(x: jnp.ndarray, config: ResNetConfig, dtype: Any) -> jnp.ndarray:
  """Root conv + max-pool, then the stages; called inside the ViT so its names sit at the top."""
  width = int(64 * config.width_factor)
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, dtype=dtype, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, name='gn_root')(x))
  x = max_pool(x)
  for stage, units in enumerate(config.num_layers):
    x = ResNetStage(units, width * 2**stage, 2 if stage > 0 else 1, dtype=dtype,
                    name=f'block{stage + 1}')(x)
  return x
