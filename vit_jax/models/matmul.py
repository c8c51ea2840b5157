"""The model's products for a compute dtype; on CPU, bfloat16 means bfloat16 matmul operands.

XLA:CPU runs a bfloat16 x bfloat16 -> float32 product in its matmul library, on the CPU's matrix
units where it has some (AMX on Intel Xeons since Sapphire Rapids: ~1.6 TFLOP/s on 2 cores, 5x
its float32 rate), but a bfloat16 -> bfloat16 product on generic kernels (~0.25 TFLOP/s), and
autodiff of a float32-accumulating product makes float32 backward products. It has no bfloat16
arithmetic either: element-wise work in bfloat16 is converted to float32 and back around every
op. So on CPU a narrow compute dtype applies to the products alone: operands rounded to it,
accumulation and results in float32, backward products the same way, each laid out as the matrix
units take it (`_lhs_contracting_last`); the element-wise work in between stays float32.
Accelerators get the plain `jnp.einsum` / `lax.dot_general` (bfloat16 results, accumulated in
float32 by the hardware), and so do float32 models everywhere, but for the MLP's layers on CPU,
whose backward takes the same layout (`dot_general_for`'s `laid_out_on_cpu`).
"""
import functools
import logging
import math
import re
import string
from typing import Any, Callable, NamedTuple, Optional

import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

Einsum = Callable[[str, jax.Array, jax.Array], jax.Array]


