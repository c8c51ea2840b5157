"""The model zoo: exact parameter counts, layouts, options, equivalences and errors."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.errors import ConfigError
from vit_jax.models import dropout
from vit_jax.models import resnet
from vit_jax.models import scan_layout
from vit_jax.models import vit
from vit_jax.models.flops import forward_flops


def _init(model, shape=(2, 32, 32, 3), seed=0):
  return flax.core.unfreeze(
      model.init(jax.random.PRNGKey(seed), jnp.zeros(shape)))


def _count(variables) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('name,expected', [
    ('ViT-Ti_16', 5_717_416), ('ViT-S_16', 22_050_664), ('ViT-B_16', 86_567_656),
    ('ViT-L_16', 304_326_632), ('ViT-H_14', 632_045_800), ('R50+ViT-B_16', 98_659_112),
    # The released configs' other hybrids (timm lists 328.99M and 36.43M for them).
    ('R50+ViT-L_32', 328_994_856), ('R26+ViT-S_32', 36_431_912)])
def test_parameter_counts_match_the_paper(name, expected):
  model = models.create(name, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert _count(shapes) == expected


def test_released_layout_names_and_shapes():
  model = models.create('ViT-B_16', num_classes=10, representation_size=768)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))['params']
  flat = {'/'.join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
  block = 'Transformer/encoderblock_11/'
  assert flat['embedding/kernel'] == (16, 16, 3, 768)
  assert flat['cls'] == (1, 1, 768)
  assert flat['Transformer/posembed_input/pos_embedding'] == (1, 197, 768)
  assert flat[block + 'MultiHeadDotProductAttention_1/query/kernel'] == (768, 12, 64)
  assert flat[block + 'MultiHeadDotProductAttention_1/value/bias'] == (12, 64)
  assert flat[block + 'MultiHeadDotProductAttention_1/out/kernel'] == (12, 64, 768)
  assert flat[block + 'MlpBlock_3/Dense_0/kernel'] == (768, 3072)
  assert flat[block + 'MlpBlock_3/Dense_1/kernel'] == (3072, 768)
  for key in (block + 'LayerNorm_0/scale', block + 'LayerNorm_2/bias',
              'Transformer/encoder_norm/scale'):
    assert flat[key] == (768,)
  assert flat['pre_logits/kernel'] == (768, 768)
  assert flat['head/kernel'] == (768, 10)


def test_hybrid_keys_sit_at_the_top_level():
  model = models.create('R50+ViT-B_16', num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  params = shapes['params']
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 64)
  assert set(params['block1']['unit1']) == {
      'conv1', 'conv2', 'conv3', 'gn1', 'gn2', 'gn3', 'conv_proj', 'gn_proj'}
  assert set(params['block3']) == {f'unit{i}' for i in range(1, 10)}
  assert params['embedding']['kernel'].shape == (1, 1, 1024, 768)


@pytest.mark.parametrize('name,units,embedded', [
    ('R50+ViT-B_16', (3, 4, 9), 1024), ('R50+ViT-L_32', (3, 4, 6, 3), 2048),
    ('R26+ViT-S_32', (2, 2, 2, 2), 2048), ('R14+ViT-Mu_8', (2, 2), 512),
    ('R8+ViT-Mu_8', (1, 1), 256)])
def test_hybrid_names_build_the_released_stems(name, units, embedded):
  """The name's patch is the effective one: the stem's stride times the ViT's 1x1 patch."""
  model = models.create(name, num_classes=10)
  assert (model.resnet.num_layers, model.patch_size) == (units, (1, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  params = shapes['params']
  assert [len(params[f'block{i + 1}']) for i in range(len(units))] == list(units)
  assert params['embedding']['kernel'].shape[2] == embedded
  assert vit.token_grid(model, 64, 64) == (64 // int(name.split('_')[-1]),) * 2


def test_stem_stride_and_weight_standardisation_are_the_released_ones():
  assert [resnet.total_stride(units) for units in ((), (1,), (3, 4, 9), (3, 4, 6, 3))] == [
      4, 4, 16, 32]  # The root conv and max-pool halve twice; each later stage once.
  w = np.random.RandomState(0).normal(scale=0.003, size=(3, 3, 4, 5)).astype(np.float32)
  centred = w - w.mean(axis=(0, 1, 2))
  released = centred / (centred.std(axis=(0, 1, 2)) + 1e-5)  # eps on the std, not the variance
  np.testing.assert_allclose(resnet.weight_standardize(jnp.asarray(w), (0, 1, 2), 1e-5),
                             released, rtol=1e-5)


@pytest.mark.parametrize('shape', [(2, 14, 14, 3), (2, 15, 15, 3), (1, 7, 9, 2), (1, 1, 1, 1)])
def test_stem_max_pool_is_flaxs_in_values_and_gradient(shape):
  """Its own formulation, for XLA's CPU gradient of flax's (9x slower); ties aside (none in
  random data), the same (the gradient of a pixel in two windows summed in another order)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  flax_pool = lambda x: flax.linen.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  np.testing.assert_array_equal(resnet.max_pool(x), flax_pool(x))
  cotangent = jnp.asarray(rng.normal(size=flax_pool(x).shape), jnp.float32)
  grad = lambda pool: jax.grad(lambda x: (pool(x) * cotangent).sum())(x)
  np.testing.assert_allclose(grad(resnet.max_pool), grad(flax_pool), rtol=1e-6, atol=0)


@pytest.mark.parametrize('shape,strides', [((2, 7, 7, 8), 1), ((2, 7, 7, 8), 2), ((1, 4, 6, 3), 2)])
def test_stem_1x1_conv_is_flaxs_conv_in_values_and_gradients(shape, strides):
  """A matmul of its own (XLA:CPU ran the conv's gradients as slow convolutions), with the
  StdConv's parameter and init: flax's conv on the standardised kernel gives the same outputs
  and gradients, for the input and the raw kernel."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  conv = resnet.StdConv1x1(5, strides)
  params = conv.init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, resnet.StdConv(
      5, (1, 1), (strides, strides), use_bias=False).init(jax.random.PRNGKey(0), x))
  flax_conv = lambda p, x: flax.linen.Conv(5, (1, 1), (strides, strides), use_bias=False).apply(
      {'params': {'kernel': resnet.weight_standardize(p['params']['kernel'], (0, 1, 2), 1e-5)}},
      x)
  assert 'conv_general_dilated' not in str(jax.make_jaxpr(jax.grad(
      lambda p: conv.apply(p, x).sum()))(params))
  ours, theirs = conv.apply(params, x), flax_conv(params, x)
  assert ours.shape == theirs.shape == (shape[0], -(-shape[1] // strides),
                                        -(-shape[2] // strides), 5)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
  cotangent = jnp.asarray(rng.normal(size=theirs.shape), jnp.float32)
  grads = lambda f: jax.grad(lambda p, x: (f(p, x) * cotangent).sum(), argnums=(0, 1))(params, x)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               grads(conv.apply), grads(flax_conv))


def test_init_is_deterministic_and_head_is_zero():
  model = models.create('ViT-Mu_4', num_classes=10, head_bias_init=-10.)
  a, b = _init(model, seed=3), _init(model, seed=3)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.any(a['params']['head']['kernel'])
  np.testing.assert_array_equal(a['params']['head']['bias'], -10.)
  assert not np.any(a['params']['cls'])
  assert np.std(a['params']['Transformer']['posembed_input']['pos_embedding']) == pytest.approx(
      0.02, rel=0.15)


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
@pytest.mark.parametrize('posemb', ['learn', 'sincos2d'])
def test_output_shapes_for_every_pooling_and_posemb(classifier, posemb):
  model = models.create('ViT-Mu_4', num_classes=7, classifier=classifier, posemb=posemb,
                        representation_size=48)
  variables = _init(model)
  logits = model.apply(variables, jnp.ones((2, 32, 32, 3)))
  assert logits.shape == (2, 7)
  features = models.create('ViT-Mu_4', num_classes=0, classifier=classifier, posemb=posemb)
  assert features.apply(_init(features), jnp.ones((2, 32, 32, 3))).shape == (2, 64)
  has_posemb = 'posembed_input' in variables['params']['Transformer']
  assert has_posemb == (posemb == 'learn')
  assert ('cls' in variables['params']) == (classifier == 'token')


def test_non_square_resolution_and_hybrid_forward():
  model = models.create('ViT-Mu_4', num_classes=3)
  variables = _init(model, shape=(1, 24, 40, 3))
  assert variables['params']['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 6 * 10 + 1, 64)
  assert model.apply(variables, jnp.ones((2, 24, 40, 3))).shape == (2, 3)
  hybrid = models.create('R14+ViT-Mu_8', num_classes=3)  # Traced only: eager, ~30 s on 2 cores.
  variables = jax.eval_shape(hybrid.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.eval_shape(hybrid.apply, variables, jnp.ones((2, 32, 32, 3))).shape == (2, 3)


def test_r8_stem_of_the_default_is_half_width_and_embeds_a_4x4_map():
  model = models.create('R8+ViT-Mu_8', num_classes=10)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))['params']
  assert params['conv_root']['kernel'].shape == (7, 7, 1, 32)
  assert set(params['block2']) == {'unit1'}
  assert params['embedding']['kernel'].shape[-2:] == (256, 64)  # 1x1 patches of 256 channels.
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 4 * 4 + 1, 64)
  assert sum(x.size for x in jax.tree.leaves(params)) == 334_506


def test_scan_and_unrolled_give_the_same_outputs():
  unrolled = models.create('ViT-Mu_4', num_classes=5)
  scanned = models.create('ViT-Mu_4', num_classes=5, scan=True, remat='full')
  variables = _init(unrolled)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  head = variables['params']['head']
  head['kernel'] = jax.random.normal(jax.random.PRNGKey(2), head['kernel'].shape)
  as_scanned = {'params': scan_layout.unrolled_to_scanned(variables['params'])}
  assert as_scanned['params']['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (
      4, 64)
  expected = unrolled.apply(variables, images)
  np.testing.assert_allclose(scanned.apply(as_scanned, images), expected, rtol=1e-5, atol=1e-4)
  back = scan_layout.scanned_to_unrolled(as_scanned['params'])
  jax.tree.map(np.testing.assert_array_equal, back, variables['params'])
  # A scanned init has the same tree (after conversion) as an unrolled one.
  scanned_init = _init(scanned)['params']
  assert (jax.tree.structure(scan_layout.scanned_to_unrolled(scanned_init))
          == jax.tree.structure(variables['params']))


@pytest.mark.parametrize('scan,remat', [(False, 'dots'), (True, 'full'), (True, 'none')])
def test_scan_and_remat_keep_the_gradients(scan, remat):
  """Rematerialisation and the scan over layers change how the gradient is computed, not what it
  is (the CPU attention core's custom-VJP products under jax.checkpoint and lax.scan included)."""
  plain = models.create('ViT-Mu_4', num_classes=5)
  variant = models.create('ViT-Mu_4', num_classes=5, scan=scan, remat=remat)
  params = jax.tree.map(lambda p: p + 0.05, _init(plain)['params'])  # A non-zero head.
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))

  def gradient(model, params):
    objective = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, images)))
    return jax.jit(jax.grad(objective))(params)

  got = scan_layout.to_layout(gradient(variant, scan_layout.to_layout(params, scan)), False)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got,
               gradient(plain, params))


