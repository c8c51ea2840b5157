"""The train state: everything a checkpoint must hold to resume bit-exactly.

The data position is `step` (the input stream is a pure function of seed, step and the
process count: resuming on another mesh or device count is exact, on another number of hosts
the example order changes) and the dropout key is derived from the seed and step, so params,
optimizer state and step suffice; with Polyak averaging, also the average.
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


class AveragedTrainState(TrainState):
  """With the Polyak average of the params (config.polyak_decay > 0), which evaluation and every
  reader of the checkpoint use. A class of its own, so that a run without averaging keeps the
  checkpoint layout of one (its old workdirs resume as they are)."""
  averaged_params: Any


def fresh_state(params: Any, tx: optax.GradientTransformation,
                averaged: bool = False) -> TrainState:
  """Step 0 from `params`: a new optimizer state and, if `averaged`, an average started at them."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return with_average(state) if averaged else state


def with_average(state: TrainState) -> AveragedTrainState:
  """`state` with a Polyak average started at its params (at step 0, or where a resumed run
  turns averaging on)."""
  return AveragedTrainState(**vars(state), averaged_params=state.params)


def without_average(state: TrainState) -> TrainState:
  """The plain train state (of a state or of its abstract shapes)."""
  return TrainState(step=state.step, params=state.params, opt_state=state.opt_state)


def eval_params(state: TrainState) -> Any:
  """The params to evaluate and save for readers: the average when the run keeps one."""
  return getattr(state, 'averaged_params', state.params)


def init_params(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> Any:
  """Fresh params (under `jit` with out_shardings they are born sharded)."""
  return model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))['params']


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape: tuple[int, ...], averaged: bool = False) -> TrainState:
  """A fresh state (under `jit` with out_shardings it is born sharded)."""
  return fresh_state(init_params(model, rng, image_shape), tx, averaged)
