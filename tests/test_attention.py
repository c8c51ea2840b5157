"""Self-attention: every formulation is the textbook one, in values and in gradients."""
import re
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.errors import ConfigError
from vit_jax.models import attention


def test_fused_attention_matches_explicit_softmax():
  model = models.create('ViT-Mu_4', num_classes=5)
  variables = flax.core.unfreeze(model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))
  variables['params']['head']['kernel'] += 0.1
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  fused = model.apply(variables, images)
  explicit, inter = model.apply(variables, images, mutable='intermediates')
  np.testing.assert_allclose(fused, explicit, atol=1e-5)
  attention = inter['intermediates']['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_1']['attention'][0]
  assert attention.shape == (2, 2, 65, 65)
  np.testing.assert_allclose(attention.sum(-1), 1., atol=1e-5)


@pytest.mark.parametrize('implementation', ['auto', 'xla'])
def test_attention_matches_the_plain_formulation(implementation):
  """Every path (CPU default: normalised after PV; jax.nn.dot_product_attention; the explicit
  one that sows the weights) is the textbook softmax(q k^T / sqrt(d)) v of the released params."""
  layer = attention.MultiHeadDotProductAttention(num_heads=3, implementation=implementation)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 48))
  params = layer.init(jax.random.PRNGKey(1), x, deterministic=True)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)  # Non-zero biases.
  proj = lambda name: jnp.einsum('btd,dhk->bthk', x, params[name]['kernel']) + params[name]['bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(16), axis=-1)
  expected = jnp.einsum('bhqd,hdo->bqo', jnp.einsum('bhqk,bkhd->bhqd', weights, v),
                        params['out']['kernel']) + params['out']['bias']
  fused = layer.apply({'params': params}, x, deterministic=True)
  explicit, inter = layer.apply({'params': params}, x, deterministic=True, mutable='intermediates')
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(explicit, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(inter['intermediates']['attention'][0], weights, atol=1e-6)


def _plain_attention(q, k, v):
  """The textbook softmax(q k^T) v on head-major (b, heads, t, d), in float32."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  return jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k)), v)


@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('shape', [(2, 3, 11, 16), (3, 2, 17, 32)])
def test_cpu_attention_core_has_autodiffs_gradients(shape, dtype, tolerance):
  """The CPU core, whose backward is written out for XLA:CPU in float32 and goes through the
  narrow products in bfloat16, gives the gradients autodiff gives the textbook formulation."""
  q, k, v = (2 * jax.random.normal(key, shape).astype(dtype)
             for key in jax.random.split(jax.random.PRNGKey(0), 3))
  cotangent = jax.random.normal(jax.random.PRNGKey(1), shape)
  core = lambda q, k, v: attention._attention_cpu(  # pylint: disable=protected-access
      q, k, v, dtype)
  objectives = [lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) * cotangent)
                for f in (core, _plain_attention)]
  (value, grads), (expected_value, expected_grads) = [
      jax.value_and_grad(objective, argnums=(0, 1, 2))(q, k, v) for objective in objectives]
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  assert rel(value, expected_value) < tolerance
  for grad, expected in zip(grads, expected_grads):
    assert grad.dtype == dtype
    assert rel(grad, expected) < tolerance


def test_float32_cpu_attention_gradient_contracts_every_product_over_the_last_axis():
  """XLA's CPU backend runs a batched product that contracts its left operand's leading token axis
  on slower kernels; a float32 model's attention core keeps every product of its gradient off
  them, as bfloat16's narrow products do (tests/test_matmul.py)."""
  q, k, v = (jax.random.normal(key, (2, 3, 11, 16))
             for key in jax.random.split(jax.random.PRNGKey(0), 3))
  core = lambda q, k, v: attention._attention_cpu(  # pylint: disable=protected-access
      q, k, v, jnp.float32)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(core(q, k, v))), argnums=(0, 1, 2)))
  hlo = grad.lower(q, k, v).compile().as_text()
  contractions = re.findall(r' dot\(.*?lhs_contracting_dims=\{(\d+)\}', hlo)
  assert len(contractions) >= 5  # q k^T, and dv, dk, dq, dweights in the backward.
  assert set(contractions) == {'3'}


