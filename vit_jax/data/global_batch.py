"""Host batches -> global jax.Arrays sharded over the mesh's batch axes.

Each process holds only its slice of the global batch (see input_pipeline); `to_global` stitches
the slices into one array whose leading dim is split over `sharding.BATCH_AXES`, and
`prefetch_to_mesh` does that a few batches ahead so the host-to-device copy overlaps the step.
"""
import collections
import itertools
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from vit_jax import sharding


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of every leaf -> the global batch as jax.Arrays."""
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)


def prefetch_to_mesh(local_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Yields `to_global` batches, keeping `size` transfers in flight ahead."""
  local_batches = iter(local_batches)
  queue = collections.deque(to_global(b, mesh) for b in itertools.islice(local_batches, size))
  while queue:
    yield queue.popleft()
    queue.extend(to_global(b, mesh) for b in itertools.islice(local_batches, 1))
