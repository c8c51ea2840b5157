"""Host batches -> global jax.Arrays sharded over the mesh's data axes.

Each process holds only its slice of the global batch (see input_pipeline);
`to_global` stitches the slices into one array whose leading dim is split over
`data_axes`, and `prefetch_to_mesh` does that a few batches ahead so the
host-to-device copy overlaps the train step.
"""
import collections
import itertools
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ('data', 'fsdp')


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = DATA_AXES) -> NamedSharding:
  """Leading dim over those of `data_axes` the mesh has; other dims replicated."""
  return NamedSharding(mesh, P(tuple(a for a in data_axes if a in mesh.axis_names)))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh,
              data_axes: Sequence[str] = DATA_AXES) -> dict[str, jax.Array]:
  """This process's slice of every leaf -> the global batch as jax.Arrays."""
  sharding = batch_sharding(mesh, data_axes)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_mesh(iterator: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2, data_axes: Sequence[str] = DATA_AXES,
                     ) -> Iterator[dict[str, jax.Array]]:
  """Yields `to_global` batches, keeping `size` transfers in flight ahead."""
  iterator = iter(iterator)
  queue = collections.deque(
      to_global(b, mesh, data_axes) for b in itertools.islice(iterator, size))
  while queue:
    yield queue.popleft()
    queue.extend(to_global(b, mesh, data_axes)
                 for b in itertools.islice(iterator, 1))
