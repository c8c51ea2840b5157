"""Convert params between the scanned (`encoderblock`, stacked on axis 0) and unrolled
(`encoderblock_{i}`) layouts, so a checkpoint from either loads into a model of either."""
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def is_scanned(params: Params) -> bool:
  """Whether the blocks are one stacked `encoderblock` (scan) rather than one per layer."""
  return 'encoderblock' in params.get('Transformer', {})


def scanned_to_unrolled(params: Params) -> Params:
  if not is_scanned(params):
    return params
  transformer = dict(params['Transformer'])
  stacked = transformer.pop('encoderblock')
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    transformer[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, 'Transformer': transformer}


def unrolled_to_scanned(params: Params) -> Params:
  if is_scanned(params):
    return params
  transformer = dict(params['Transformer'])
  num_layers = sum(k.startswith('encoderblock_') for k in transformer)
  blocks = [transformer.pop(f'encoderblock_{i}') for i in range(num_layers)]
  transformer['encoderblock'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, 'Transformer': transformer}


def to_layout(params: Params, scanned: bool) -> Params:
  """`params` in the layout of a model built with scan=`scanned`, whichever it was saved in."""
  return unrolled_to_scanned(params) if scanned else scanned_to_unrolled(params)