def _operand_specs(spec: str) -> tuple[str, str, str]:
  """(first, second, output) index strings; each operand's indices must appear elsewhere,
  since the backward products are einsums with the output's indices."""
  inputs, out_spec = spec.replace(' ', '').split('->')
  a_spec, b_spec = inputs.split(',')
  for own, others in ((a_spec, b_spec + out_spec), (b_spec, a_spec + out_spec)):
    if set(own) - set(others):
      raise ValueError(f'narrow_einsum({spec!r}): an index of {own!r} is summed over '
                       'that operand alone; use jnp.einsum')
  return a_spec, b_spec, out_spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def narrow_einsum(spec: str, operand_dtype: Any, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, a, b)` on operands rounded to `operand_dtype`, accumulated and returned in
  float32; the backward products likewise. Gradients come back in the inputs' dtypes."""
  _operand_specs(spec)
  return jnp.einsum(spec, a.astype(operand_dtype), b.astype(operand_dtype),
                    preferred_element_type=jnp.float32)


def _narrow_einsum_fwd(spec, operand_dtype, a, b):
  return narrow_einsum(spec, operand_dtype, a, b), (a, b)


def _narrow_einsum_bwd(spec, operand_dtype, residuals, g):
  a, b = residuals
  a_spec, b_spec, out_spec = _operand_specs(spec)
  da = _lhs_contracting_last(a_spec, (out_spec, g), (b_spec, b), operand_dtype)
  db = _lhs_contracting_last(b_spec, (a_spec, a), (out_spec, g), operand_dtype)
  return da.astype(a.dtype), db.astype(b.dtype)


class _ProductLayout(NamedTuple):
  """A product's indices, with `lhs_order` (batch, free, contracted) the lhs's layout and
  `out_order` (batch, lhs free, rhs free) the order its output comes in."""
  batch: list[str]
  free: list[str]
  contracted: list[str]
  rhs_free: list[str]

  @property
  def lhs_order(self) -> str:
    return ''.join(self.batch + self.free + self.contracted)

  @property
  def out_order(self) -> str:
    return ''.join(self.batch + self.free + self.rhs_free)

  @property
  def rhs_orders_taken_as_is(self) -> tuple[str, str]:
    return (''.join(self.batch + self.contracted + self.rhs_free),
            ''.join(self.batch + self.rhs_free + self.contracted))


def _product_layout(out_spec: str, lhs_spec: str, rhs_spec: str) -> _ProductLayout:
  batch = [c for c in out_spec if c in lhs_spec and c in rhs_spec]
  return _ProductLayout(batch=batch,
                        free=[c for c in out_spec if c in lhs_spec and c not in batch],
                        contracted=[c for c in rhs_spec if c in lhs_spec and c not in out_spec],
                        rhs_free=[c for c in rhs_spec if c not in lhs_spec])


def _elements_moved(out_spec: str, lhs: tuple[str, jax.Array], rhs: tuple[str, jax.Array]) -> int:
  """How many elements the transposes around the product move with `lhs` as its lhs: its own,
  the output's, and the rhs's unless it is (batch, contracted, free) or (batch, free, contracted),
  which XLA multiplies as it is."""
  (lhs_spec, lhs_array), (rhs_spec, rhs_array) = lhs, rhs
  p = _product_layout(out_spec, lhs_spec, rhs_spec)
  sizes = dict(zip(lhs_spec + rhs_spec, lhs_array.shape + rhs_array.shape))
  return ((lhs_array.size if p.lhs_order != lhs_spec else 0)
          + (0 if rhs_spec in p.rhs_orders_taken_as_is else rhs_array.size)
          + (math.prod(sizes[c] for c in out_spec) if p.out_order != out_spec else 0))


def _lhs_contracting_last(out_spec: str, first: tuple[str, jax.Array],
                          second: tuple[str, jax.Array], operand_dtype: Any) -> jax.Array:
  """The float32-accumulated einsum of two (spec, operand) pairs into `out_spec`, on operands
  rounded to `operand_dtype`, its lhs laid out (batch, free, contracted indices).

  XLA:CPU runs a narrow product on the matrix units only when its lhs contracts over its
  trailing dimensions; the backward products that contract over tokens or queries (weight
  gradients, p^T dy in attention) otherwise ran on its generic kernels. The lhs is transposed
  explicitly behind an optimization barrier, which keeps XLA from folding the transpose back into
  the product's dimension numbers, and so is the output where it needs a transpose. Which
  operand is the lhs: the one for which these transposes move fewer elements (a weight gradient
  then transposes the narrower of its two activations: for the MLP's second layer, its 384-wide
  output gradient rather than its 1536-wide input).

  XLA lays a transpose out so that it moves no data where it can (the array keeps its memory
  order under a permuted layout). A 2-D product takes such an operand as it is; a batched one
  was silently run in float32 on generic kernels instead (three of the attention core's four
  backward products), so its operands are copied to row-major order: flattened behind the
  barrier, which a permuted layout cannot be without a copy.
  """
  (lhs_spec, lhs), (rhs_spec, rhs) = min(
      (first, second), (second, first), key=lambda pair: _elements_moved(out_spec, *pair))
  p = _product_layout(out_spec, lhs_spec, rhs_spec)
  lhs = jnp.transpose(lhs, [lhs_spec.index(c) for c in p.lhs_order]).astype(operand_dtype)
  rhs = rhs.astype(operand_dtype)
  if p.batch:
    flat = lax.optimization_barrier((lhs.reshape(-1), rhs.reshape(-1)))
    lhs, rhs = flat[0].reshape(lhs.shape), flat[1].reshape(rhs.shape)
  elif p.lhs_order != lhs_spec:
    lhs = lax.optimization_barrier(lhs)
  dimension_numbers = (([p.lhs_order.index(c) for c in p.contracted],
                        [rhs_spec.index(c) for c in p.contracted]),
                       ([p.lhs_order.index(c) for c in p.batch],
                        [rhs_spec.index(c) for c in p.batch]))
  # lax.dot_general keeps the operands' order (jnp.einsum may swap them).
  out = lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)
  if p.out_order != out_spec:  # Else XLA rewrites transpose(dot(a, b)) as dot(b^T, a^T).
    out = lax.optimization_barrier(out)
  return jnp.transpose(out, [p.out_order.index(c) for c in out_spec])


narrow_einsum.defvjp(_narrow_einsum_fwd, _narrow_einsum_bwd)


def _einsum_spec(lhs_ndim: int, rhs_ndim: int, dimension_numbers: lax.DotDimensionNumbers) -> str:
  """The einsum spec of a `lax.dot_general` (output: batch, lhs free, rhs free dimensions)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  letters = iter(string.ascii_letters)
  lhs_idx = [next(letters) for _ in range(lhs_ndim)]
  rhs_idx = [next(letters) for _ in range(rhs_ndim)]
  for l, r in zip(tuple(lhs_contract) + tuple(lhs_batch), tuple(rhs_contract) + tuple(rhs_batch)):
    rhs_idx[r] = lhs_idx[l]
  batch = [lhs_idx[d] for d in lhs_batch]
  lhs_free = [c for d, c in enumerate(lhs_idx) if d not in (*lhs_contract, *lhs_batch)]
  rhs_free = [c for d, c in enumerate(rhs_idx) if d not in (*rhs_contract, *rhs_batch)]
  return f'{"".join(lhs_idx)},{"".join(rhs_idx)}->{"".join(batch + lhs_free + rhs_free)}'


# Narrow products without batch dimensions carry this name: inside a custom VJP they are not
# dot_general primitives to jax's checkpoint policies, so the policy below saves them by name.
SAVEABLE_NAME = 'narrow_product_without_batch_dims'


def _named_narrow_einsum(spec: str, operand_dtype: Any, a: jax.Array, b: jax.Array) -> jax.Array:
  out = narrow_einsum(spec, operand_dtype, a, b)
  a_spec, b_spec, out_spec = _operand_specs(spec)
  if set(a_spec) & set(b_spec) & set(out_spec):
    return out
  return checkpoint_name(out, SAVEABLE_NAME)


def _narrow_on_cpu(dtype: Any) -> bool:
  return jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == 'cpu'


def einsum_for(dtype: Any) -> Einsum:
  """The einsum of the model's products for compute dtype `dtype`."""
  if not _narrow_on_cpu(dtype):
    return jnp.einsum
  operand_dtype = jnp.dtype(dtype)
  return lambda spec, a, b: _named_narrow_einsum(spec, operand_dtype, a, b)


def dot_general_for(dtype: Any, *, laid_out_on_cpu: bool = False
                    ) -> Optional[Callable[..., jax.Array]]:
  """The `dot_general` for flax's Dense / DenseGeneral (None: flax's default, lax.dot_general).

  `laid_out_on_cpu`: float32 products on CPU take `narrow_einsum`'s backward too (the MLP's
  layers). Autodiff's weight gradient comes out (out, in), from a transposed copy of the output
  gradient, and is transposed back in the optimizer's fusions after the all-reduce;
  `narrow_einsum`'s transposes the narrower input and leaves it (in, out). The ViT-S/16 float32
  train step: 0.99-1.04x in five alternated pairs (median 1.03); the attention's output layer,
  whose backward then transposes more, did not gain (docs/performance.md).
  """
  if not (_narrow_on_cpu(dtype) or (laid_out_on_cpu and jax.default_backend() == 'cpu')):
    return None
  operand_dtype = jnp.dtype(dtype)

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  **unused_kwargs):
    del precision, preferred_element_type
    spec = _einsum_spec(lhs.ndim, rhs.ndim, dimension_numbers)
    return _named_narrow_einsum(spec, operand_dtype, lhs, rhs)
  return dot_general


# The x86 CPU flags of bfloat16 dot products: AVX512_BF16's instructions, AMX's tiles.
BFLOAT16_PRODUCT_FLAGS = ('avx512_bf16', 'amx_bf16')


def slow_bfloat16_note(dtype: Any, cpuinfo_path: str = '/proc/cpuinfo') -> Optional[str]:
  """Why training in `dtype` is slower than in float32 on this CPU, if it is: bfloat16 on an x86
  CPU without bfloat16 product instructions, whose matmul library then runs the narrow products
  on generic kernels (measured on an AMD Zen 3: the ViT-S/16 train step at 0.7x float32's).
  None for other dtypes and backends, and where /proc/cpuinfo lists no x86 flags to tell."""
  if jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != 'cpu':
    return None
  try:
    with open(cpuinfo_path, encoding='utf-8') as cpuinfo:
      flags = re.search(r'^flags\s*:(.*)$', cpuinfo.read(), re.MULTILINE)
  except OSError:
    return None
  if not flags or set(flags.group(1).split()) & set(BFLOAT16_PRODUCT_FLAGS):
    return None
  return ('dtype=bfloat16 on a CPU without bfloat16 product instructions (its /proc/cpuinfo '
          'lists neither avx512_bf16 nor amx_bf16): its products run slower than float32\'s '
          '(the ViT-S/16 train step at 0.7x on an AMD Zen 3): --config.dtype=float32 is faster '
          'here')


def warn_of_slow_bfloat16(dtype: Any) -> None:
  """Logs `slow_bfloat16_note` (once per run: process 0) where it applies."""
  note = slow_bfloat16_note(dtype)
  if note and jax.process_index() == 0:
    logging.warning(note)


# remat='dots': products without batch dimensions are saved, plain or narrow.
dots_with_no_batch_dims_saveable = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    jax.checkpoint_policies.save_only_these_names(SAVEABLE_NAME))