def test_a_scanned_stack_saves_no_more_for_the_backward_pass_than_an_unrolled_one():
  """Under scan each value saved for the backward pass is written out per layer; the scanned
  blocks recompute the LayerNorms' and GELU's element-wise intermediates instead, which unrolled
  XLA fuses away by itself (XLA:CPU temp here: unrolled 135 MiB; scanned 182 before, 100 now)."""
  images = jnp.zeros((64, 32, 32, 3))

  def gradient_temp(model):
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    loss = lambda p: model.apply(p, images, train=True).sum()
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  unrolled = gradient_temp(models.create('ViT-Mu_4', num_classes=5))
  assert gradient_temp(models.create('ViT-Mu_4', num_classes=5, scan=True)) < 0.9 * unrolled


def test_patch_embedding_is_the_strided_conv():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 24, 3))
  embed = vit.PatchEmbedding(16, (8, 4))
  conv = flax.linen.Conv(16, (8, 4), strides=(8, 4), padding='VALID',
                         kernel_init=flax.linen.initializers.lecun_normal())
  params = embed.init(jax.random.PRNGKey(1), images)
  conv_params = conv.init(jax.random.PRNGKey(1), images)
  jax.tree.map(np.testing.assert_array_equal, params, conv_params)  # Same init, same layout.
  params = jax.tree.map(lambda p: p + 0.1, params)
  np.testing.assert_allclose(embed.apply(params, images), conv.apply(params, images),
                             rtol=1e-5, atol=1e-5)


