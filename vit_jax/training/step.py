"""The jit-able train and eval steps: pure functions of (state, batch)."""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax.training.state import TrainState

LOSSES = ('softmax_xent', 'sigmoid_xent')


def _targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """Integer labels -> one-hot; soft labels (mixup, over the dataset's classes) padded to a
  wider head (a recipe's pinned num_classes). Then label smoothing."""
  if labels.ndim == 2:
    targets = jnp.pad(labels, ((0, 0), (0, num_classes - labels.shape[-1])))
  else:
    targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return targets


def loss_fn(logits: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
  """Per-example loss: softmax cross-entropy, or the sigmoid one of the ImageNet-21k recipe."""
  logits = logits.astype(jnp.float32)
  if loss == 'sigmoid_xent':
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
  return optax.softmax_cross_entropy(logits, targets)


def polyak_warmup(updates: Any) -> Any:
  """The cap on the average's decay after `updates` updates (from 1): TensorFlow's
  ExponentialMovingAverage applies it when given num_updates, so that the average of a run
  shorter than ~9 / (1 - decay) steps does not stay near its initial params."""
  return (1 + updates) / (10 + updates)


def polyak_decay_after(polyak_decay: float, updates: jax.Array) -> jax.Array:
  """The decay of the average at update `updates`: `polyak_decay`, warmed up."""
  return jnp.minimum(polyak_decay, polyak_warmup(updates))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int, loss: str = 'softmax_xent',
                    label_smoothing: float = 0.0, accum_steps: int = 1, seed: int = 0,
                    polyak_decay: float = 0.0
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One optimizer update. With `accum_steps` > 1 the batch is split into micro-batches whose
  gradients are averaged (equal to the big batch's gradient), trading memory for time. With
  `polyak_decay` > 0 (an `AveragedTrainState`), the average moves towards the updated params by
  1 - `polyak_decay_after`."""
  base_rng = jax.random.PRNGKey(seed)

  def micro_grads(params, images, labels, rng):
    def objective(params):
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
      with jax.named_scope('loss'):  # Profiles name these ops 'loss/...' beside the model's.
        targets = _targets(labels, num_classes, label_smoothing)
        return jnp.mean(loss_fn(logits, targets, loss))
    return jax.value_and_grad(objective)(params)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(base_rng, state.step)
    if accum_steps == 1:
      loss_value, grads = micro_grads(state.params, batch['image'], batch['label'], rng)
    else:
      # Micro-batch i takes examples i, i + accum_steps, ...: a slice of every device's shard,
      # so no micro-batch moves between data-parallel devices (contiguous chunks would).
      split = lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1)
      micro = jax.tree.map(split, batch)

      def accumulate(carry, inputs):
        i, mb = inputs
        value, grads = micro_grads(state.params, mb['image'], mb['label'],
                                   jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (value, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss_value, grads), _ = jax.lax.scan(accumulate, zeros,
                                            (jnp.arange(accum_steps), micro))
      loss_value, grads = jax.tree.map(lambda x: x / accum_steps, (loss_value, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if polyak_decay:
      decay = polyak_decay_after(polyak_decay, state.step + 1)
      state = state.replace(averaged_params=optax.incremental_update(
          params, state.averaged_params, 1 - decay))
    metrics = {'loss': loss_value, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module, *, num_classes: int,
                   loss: str = 'softmax_xent') -> Callable[[Any, dict], dict]:
  """Sums over the real (mask == 1) examples of a padded batch; the host adds batches up."""

  def eval_step(params: Any, batch: dict) -> dict:
    logits = model.apply({'params': params}, batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    labels = batch['label']
    losses = loss_fn(logits, _targets(labels, num_classes, 0.0), loss)
    sums = {'loss': jnp.sum(losses * mask), 'count': jnp.sum(mask),
            'accuracy': jnp.sum((jnp.argmax(logits, -1) == labels) * mask)}
    if num_classes > 5:
      top5 = jax.lax.top_k(logits, 5)[1]
      sums['accuracy_top5'] = jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask)
    return sums

  return eval_step
