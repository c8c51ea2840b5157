"""The model's forward pass against an independent numpy reference, written from the paper and
the released code, on random params (no zero init hides a term): the ViT with each pooling and a
pre-logits layer, the BiT bottleneck unit of the hybrid stem, the sin-cos embedding's values,
and the FLOP count (MFU's numerator) against the products of the traced forward pass.
"""
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import resnet
from vit_jax.models import vit
from vit_jax.models.flops import forward_flops

RTOL, ATOL = 2e-4, 2e-5  # float32 through a few layers, XLA's sums against numpy's


def _random_params(model, shape, seed=0):
  """The model's params, each moved off its init by noise (zero heads and biases included)."""
  params = flax.core.unfreeze(model.init(jax.random.PRNGKey(seed), jnp.zeros(shape)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p, np.float64) + 0.2 * rng.normal(size=p.shape),
                      params)


def _layer_norm(x, p, eps=1e-6):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p[
      'scale'] + p['bias']


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def _gelu(x):  # The tanh form, as the released models.
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _attention(queries, tokens, p):
  """softmax(q k^T / sqrt(d)) v per head, the released kernels (D, heads, d) and (heads, d, D)."""
  q, k, v = (np.einsum('btD,Dhd->bthd', x, p[name]['kernel']) + p[name]['bias']
             for x, name in ((queries, 'query'), (tokens, 'key'), (tokens, 'value')))
  weights = _softmax(np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1]))
  return np.einsum('bhqk,bkhd,hdD->bqD', weights, v, p['out']['kernel']) + p['out']['bias']


def _mlp(x, p):
  return _dense(_gelu(_dense(x, p['Dense_0'])), p['Dense_1'])


def _vit(images, p, patch, classifier):
  b, h, w, c = images.shape
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = np.einsum('bhpwqc,pqcD->bhwD', patches, p['embedding']['kernel']) + p['embedding']['bias']
  x = x.reshape(b, -1, x.shape[-1])
  if classifier == 'token':
    x = np.concatenate([np.broadcast_to(p['cls'], (b, 1, x.shape[-1])), x], axis=1)
  encoder = p['Transformer']
  x = x + encoder['posembed_input']['pos_embedding']
  for i in range(sum(name.startswith('encoderblock_') for name in encoder)):
    block = encoder[f'encoderblock_{i}']
    y = _layer_norm(x, block['LayerNorm_0'])  # Pre-LN: x + MSA(LN(x)), then x + MLP(LN(x)).
    x = x + _attention(y, y, block['MultiHeadDotProductAttention_1'])
    x = x + _mlp(_layer_norm(x, block['LayerNorm_2']), block['MlpBlock_3'])
  x = _layer_norm(x, encoder['encoder_norm'])
  if classifier == 'token':
    x = x[:, 0]
  elif classifier == 'gap':
    x = x.mean(1)
  else:  # MAP: a learned probe attends over the tokens, then a residual MLP.
    head = p['MAPHead_0']
    y = _attention(np.broadcast_to(head['probe'], (b, 1, x.shape[-1])), x,
                   head['MultiHeadDotProductAttention_0'])
    x = (y + _mlp(_layer_norm(y, head['LayerNorm_0']), head['MlpBlock_0']))[:, 0]
  features = np.tanh(_dense(x, p['pre_logits']))
  return features, _dense(features, p['head'])


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_vit_forward_is_the_papers(classifier):
  model = models.create('ViT-Mu_4', num_classes=5, representation_size=16, classifier=classifier)
  shape = (2, 16, 16, 3)
  params = _random_params(model, shape)
  images = np.random.default_rng(1).normal(size=shape)
  logits, inter = model.apply({'params': jax.tree.map(jnp.float32, params)},
                              jnp.float32(images), mutable='intermediates')
  features, expected = _vit(images, params, 4, classifier)
  np.testing.assert_allclose(inter['intermediates']['pre_logit_features'][0], features,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=ATOL)


def _conv(x, w, stride):
  return np.asarray(jax.lax.conv_general_dilated(
      x, w, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest'), np.float64)


def _standardized(w):
  """BiT's weight standardisation over each filter's (h, w, in), eps added to the deviation."""
  w = w - w.mean((0, 1, 2), keepdims=True)
  return w / (w.std((0, 1, 2), keepdims=True) + 1e-5)


def _group_norm(x, p, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * p['scale'] + p['bias']


def _bottleneck(x, p, stride):
  conv = lambda y, name, s=1: _conv(y, _standardized(p[name]['kernel']), s)  # pylint: disable=g-long-lambda
  relu = lambda y: np.maximum(y, 0)
  y = relu(_group_norm(conv(x, 'conv1'), p['gn1']))
  y = relu(_group_norm(conv(y, 'conv2', stride), p['gn2']))
  y = _group_norm(conv(y, 'conv3'), p['gn3'])
  return relu(_group_norm(conv(x, 'conv_proj', stride), p['gn_proj']) + y)


def test_bit_bottleneck_unit_is_the_released_one():
  unit = resnet.BottleneckUnit(features=32, strides=2)
  shape = (2, 6, 6, 64)
  x = np.random.default_rng(1).normal(size=shape)
  init = flax.core.unfreeze(unit.init(jax.random.PRNGKey(0), jnp.zeros(shape)))['params']
  # The residual branch starts switched off (gn3's scale 0): the unit is its projection.
  np.testing.assert_array_equal(init['gn3']['scale'], 0)
  np.testing.assert_allclose(unit.apply({'params': init}, jnp.float32(x)),
                             np.maximum(_group_norm(_conv(x, _standardized(
                                 np.asarray(init['conv_proj']['kernel'], np.float64)), 2),
                                 init['gn_proj']), 0), rtol=RTOL, atol=ATOL)
  params = _random_params(unit, shape)
  got = unit.apply({'params': jax.tree.map(jnp.float32, params)}, jnp.float32(x))
  np.testing.assert_allclose(got, _bottleneck(x, params, 2), rtol=RTOL, atol=ATOL)


def test_sincos2d_values_are_big_visions():
  """Per token: sin and cos of x at frequencies 1 .. 1/temperature, then the same of y."""
  pe = np.asarray(vit.sincos2d_posemb(2, 3, 8))[0]
  omega = np.array([1.0, 1e-4])
  for token, (y, x) in enumerate((y, x) for y in range(2) for x in range(3)):
    np.testing.assert_allclose(pe[token], np.concatenate(
        [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]),
                               rtol=1e-6, atol=1e-7)


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in a jaxpr, nested ones included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _dot_flops(sub)
  return total


@pytest.mark.parametrize('overrides', [
    {}, dict(classifier='gap'), dict(classifier='map'), dict(representation_size=48),
    dict(patch_size=(4, 2))])
def test_forward_flops_are_the_products_of_the_forward_pass_exactly(overrides):
  """The MFU's numerator: every product of the traced forward pass, the class token's row too
  (XLA's cost analysis only bounds it, as it counts the element-wise work as well)."""
  model = models.create('ViT-Mu_4', num_classes=10, **overrides)
  images = jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  traced = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
  assert forward_flops(model, 32, 32) == _dot_flops(traced.jaxpr)
