"""Multi-head self-attention in the released checkpoints' layout, and how it is computed.

One layer, several formulations chosen per backend and dtype: head-major with late
normalisation on CPU, `jax.nn.dot_product_attention` (cuDNN's fused kernel where it applies)
elsewhere, explicit weights when the analyses read them or attention dropout is on.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

from vit_jax.errors import ConfigError
from vit_jax.models import matmul
from vit_jax.models.dropout import Dropout

Dtype = Any


def _unnormalized_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, einsum: matmul.Einsum
                            ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(exp(q k^T - max) v, exp(q k^T - max), its row sums) on head-major (b, heads, t, d), float32.

  Head-major operands make every batched matmul contiguous per (b, head): on CPU the attention
  core ran ~2x faster forward + backward than on (b, t, heads, d). Normalising the (b, heads, t,
  d) output rather than the (b, heads, t, t) weights saves a pass over the largest tensor.
  """
  logits = einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  y = einsum('bhqk,bhkd->bhqd', unnormalized.astype(v.dtype), v).astype(jnp.float32)
  return y, unnormalized, unnormalized.sum(-1, keepdims=True)


@jax.custom_vjp
def _attention_cpu_float32(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T) v in float32, its backward products laid out for XLA:CPU's fast kernels.

  Autodiff contracts dk = dlogits^T q and dv = weights^T dy over the first token axis of the
  (t, t) factor, which XLA:CPU runs on slower kernels at few tokens; `matmul.narrow_einsum`'s
  backward transposes the (t, d) operands instead, and its products with the head dim as their
  rows ran slower at 197 tokens. Here the (t, t) factors are transposed (a copy, behind a barrier
  that keeps XLA from folding it back into the product), and the softmax's gradient takes the
  row sums of dy * y, (t, d), rather than of dweights * weights, (t, t). The core alone, forward
  + backward, ran faster than through the narrow products at 17, 50 and 197 tokens (11-20%),
  and than autodiff's at 17 and 50 (19-34%; level at 197; docs/performance.md).
  """
  return _attention_cpu_float32_fwd(q, k, v)[0]


def _attention_cpu_float32_fwd(q, k, v):
  y, unnormalized, sums = _unnormalized_attention(q, k, v, jnp.einsum)
  y = y / sums
  return y, (q, k, v, unnormalized, sums, y)


def _attention_cpu_float32_bwd(residuals, dy):
  q, k, v, unnormalized, sums, y = residuals
  dy_unnormalized = dy / sums
  dlogits = unnormalized * (jnp.einsum('bhqd,bhkd->bhqk', dy_unnormalized, v)
                            - (dy * y).sum(-1, keepdims=True) / sums)
  transposed = lambda x: jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))
  return (jnp.einsum('bhqk,bhkd->bhqd', dlogits, k),
          jnp.einsum('bhkq,bhqd->bhkd', transposed(dlogits), q),
          jnp.einsum('bhkq,bhqd->bhkd', transposed(unnormalized), dy_unnormalized))


_attention_cpu_float32.defvjp(_attention_cpu_float32_fwd, _attention_cpu_float32_bwd)


def _attention_cpu(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, dtype: Dtype) -> jnp.ndarray:
  """softmax(q k^T) v on head-major (b, heads, t, d), normalised after the PV matmul, with the
  products in `dtype` (a narrow dtype's through `matmul.einsum_for`, whose backward lays out its
  operands as XLA:CPU's matrix units take them)."""
  if jnp.dtype(dtype) == jnp.float32:
    return _attention_cpu_float32(q, k, v)
  y, _, sums = _unnormalized_attention(q, k, v, matmul.einsum_for(dtype))
  return (y / sums).astype(v.dtype)


# 'auto' picks per backend and dtype; 'xla' and 'cudnn' are `jax.nn.dot_product_attention`'s.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def _fused_implementation(implementation: str, dtype: Dtype, head_dim: int) -> Optional[str]:
  """`jax.nn.dot_product_attention`'s `implementation` for ours.

  jax's own default is XLA's unfused formulation even on GPUs, so 'auto' asks for cuDNN's flash
  kernel where it applies: an NVIDIA GPU (CUDA backend), half-precision operands, a head dim
  that is a multiple of 8 up to 128 (ViT-Ti to ViT-H all qualify). Naming 'cudnn' elsewhere is
  a ConfigError (jax would fail deep inside the trace).
  """
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  cuda = 'cuda' in jax.extend.backend.get_backend().platform_version.lower()
  cudnn_applies = cuda and half and head_dim % 8 == 0 and head_dim <= 128
  if implementation == 'cudnn' and not cudnn_applies:
    raise ConfigError(
        f"attention_impl='cudnn' needs an NVIDIA GPU, dtype bfloat16 or float16 and a head dim "
        f'that is a multiple of 8 up to 128 (here: {jax.default_backend()}, '
        f'{jnp.dtype(dtype).name}, {head_dim}); use attention_impl=auto or xla')
  if implementation != 'auto':
    return implementation
  return 'cudnn' if cudnn_applies else None


class HeadProjection(nn.Module):
  """The parameters of `query`, `key` or `value`, laid out and initialised as `nn.DenseGeneral`
  (features=(heads, head_dim)) does; the attention layer applies all three as one matmul."""
  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    width = self.num_heads * self.head_dim
    def init(rng, shape, dtype):  # DenseGeneral's fan-in / fan-out.
      return nn.initializers.xavier_uniform()(rng, (features, width), dtype).reshape(shape)
    kernel = self.param('kernel', init, (features, self.num_heads, self.head_dim), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.num_heads, self.head_dim),
                      jnp.float32)
    return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the released layout: query/key/value (D, heads, D/heads), out
  (heads, D/heads, D).

  q, k and v come from one matmul against the three kernels side by side (the 1/sqrt(d) logit
  scale folded into the query's). `implementation` (see `ATTENTION_IMPLEMENTATIONS`): 'auto'
  runs `_attention_cpu` on CPU and `jax.nn.dot_product_attention` elsewhere, asking it for
  cuDNN's fused kernel where that applies (`_fused_implementation`). When the 'intermediates'
  collection is mutable the weights are computed explicitly and sown as `attention`, which is
  how the analyses read them from this same code.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
    features = x.shape[-1]
    head_dim = features // self.num_heads
    use_dropout = self.dropout_rate > 0 and not deterministic
    explicit = self.is_mutable_collection('intermediates') or use_dropout
    head_major = explicit or (self.implementation == 'auto' and jax.default_backend() == 'cpu')
    kernels, biases = zip(*(HeadProjection(self.num_heads, head_dim, name=name)(features)
                            for name in ('query', 'key', 'value')))
    scale = jnp.asarray([1 / np.sqrt(head_dim), 1, 1], jnp.float32)
    kernel = (jnp.stack(kernels) * scale[:, None, None, None]).astype(self.dtype)
    bias = (jnp.stack(biases) * scale[:, None, None]).astype(self.dtype)
    einsum = matmul.einsum_for(self.dtype)
    tokens = x.shape[1]
    fused = None if head_major else _fused_implementation(self.implementation, self.dtype,
                                                          head_dim)
    # jax (0.10 to 0.11) refuses cuDNN's gradient for an odd token count: its check takes the
    # empty placeholder for a bias, and with a bias cuDNN wants even lengths. ViT's [class] token
    # makes the count odd (197 at 224 px / 16), so the layer appends one zero token, masks it out
    # of the keys and drops its row at the end: outputs and gradients are unchanged. Padding x,
    # not q, k and v, copies one array instead of three.
    padded = fused == 'cudnn' and tokens % 2 == 1
    if padded:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    if head_major:
      qkv = einsum('btD,sDhd->sbhtd', x.astype(self.dtype), kernel) + bias[:, None, :, None]
    else:
      qkv = einsum('btD,sDhd->sbthd', x.astype(self.dtype), kernel) + bias[:, None, None]
    q, k, v = qkv
    if explicit:
      logits = einsum('bhqd,bhkd->bhqk', q, k)
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
      self.sow('intermediates', 'attention', weights)
      if use_dropout:
        weights = Dropout(self.dropout_rate)(weights, deterministic=False)
      y = einsum('bhqk,bhkd->bhqd', weights, v)
    elif head_major:
      y = _attention_cpu(q, k, v, self.dtype)
    else:
      lengths = jnp.full((x.shape[0],), tokens, jnp.int32) if padded else None
      y = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=fused,
                                       key_value_seq_lengths=lengths)
    y = nn.DenseGeneral(
        features=features, axis=(1, 3) if head_major else (-2, -1), dtype=self.dtype,
        dot_general=matmul.dot_general_for(self.dtype), name='out',
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros)(y)
    return y[:, :tokens] if padded else y