def test_dropout_mask_has_the_rate_and_rescales():
  x = jnp.ones((16, 197, 384))
  drop = dropout.Dropout(0.1)
  apply = jax.jit(lambda x, seed: drop.apply({}, x, deterministic=False,
                                             rngs={'dropout': jax.random.PRNGKey(seed)}))
  y = apply(x, 0)
  assert set(np.unique(np.asarray(y)).tolist()) == {0.0, np.float32(1 / np.float32(0.9))}
  assert float((y > 0).mean()) == pytest.approx(0.9, abs=2e-3)
  np.testing.assert_array_equal(y, apply(x, 0))
  assert not np.array_equal(y, apply(x, 1))
  # Adjacent elements (same threefry block) are uncorrelated.
  kept = np.asarray(y > 0, np.float32).reshape(-1, 4)
  assert abs(np.corrcoef(kept[:, 0], kept[:, 1])[0, 1]) < 0.01
  # Shapes the packed path does not take, and typed keys, give the same law.
  odd = dropout.keep_mask(jax.random.key(0), 0.25, (64, 197, 197))
  assert odd.shape == (64, 197, 197) and float(odd.mean()) == pytest.approx(0.75, abs=3e-3)
  np.testing.assert_array_equal(dropout.keep_mask(jax.random.key(5), 0.1, (8, 12)),
                                dropout.keep_mask(jax.random.PRNGKey(5), 0.1, (8, 12)))
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)


