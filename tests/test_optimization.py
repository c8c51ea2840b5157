"""The objective and the update, against formulas written out here: losses, label smoothing, the
train step's loss, gradient and SGD update, gradient clipping, weight decay, the schedules, and
the eval step's sums over a padded batch. A linear "model" keeps every number checkable by hand.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax.training import optimizers
from vit_jax.training import step as step_lib
from vit_jax.training.state import TrainState


class LinearModel:
  """logits = images @ params['w']: the one method of a flax module the steps call."""

  def apply(self, variables, images, train=False, rngs=None):
    del train, rngs
    return images @ variables['params']['w']


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      optimizer='sgd', momentum=0.9, base_lr=0.1, warmup_steps=0, total_steps=100,
      decay_type='constant', weight_decay=0.0, grad_norm_clip=0.0))
  config.update(overrides)
  return config


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


LOGITS = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
ONE_HOT = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)


def test_softmax_and_sigmoid_losses_match_their_formulas():
  softmax = step_lib.loss_fn(jnp.asarray(LOGITS), jnp.asarray(ONE_HOT), 'softmax_xent')
  np.testing.assert_allclose(softmax, -(ONE_HOT * _log_softmax(LOGITS)).sum(-1), rtol=1e-6)
  sigmoid = step_lib.loss_fn(jnp.asarray(LOGITS), jnp.asarray(ONE_HOT), 'sigmoid_xent')
  p = 1 / (1 + np.exp(-LOGITS))
  expected = -(ONE_HOT * np.log(p) + (1 - ONE_HOT) * np.log(1 - p)).sum(-1)
  np.testing.assert_allclose(sigmoid, expected, rtol=1e-5)
  assert not np.allclose(softmax, sigmoid)


def test_label_smoothing_spreads_alpha_over_the_classes():
  targets = step_lib._targets  # pylint: disable=protected-access
  np.testing.assert_allclose(targets(jnp.array([2]), 10, 0.1)[0],
                             [0.01] * 2 + [0.91] + [0.01] * 7, rtol=1e-6)
  soft = jnp.array([[0.25, 0.75]])  # Mixup's soft labels pass through unsmoothed.
  np.testing.assert_array_equal(targets(soft, 2, 0.0), soft)
  # Smoothed too (0.9 t + 0.1 / 2), and padded to a head wider than the dataset's classes
  # (mixup with a recipe's pinned num_classes was a shape error at the first step).
  np.testing.assert_allclose(targets(soft, 2, 0.1), [[0.275, 0.725]], rtol=1e-6)
  np.testing.assert_array_equal(targets(soft, 4, 0.0), [[0.25, 0.75, 0.0, 0.0]])


def _one_step(config, images, labels, w):
  schedule = optimizers.learning_rate_schedule(config)
  tx = optimizers.make_optimizer(config, schedule)
  params = {'w': jnp.asarray(w)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params))
  train_step = step_lib.make_train_step(LinearModel(), tx, schedule, num_classes=3)
  new_state, metrics = jax.jit(train_step)(
      state, {'image': jnp.asarray(images), 'label': jnp.asarray(labels)})
  return np.asarray(new_state.params['w']), jax.device_get(metrics)


IMAGES = np.array([[1.0, 0.0], [0.5, 2.0]], np.float32)
LABELS = np.array([0, 2], np.int32)
W = np.array([[2.0, -1.0, 0.5], [-0.5, 1.75, -1.125]], np.float32)  # IMAGES @ W == LOGITS


def _gradient():
  """d/dW of the mean softmax cross-entropy: images^T (softmax - one_hot) / batch."""
  return IMAGES.T @ (np.exp(_log_softmax(IMAGES @ W)) - ONE_HOT) / len(IMAGES)


def test_train_step_reports_the_mean_loss_and_takes_the_sgd_step():
  np.testing.assert_allclose(IMAGES @ W, LOGITS, rtol=1e-6)
  new_w, metrics = _one_step(_config(), IMAGES, LABELS, W)
  loss = -(ONE_HOT * _log_softmax(LOGITS)).sum(-1).mean()
  assert metrics['loss'] == pytest.approx(loss, rel=1e-6)
  assert metrics['grad_norm'] == pytest.approx(np.linalg.norm(_gradient()), rel=1e-5)
  assert metrics['learning_rate'] == pytest.approx(0.1)
  # Momentum's trace starts at zero: the first update is -lr * gradient.
  np.testing.assert_allclose(new_w, W - 0.1 * _gradient(), rtol=1e-5, atol=1e-7)


class DropoutModel:
  """logits = (images * a dropout mask of rate 0.5, rescaled) @ params['w']."""

  def apply(self, variables, images, train=False, rngs=None):
    keep = jax.random.bernoulli(rngs['dropout'], 0.5, images.shape) if train else 0.5
    return images * keep / 0.5 @ variables['params']['w']


def test_each_step_draws_its_own_dropout_masks_and_a_rerun_the_same():
  # A mask that repeats every step is not dropout; one that differs between reruns of a step
  # breaks bit-exact resume.
  config = _config(base_lr=1e-9)  # The params barely move: the loss changes with the masks.
  schedule = optimizers.learning_rate_schedule(config)
  tx = optimizers.make_optimizer(config, schedule)
  train_step = jax.jit(step_lib.make_train_step(DropoutModel(), tx, schedule, num_classes=3))
  params = {'w': jnp.asarray(W)}
  images = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
  batch = {'image': images, 'label': jnp.zeros(64, jnp.int32)}

  def loss_at(step):
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                       opt_state=tx.init(params))
    return float(train_step(state, batch)[1]['loss'])

  losses = [loss_at(step) for step in (0, 1, 2, 1)]
  assert len(set(losses[:3])) == 3 and losses[3] == losses[1], losses


def test_gradient_clipping_scales_the_update_to_the_clip_norm():
  norm = np.linalg.norm(_gradient())
  clip = norm / 4
  new_w, metrics = _one_step(_config(grad_norm_clip=float(clip)), IMAGES, LABELS, W)
  assert metrics['grad_norm'] == pytest.approx(norm, rel=1e-5)  # Reported before clipping.
  np.testing.assert_allclose((W - new_w) / 0.1, _gradient() / 4, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('optimizer', ['adamw', 'sgd'])
def test_weight_decay_is_lr_times_decay_on_kernels_only(optimizer):
  """Not biases, norms, the class token or the position embeddings (big_vision's, timm's)."""
  config = _config(optimizer=optimizer, weight_decay=0.5, base_lr=0.1)
  params = {'cls': np.ones((1, 1, 4)), 'embedding': {'kernel': np.ones((2, 2, 1, 4)),
                                                     'bias': np.ones(4)},
            'Transformer': {'posembed_input': {'pos_embedding': np.ones((1, 5, 4))},
                            'encoder_norm': {'scale': np.ones(4)}},
            'head': {'kernel': np.full((4, 3), 2.0), 'bias': np.ones(3)}}
  tx = optimizers.make_optimizer(config, optimizers.learning_rate_schedule(config))
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  flat = {'/'.join(k.key for k in path): np.asarray(u)
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  np.testing.assert_allclose(flat.pop('embedding/kernel'), -0.1 * 0.5 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(flat.pop('head/kernel'), -0.1 * 0.5 * 2.0, rtol=1e-6)
  assert sorted(flat) == ['Transformer/encoder_norm/scale',
                          'Transformer/posembed_input/pos_embedding', 'cls', 'embedding/bias',
                          'head/bias']
  assert not any(np.any(u) for u in flat.values())


def test_schedules_warm_up_linearly_then_decay_as_named():
  cosine = optimizers.learning_rate_schedule(
      _config(base_lr=1.0, warmup_steps=10, total_steps=110, decay_type='cosine'))
  assert [float(cosine(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
  # A quarter into the decay: cosine's 0.5 (1 + cos(pi / 4)), not linear's 0.75.
  assert float(cosine(35)) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-7)
  linear = optimizers.learning_rate_schedule(
      _config(base_lr=1.0, warmup_steps=10, total_steps=110, decay_type='linear',
              lr_end_fraction=0.1))
  assert [float(linear(s)) for s in (35, 110)] == pytest.approx([0.775, 0.1], rel=1e-5)
  cosine_to_a_tenth = optimizers.learning_rate_schedule(
      _config(base_lr=1.0, warmup_steps=10, total_steps=110, decay_type='cosine',
              lr_end_fraction=0.1))
  assert [float(cosine_to_a_tenth(s)) for s in (60, 110)] == pytest.approx([0.55, 0.1], rel=1e-5)


def test_eval_step_sums_only_the_real_examples_of_a_padded_batch():
  # Identity weights: each image row is its logits. Examples 0-2 are real, 3-4 padding.
  images = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0, 5, 4, 3, 2],
                     [9, 0, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0]], np.float32)
  labels = np.array([0, 0, 3, 0, 0], np.int32)
  mask = np.array([1, 1, 1, 0, 0], np.int32)
  eval_step = step_lib.make_eval_step(LinearModel(), num_classes=6)
  sums = jax.device_get(jax.jit(eval_step)(
      {'w': jnp.eye(6)}, {'image': images, 'label': labels, 'mask': mask}))
  # Top-1: right for example 0 only; top-5 misses only example 1 (label 0 is its lowest logit);
  # the padding would be right in both.
  assert (sums['count'], sums['accuracy'], sums['accuracy_top5']) == (3, 1, 2)
  losses = -_log_softmax(images[:3])[np.arange(3), labels[:3]]
  assert sums['loss'] == pytest.approx(losses.sum(), rel=1e-6)
