"""bfloat16 on CPU: products on bfloat16 operands accumulated in float32, backward ones too."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import matmul
from vit_jax.models import vit


def _operands(seed, *shapes):
  return [jax.random.normal(key, shape) for key, shape in
          zip(jax.random.split(jax.random.PRNGKey(seed), len(shapes)), shapes)]


@pytest.mark.parametrize('spec, shapes', [
    ('btd,df->btf', [(2, 5, 4), (4, 3)]),
    ('bhqd,bhkd->bhqk', [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ('btD,sDhd->sbhtd', [(2, 5, 8), (3, 8, 2, 4)]),
    ('bhpwqc,pqcd->bhwd', [(2, 3, 2, 3, 2, 1), (2, 2, 1, 5)]),
])
def test_narrow_einsum_is_einsum_with_the_same_gradients(spec, shapes):
  a, b, = _operands(0, *shapes)
  cotangent = _operands(1, jnp.einsum(spec, a, b).shape)[0]
  loss = lambda fn: lambda a, b: jnp.vdot(fn(spec, a, b), cotangent)
  narrow = lambda dtype: lambda spec, a, b: matmul.narrow_einsum(spec, dtype, a, b)
  want = jax.grad(loss(jnp.einsum), argnums=(0, 1))(a, b)
  # Float32 operands: the same products, so the same numbers to float32 rounding.
  got = jax.grad(loss(narrow(jnp.float32)), argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # bfloat16 operands: float32 results and gradients, off by bfloat16 rounding only.
  np.testing.assert_allclose(matmul.narrow_einsum(spec, jnp.bfloat16, a, b),
                             jnp.einsum(spec, a, b), rtol=0.05, atol=0.05)
  got = jax.grad(loss(narrow(jnp.bfloat16)), argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=0.05, atol=0.05)


def _lhs_contractions(hlo_text):
  """(lhs rank, lhs contracting dimensions) of every dot_general in StableHLO text."""
  found = re.findall(r'stablehlo\.dot_general [^\n]*?contracting_dims = \[([\d, ]*)\] x [^\n]*?'
                     r': \(tensor<((?:\d+x)+)\w+>', hlo_text)
  return [(shape.count('x'), sorted(int(d) for d in dims.split(', '))) for dims, shape in found]


@pytest.mark.parametrize('spec, shapes', [
    ('btd,df->btf', [(2, 5, 4), (4, 3)]),  # Dense: the weight gradient contracts over tokens.
    ('bhqk,bhkd->bhqd', [(2, 3, 5, 6), (2, 3, 6, 4)]),  # Attention: dv = p^T dy over queries.
    ('bhqd,bhkd->bhqk', [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ('btD,sDhd->sbhtd', [(2, 5, 8), (3, 8, 2, 4)]),
    ('abcd,bdg->acg', [(2, 3, 5, 4), (3, 4, 6)]),
])
def test_narrow_backward_products_contract_the_lhs_trailing_dimensions(spec, shapes):
  """The form XLA:CPU runs on the matrix units; contracting over leading dimensions (tokens,
  queries) sent the weight gradients and half the attention backward to generic kernels."""
  a, b = _operands(0, *shapes)
  grad = jax.grad(lambda a, b: matmul.narrow_einsum(spec, jnp.bfloat16, a, b).sum(),
                  argnums=(0, 1))
  products = _lhs_contractions(jax.jit(grad).lower(a, b).as_text())
  assert len(products) == 2  # The forward product is not needed for these gradients.
  for rank, dims in products:
    assert dims == list(range(rank - len(dims), rank)), (rank, dims)


def test_narrow_einsum_rejects_an_index_summed_over_one_operand():
  a, b = _operands(0, (3, 4), (4, 5))
  with pytest.raises(ValueError, match='summed over that operand alone'):
    matmul.narrow_einsum('ij,jk->k', jnp.bfloat16, a, b)


@pytest.mark.parametrize('axis', [-1, (1, 3)])
def test_dense_with_narrow_dot_general_matches_dense(axis):
  x, = _operands(0, (2, 3, 5, 4))
  plain = nn.DenseGeneral(6, axis=axis)
  narrow = nn.DenseGeneral(6, axis=axis, dtype=jnp.bfloat16,
                           dot_general=matmul.dot_general_for(jnp.bfloat16))
  variables = plain.init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(narrow.apply(variables, x), plain.apply(variables, x),
                             rtol=0.05, atol=0.05)


def test_float32_models_keep_the_plain_products():
  assert matmul.einsum_for(jnp.float32) is jnp.einsum
  assert matmul.dot_general_for(jnp.float32) is None


def _dot_types(hlo_text):
  """(operand element types, result element type) of every dot_general in StableHLO text."""
  found = re.findall(r'stablehlo\.dot_general .*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) '
                     r'-> tensor<[^>]*x(\w+)>', hlo_text)
  return [((lhs, rhs), out) for lhs, rhs, out in found]


def _lowered_vit_grad(dtype, remat='none'):
  """The jitted gradient of a tiny ViT's squared logits, lowered from shapes alone. The images
  are an argument, not a constant XLA could fold into the backward products."""
  model = models.create('ViT-Mu_4', num_classes=5, dtype=dtype, remat=remat)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  loss = lambda p, x: (model.apply(p, x).astype(jnp.float32) ** 2).mean()
  return jax.jit(jax.grad(loss)).lower(params, images)


def test_bfloat16_train_step_products_are_bfloat16_in_float32_out():
  """Every product of a bfloat16 ViT's forward and backward: bfloat16 operands, float32 result,
  the form XLA:CPU runs on the matrix units (before: bfloat16 results, or float32 operands)."""
  dots = _dot_types(_lowered_vit_grad('bfloat16').as_text())
  # Forward and backward: patch embedding, qkv, 2 attention products, out, 2 MLP, head.
  assert len(dots) >= 3 * 4 * 6
  assert set(dots) == {(('bf16', 'bf16'), 'f32')}


def _compiled_dot_types(hlo_text):
  """(lhs, rhs, result element type, op_name) of every dot in a compiled module's text."""
  types = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[', hlo_text, re.MULTILINE))
  found = re.findall(r'= (\w+)\[[\d,]*\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\).*?op_name="([^"]*)"',
                     hlo_text)
  return [(types[lhs], types[rhs], out, op_name) for out, lhs, rhs, op_name in found]


def test_bfloat16_encoder_products_stay_bfloat16_once_compiled():
  """What XLA runs, not only what jax emits: a batched product whose operand XLA had laid out
  transposed without moving data was upcast to float32 (three of the attention core's four
  backward products, per layer)."""
  hlo = _lowered_vit_grad('bfloat16').compile().as_text()
  dots = _compiled_dot_types(hlo)
  encoder = [dot[:3] for dot in dots if '/encoderblock_' in dot[3]]
  assert len(encoder) == 4 * (6 + 12)  # Per layer: 6 products forward, 12 backward.
  assert set(encoder) == {('bf16', 'bf16', 'f32')}
  # Each in a matmul-library fusion: a dot left in the entry computation runs on XLA's own
  # kernel, which fails at run time on bfloat16 x bfloat16 -> float32 (XLA had rewritten
  # transpose(dot(a, b)) into dot(b^T, a^T), undoing the lhs layout).
  entry = hlo[hlo.index('\nENTRY'):]
  assert ' dot(' not in entry


def _grad_dot_count(dtype, remat):
  return len(_dot_types(_lowered_vit_grad(dtype, remat).as_text()))


def test_remat_dots_saves_the_narrow_products_as_it_saves_float32_ones():
  """`remat='dots'` recomputes only the batched attention products, in bfloat16 as in float32
  (the narrow products sit in a custom VJP, where the dot policy alone would not see them)."""
  saved = _grad_dot_count('bfloat16', 'dots')
  assert saved == _grad_dot_count('float32', 'dots')
  assert _grad_dot_count('bfloat16', 'none') < saved < _grad_dot_count('bfloat16', 'full')


ZEN3_FLAGS = 'fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni vaes vpclmulqdq'
X86_CPUINFO = 'processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {}\nbugs\t\t: sysret_ss_attrs\n'


@pytest.mark.parametrize('cpuinfo, dtype, slow', [
    (X86_CPUINFO.format(ZEN3_FLAGS), 'bfloat16', True),  # AVX2 only: generic kernels.
    (X86_CPUINFO.format(ZEN3_FLAGS), 'float32', False),
    (X86_CPUINFO.format(ZEN3_FLAGS + ' avx512f avx512_bf16'), 'bfloat16', False),  # Zen 4.
    (X86_CPUINFO.format(ZEN3_FLAGS + ' avx512f amx_bf16 amx_tile'), 'bfloat16', False),  # Xeon.
    ('processor\t: 0\nFeatures\t: fp asimd sve bf16\n', 'bfloat16', False),  # Arm: not judged.
])
def test_bfloat16_training_is_called_slow_where_the_cpu_has_no_bfloat16_products(
    tmp_path, cpuinfo, dtype, slow):
  path = tmp_path / 'cpuinfo'
  path.write_text(cpuinfo)
  note = matmul.slow_bfloat16_note(dtype, str(path))
  assert (note is not None) == slow
  if slow:
    assert note.startswith('dtype=bfloat16 on a CPU without bfloat16 product instructions')
    assert note.endswith('--config.dtype=float32 is faster here')
  assert matmul.slow_bfloat16_note('bfloat16', str(tmp_path / 'missing')) is None


def test_float32_mlp_on_cpu_takes_the_laid_out_backward_with_autodiffs_gradients():
  """The MLP's float32 layers go through narrow_einsum's backward on CPU (a faster layout of the
  weight gradients), with the plain formulation's outputs and gradients."""
  assert jax.default_backend() == 'cpu'
  assert matmul.dot_general_for(jnp.float32, laid_out_on_cpu=True) is not None
  x, = _operands(0, (2, 7, 16))
  block = vit.MlpBlock(mlp_dim=48)
  params = block.init(jax.random.PRNGKey(1), x, deterministic=True)['params']

  def plain(params, x):
    hidden = nn.gelu(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
    return hidden @ params['Dense_1']['kernel'] + params['Dense_1']['bias']

  def laid_out(params, x):
    return block.apply({'params': params}, x, deterministic=True)

  np.testing.assert_allclose(laid_out(params, x), plain(params, x), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda params, x: jnp.sum(jnp.sin(f(params, x)))
  grads = [jax.grad(loss(f), argnums=(0, 1))(params, x) for f in (laid_out, plain)]
  for got, want in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