def test_bfloat16_forward_is_close_to_float32():
  f32 = models.create('ViT-Mu_4', num_classes=5)
  bf16 = models.create('ViT-Mu_4', num_classes=5, dtype='bfloat16')
  variables = _init(f32)
  variables['params']['head']['kernel'] = jax.random.normal(
      jax.random.PRNGKey(2), variables['params']['head']['kernel'].shape)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  out32, out16 = f32.apply(variables, images), bf16.apply(variables, images)
  # On CPU bfloat16 applies to the products' operands; what they feed is float32 (models.matmul).
  assert out16.dtype == jnp.float32
  assert jax.tree.leaves(_init(bf16))[0].dtype == jnp.float32  # params stay float32
  error = np.abs(np.asarray(out16, np.float32) - out32).max()
  assert error < 0.03 * np.abs(out32).max()  # bf16 keeps ~3 significant digits


def test_dropout_is_active_only_in_training():
  model = models.create('ViT-Mu_4', num_classes=5, dropout_rate=0.5, attention_dropout_rate=0.5)
  variables = _init(model)
  variables['params']['head']['kernel'] += 1.
  images = jnp.ones((2, 32, 32, 3))
  np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))
  rngs = lambda s: {'dropout': jax.random.PRNGKey(s)}
  a = model.apply(variables, images, train=True, rngs=rngs(0))
  b = model.apply(variables, images, train=True, rngs=rngs(1))
  assert not np.allclose(a, b)


