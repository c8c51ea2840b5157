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
_WHERE = "(--config.mesh; plan's --mesh)"  # Where a mesh error's fix goes.

# Logical axes of each parameter, by the path's ending (released layout). A scanned model's
# blocks get a leading 'layers' axis; anything unlisted is replicated.
# Attention and MLP blocks match in the encoder and in the MAP head alike.
PARAM_AXES = (
    (r'(query|key|value)/kernel$', ('embed', 'heads', 'kv')),
    (r'(query|key|value)/bias$', ('heads', 'kv')),
    (r'MultiHeadDotProductAttention_\d+/out/kernel$', ('heads', 'kv', 'embed')),
    (r'MlpBlock_\d+/Dense_0/kernel$', ('embed', 'mlp')),
    (r'MlpBlock_\d+/Dense_0/bias$', ('mlp',)),
    (r'MlpBlock_\d+/Dense_1/kernel$', ('mlp', 'embed')),
    (r'(^|/)embedding/kernel$', (None, None, None, 'embed')),
    (r'(^|/)conv(_root|_proj|\d)/kernel$', (None, None, None, 'channels')),  # Hybrid stem.
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
    ('channels', 'fsdp'),
    ('kv', None),
    ('length', None),
    ('classes', None),
    ('layers', None),
)


def parse_mesh(spec: Any) -> dict[str, int]:
  """`data:-1,fsdp:2` or a mapping -> {axis: size}; missing axes are 1, one -1 fills."""
  if isinstance(spec, str):
    if not spec.strip():
      raise ConfigError('mesh is empty: give axis sizes like data:-1,fsdp:2,tensor:1 '
                        f'(data:-1 is pure data parallel) {_WHERE}')
    try:
      pairs = [(name.strip(), int(size)) for name, size in
               (item.split(':') for item in spec.split(',') if item)]
    except ValueError:
      raise ConfigError(f'mesh {spec!r} is not of the form data:-1,fsdp:2,tensor:1 '
                        f'{_WHERE}') from None
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
      raise ConfigError(f'mesh {spec!r} names {", ".join(repeated)} twice: give each axis once '
                        f'{_WHERE}')
    spec = dict(pairs)
  sizes = dict(spec or {})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f'unknown mesh axes {sorted(unknown)}: use {", ".join(MESH_AXES)} '
                      f'{_WHERE}')
  return {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}


def resolve_mesh_shape(spec: Any, num_devices: int) -> dict[str, int]:
  """Axis sizes for `num_devices`, the -1 axis filled; a ConfigError if they do not fit."""
  sizes = parse_mesh(spec)
  text = ','.join(f'{axis}:{size}' for axis, size in sizes.items())
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ConfigError(f'mesh {text}: axis sizes must be positive, or -1 for the one that fills '
                      f'{_WHERE}')
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f'mesh {text}: only one axis may be -1 (fill) {_WHERE}')
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if fill:
    if num_devices % fixed:
      raise ConfigError(f'mesh {text} does not divide the {_devices(num_devices)}: make the '
                        f'product of the fixed axes ({fixed}) a divisor of {num_devices} '
                        f'{_WHERE}')
    sizes[fill[0]] = num_devices // fixed
  needed = int(np.prod(list(sizes.values())))
  if needed != num_devices:
    raise ConfigError(f'mesh {text} needs {_devices(needed)} but there '
                      f'{"is" if num_devices == 1 else "are"} {num_devices}: set one axis to -1 '
                      f'to fill {_WHERE}')
  return sizes


def _devices(count: int) -> str:
  return f'{count} device' + ('' if count == 1 else 's')


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
  """How many slices the batch is cut into (data x fsdp)."""
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


def _devices_along(names: Any, mesh: Mesh) -> int:
  """How many devices one mesh axis name, a tuple of them, or None spans."""
  group = (names,) if isinstance(names, str) else tuple(names or ())
  return int(np.prod([mesh.shape[n] for n in group]))


def _mesh_axes(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules) -> list:
  """Per dim: (mesh axes the rules give it, whether they divide it)."""
  return [(names, size % _devices_along(names, mesh) == 0)
          for size, names in zip(shape, nn.logical_to_mesh_axes(axes, rules))]


def _spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  """Mesh axes per dim; a dim that the mesh axes do not divide stays replicated."""
  return P(*(names if divides else None for names, divides in _mesh_axes(axes, shape, mesh,
                                                                          rules)))


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """('/'-joined path, leaf) pairs: the names PARAM_AXES patterns match."""
  return [('/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for params or anything shaped like them (optimizer state, train state)."""
  leaves = [NamedSharding(mesh, _spec(logical_axes(name, len(leaf.shape)), leaf.shape, mesh,
                                      LOGICAL_RULES))
            for name, leaf in _named_leaves(abstract_tree)]
  return jax.tree.unflatten(jax.tree.structure(abstract_tree), leaves)


def unsplit_note(abstract_params: Any, mesh: Mesh) -> Optional[str]:
  """Which params a rule means to split but the mesh cannot (fsdp:512 over 768-wide
  embeddings, tensor:32 over 16 heads): they stay whole on every device, silently costing the
  memory the mesh was chosen to save. None when every split happens."""
  unsplit: dict[tuple, list] = {}
  for name, leaf in _named_leaves(abstract_params):
    axes = logical_axes(name, len(leaf.shape))
    for axis, size, (names, divides) in zip(axes, leaf.shape,
                                            _mesh_axes(axes, leaf.shape, mesh, LOGICAL_RULES)):
      if names and not divides:
        unsplit.setdefault((axis, names, size), []).append(leaf.size * leaf.dtype.itemsize)
  if not unsplit:
    return None
  parts = [f'{axis} ({size}) over {names}={_devices_along(names, mesh)} in {len(sizes)} '
           f'arrays ({sum(sizes) / 2**20:.1f} MiB)'
           for (axis, names, size), sizes in unsplit.items()]
  return (f'not split, kept whole on every device: {"; ".join(parts)}: pick mesh sizes that '
          'divide these dims')
