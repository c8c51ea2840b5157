"""The train state: everything a checkpoint must hold to resume bit-exactly.

The data position is `step` (the input stream is a pure function of seed, step and the
process count: resuming on another mesh or device count is exact, on another number of hosts
the example order changes) and the dropout key is derived from the seed and step, so params,
optimizer state and step suffice.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """A pytree, so that jit, shardings and Orbax take it whole."""
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, ...]) -> TrainState:
  """A fresh state (under `jit` with out_shardings it is born sharded)."""
  params = model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))