def test_forward_flops_agree_with_xla_cost_analysis():
  # The embedded default last: its 28 px grey images pass a /8 stem that pads to a 4x4 map.
  root_only = dict(resnet=dict(num_layers=()), patch_size=2)  # Its 64 channels were taken as 128.
  for name, kwargs, size, channels in [
      ('ViT-Mu_4', {}, 32, 3), ('ViT-Mu_4', dict(classifier='map'), 32, 3),
      ('ViT-Mu_4', root_only, 32, 3),
      ('R14+ViT-Mu_8', {}, 32, 3), ('R8+ViT-Mu_8', {}, 32, 3), ('R8+ViT-Mu_8', {}, 28, 1)]:
    model = models.create(name, num_classes=10, **kwargs)
    images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    # The lowered module's count, the model's own ops (compiled, fusions add ~1%: 3x the time).
    xla = jax.jit(model.apply).lower(variables, images).cost_analysis()['flops']
    # XLA also counts the elementwise work (norms, softmax, GELU), a few percent on top.
    assert 0.9 * xla <= forward_flops(model, size, size, channels) <= xla


def test_flops_of_vit_b16_match_the_usual_figure():
  # ViT-B/16 at 224 px is quoted as 17.6 GFLOPs (multiply-adds x 2 ~ 35 GFLOP).
  model = models.create('ViT-B_16', num_classes=1000)
  assert forward_flops(model, 224, 224) / 2e9 == pytest.approx(17.6, rel=0.01)


@pytest.mark.parametrize('call,message', [
    (lambda: models.create('ViT-Q_16'), 'unknown model'),
    (lambda: models.create('ViT-B16'), "did you mean 'ViT-B_16'"),
    (lambda: models.create('S/16'), "did you mean 'ViT-S_16'"),  # big_vision's variant.
    (lambda: models.create('vit_base_patch32_384'), "did you mean 'ViT-B_32'"),  # timm's.
    (lambda: models.create('deit_small_patch16_224.fb_in1k'), "did you mean 'ViT-S_16'"),
    # timm's variant of 16 heads, not ViT-B_16's 12: no hint to the wrong model.
    (lambda: models.create('vit_base_patch16_gap_224'), r"unknown model '[\w]+': known"),
    (lambda: models.create('ViT-Mu_4', num_heads=3), 'not divisible by num_heads'),
    (lambda: models.create('ViT-Mu_4', classifier='cls'), 'classifier'),
    (lambda: models.create('ViT-Mu_4', depth=3), 'unknown model option'),
    (lambda: _init(models.create('ViT-Mu_4'), shape=(1, 30, 30, 3)), 'does not divide'),
])
def test_bad_input_gives_one_line_error(call, message):
  with pytest.raises(ConfigError, match=message) as info:
    call()
  assert '\n' not in str(info.value)


def test_names_lists_the_released_variants():
  assert {'ViT-Ti_16', 'ViT-B_16', 'ViT-H_14', 'R50+ViT-B_16'} <= set(models.names())
  for name in models.names():
    models.create(name)


@pytest.mark.parametrize('representation_size', [None, 16])
def test_intermediates_with_and_without_a_pre_logits_layer(representation_size):
  """The analyses run the forward with 'intermediates' mutable; with a pre-logits layer (the
  paper's ImageNet-21k models) the sown features once clashed with the layer's name."""
  model = models.create('ViT-Mu_4', num_classes=5, representation_size=representation_size)
  variables = _init(model)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  logits, inter = model.apply(variables, images, mutable='intermediates')
  features, = inter['intermediates']['pre_logit_features']
  head = variables['params']['head']
  np.testing.assert_allclose(logits, features @ head['kernel'] + head['bias'], atol=1e-5)
  assert features.shape == (2, representation_size or 64)  # ViT-Mu's width: 64
  assert 'attention' in inter['intermediates']['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_1']