def test_auto_attention_asks_for_cudnn_only_where_it_applies(monkeypatch):
  """jax.nn.dot_product_attention defaults to XLA even on GPUs; 'auto' asks for cuDNN's kernel on
  CUDA with half-precision operands and a head dim it takes, and leaves everything else to jax."""
  choose = attention._fused_implementation  # pylint: disable=protected-access
  monkeypatch.setattr(jax.extend.backend, 'get_backend',
                      lambda: types.SimpleNamespace(platform_version='<unknown>'))  # A CPU's.
  assert choose('auto', jnp.bfloat16, 64) is None
  with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    choose('cudnn', jnp.bfloat16, 64)
  monkeypatch.setattr(jax.extend.backend, 'get_backend',
                      lambda: types.SimpleNamespace(platform_version='cuda 12080'))
  assert choose('auto', jnp.bfloat16, 64) == choose('auto', jnp.float16, 80) == 'cudnn'
  assert choose('auto', jnp.float32, 64) is None  # cuDNN's kernel takes fp16/bf16 only.
  assert choose('auto', jnp.bfloat16, 20) is None  # Not a multiple of 8.
  assert choose('xla', jnp.bfloat16, 64) == choose('xla', jnp.float32, 20) == 'xla'
  assert choose('cudnn', jnp.float16, 128) == 'cudnn'
  with pytest.raises(ConfigError, match='float32, 64'):
    choose('cudnn', jnp.float32, 64)
  monkeypatch.setattr(jax.extend.backend, 'get_backend',
                      lambda: types.SimpleNamespace(platform_version='rocm 60300'))
  assert choose('auto', jnp.bfloat16, 64) is None


def test_cudnn_attention_pads_odd_token_counts_without_changing_the_result(monkeypatch):
  """jax refuses cuDNN's gradient for odd token counts (ViT's 197), so the layer appends a masked
  token. Checked here on CPU with XLA standing in for cuDNN: values and gradients as unpadded."""
  calls = []
  unpatched = jax.nn.dot_product_attention

  def xla_for_cudnn(*args, implementation=None, **kwargs):
    calls.append((args[0].shape, implementation, kwargs.get('key_value_seq_lengths')))
    return unpatched(*args, implementation='xla' if implementation == 'cudnn' else implementation,
                     **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', xla_for_cudnn)
  monkeypatch.setattr(attention, '_fused_implementation', lambda implementation, *_: implementation)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  layers = {impl: attention.MultiHeadDotProductAttention(num_heads=4, implementation=impl)
            for impl in ('cudnn', 'xla')}
  params = layers['xla'].init(jax.random.PRNGKey(1), x, deterministic=True)['params']
  calls.clear()
  objectives = [lambda p, x, layer=layer: jnp.sum(jnp.sin(layer.apply({'params': p}, x,
                                                                     deterministic=True)))
                for layer in layers.values()]
  (padded, padded_grads), (plain, plain_grads) = [
      jax.value_and_grad(objective, argnums=(0, 1))(params, x) for objective in objectives]
  assert [(shape, impl) for shape, impl, _ in calls] == [((2, 6, 4, 8), 'cudnn'),
                                                         ((2, 5, 4, 8), 'xla')]
  np.testing.assert_array_equal(calls[0][2], [5, 5])
  np.testing.assert_allclose(padded, plain, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               padded_grads, plain_grads)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
def test_auto_attention_on_gpu_is_cudnn_and_matches_xla():
  """On GPUs 'auto' runs bf16 attention through cuDNN's fused kernel (ViT-B's shapes: 197 tokens,
  12 heads of 64), with XLA's outputs and gradients up to bf16 rounding."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 197, 768))
  layers = {impl: attention.MultiHeadDotProductAttention(num_heads=12, dtype=jnp.bfloat16,
                                                   implementation=impl)
            for impl in ('auto', 'xla')}
  params = layers['xla'].init(jax.random.PRNGKey(1), x, deterministic=True)['params']
  loss = {impl: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      lambda p, x, layer=layer: jnp.sum(layer.apply({'params': p}, x, deterministic=True)
                                        .astype(jnp.float32) ** 2), argnums=(0, 1)))
          for impl, layer in layers.items()}
  assert 'cudnn' in loss['auto'].lower(params, x).as_text()
  assert 'cudnn' not in loss['xla'].lower(params, x).as_text()
  (fused, fused_grads), (plain, plain_grads) = loss['auto'](params, x), loss['xla'](params, x)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(fused, plain) < 1e-2
  # The key bias is left out: it shifts each query's logits by a constant, so its gradient is 0
  # up to rounding and a relative error of it means nothing.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fused_grads),
                          jax.tree.leaves(plain_grads)):
    if "['key']['bias']" not in jax.tree_util.keystr(path):
      assert rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 2e-2, jax.tree_util.keystr(path)


def test_head_projection_is_laid_out_and_initialised_as_dense_general():
  """query/key/value keep nn.DenseGeneral's layout and init, so released checkpoints still load."""
  x = jnp.ones((2, 5, 48))
  ours = attention.HeadProjection(num_heads=3, head_dim=16).init(jax.random.PRNGKey(0), 48)
  dense = flax.linen.DenseGeneral(features=(3, 16),
                                  kernel_init=flax.linen.initializers.xavier_uniform())
  jax.tree.map(np.testing.assert_array_equal, ours, dense.init(jax.random.PRNGKey(0), x))
