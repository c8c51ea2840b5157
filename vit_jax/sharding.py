"""The device mesh, and the rules that place params, optimizer state and activations on it.

Parallelism is data, not code: pure data parallel, FSDP (ZeRO-3: params and optimizer state
sharded over `fsdp`, gathered per layer by XLA) and tensor parallel (Megatron-style split of
heads and MLP over `tensor`) are all the same model with a different mesh.
"""
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axes of each parameter, by the path's ending (released layout). A scanned model's
# blocks get a leading 'layers' axis; anything unlisted is replicated.
PARAM_AXES = (
    (r'(query|key|value)/kernel$', ('embed', 'heads', 'kv')),
    (r'(query|key|value)/bias$', ('heads', 'kv')),
    (r'MultiHeadDotProductAttention_1/out/kernel$', ('heads', 'kv', 'embed')),
    (r'MlpBlock_3/Dense_0/kernel$', ('embed', 'mlp')),
    (r'MlpBlock_3/Dense_0/bias$', ('mlp',)),
    (r'MlpBlock_3/Dense_1/kernel$', ('mlp', 'embed')),
    (r'(^|/)embedding/kernel$', (None, None, None, 'embed')),
    (r'pos_embedding$', (None, 'length', 'embed')),
    (r'(^|/)pre_logits/kernel$', ('embed', 'mlp')),
    (r'(^|/)head/kernel$', ('embed', 'classes')),
)

# Logical axis -> mesh axes, in priority order: a mesh axis already taken by an earlier rule is
# skipped for that array, so activations ('batch', 'length', 'embed') shard only the batch
# while params shard 'embed' over fsdp.
LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('kv', None),
    ('length', None),
    ('classes', None),
    ('layers', None),
)


def parse_mesh(spec: Any) -> dict[str, int]:
  """`data:-1,fsdp:2` or a mapping -> {axis: size}; missing axes are 1, one -1 fills."""
  if isinstance(spec, str):
    try:
      pairs = [item.split(':') for item in spec.split(',') if item]
      spec = {name.strip(): int(size) for name, size in pairs}
    except ValueError:
      raise ConfigError(f'mesh {spec!r} is not of the form data:-1,fsdp:2,tensor:1') from None
  sizes = dict(spec or {})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f'unknown mesh axes {sorted(unknown)}: use {", ".join(MESH_AXES)}')
  return {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}


def resolve_mesh_shape(spec: Any, num_devices: int) -> dict[str, int]:
  sizes = parse_mesh(spec)
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ConfigError(f'mesh {sizes}: axis sizes must be positive, or -1 for the one that fills')
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f'mesh {sizes}: only one axis may be -1 (fill)')
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if fill:
    if num_devices % fixed:
      raise ConfigError(f'mesh {sizes} does not divide the {num_devices} devices: make the '
                        f'product of the fixed axes ({fixed}) a divisor of {num_devices}')
    sizes[fill[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ConfigError(f'mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices but '
                      f'there are {num_devices}: set one axis to -1 to fill')
  return sizes


def make_mesh(spec: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over all (or the given) devices, laid out by `jax.make_mesh` for the topology."""
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(spec, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  # Auto axes: XLA's partitioner propagates the shardings we give at the edges.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_axes(path: str, ndim: int) -> tuple[Optional[str], ...]:
  """The logical axes of the param (or optimizer-state leaf) at `path`, '/'-joined."""
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path):
      if ndim == len(axes) + 1 and 'encoderblock/' in path:
        return ('layers',) + axes
      if ndim == len(axes):
        return axes
  return (None,) * ndim


def _spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  """Mesh axes per dim; a dim that the mesh axes do not divide stays replicated."""
  mesh_axes = nn.logical_to_mesh_axes(axes, rules)
  dims = []
  for size, names in zip(shape, mesh_axes):
    group = (names,) if isinstance(names, str) else tuple(names or ())
    dims.append(names if group and size % np.prod([mesh.shape[n] for n in group]) == 0
                else None)
  return P(*dims)


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for params or anything shaped like them (optimizer state, train state)."""

  def one(path, leaf):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
    axes = logical_axes(name, len(leaf.shape))
    return NamedSharding(mesh, _spec(axes, leaf.shape, mesh, LOGICAL_RULES))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)
