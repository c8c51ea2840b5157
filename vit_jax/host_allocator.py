"""Keeps freed host memory in the process when XLA runs on the CPU.

XLA's CPU runtime allocates each step's temporary buffer afresh (850 MB for the ViT-Ti/16 train
step at batch 16). glibc serves an allocation that large from worker threads with mmap and
unmaps it on free, so every step faulted all of it in again: 216k page faults, ~0.4 CPU-s of
kernel time and ~13% of the Ti step's wall time on the 2-core machine (docs/performance.md).
One malloc arena that never unmaps or trims lets the next step reuse the same pages.

This must run before threads allocate (arenas are per thread), so `vit_jax/__init__.py` calls
it first thing; a process that imported jax or tensorflow earlier gets it only partly. The
price is that the process keeps its peak heap instead of returning it to the system. Hosts
with an accelerator plugin are left alone (their large buffers live on the device, and the
input pipeline's threads keep their own arenas), as is any process with
`VIT_JAX_HOST_ALLOCATOR=system`.
"""
import ctypes
import importlib.util
import os
import pkgutil

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>.
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _accelerator_expected() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return True
  plugins = importlib.util.find_spec('jax_plugins')
  return bool(plugins and any(pkgutil.iter_modules(plugins.submodule_search_locations)))


def keep_freed_memory() -> bool:
  """One glibc arena, no mmap, no trimming, on CPU-only hosts; True where it was applied."""
  if os.environ.get('VIT_JAX_HOST_ALLOCATOR', 'keep') == 'system' or _accelerator_expected():
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to tune.
    return False
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
