"""Keeps freed host memory in the process, in huge pages, when XLA runs on the CPU.

XLA's CPU runtime allocates each step's temporary buffer afresh (850 MB for the ViT-Ti/16 train
step at batch 16). glibc serves an allocation that large from worker threads with mmap and
unmaps it on free, so every step faulted all of it in again: 216k page faults, ~0.4 CPU-s of
kernel time and ~12% of the Ti step's wall time on the 2-core machine (docs/performance.md).
One malloc arena that never unmaps or trims lets the next step reuse the same pages.

Reused step after step, those pages are better large: a ViT-S/16 train step runs through ~1.7 GB
of buffers, 430k 4 KiB pages, far more than the TLB maps. Where the kernel gives transparent
huge pages on request (THP mode `madvise`, the usual default), the heap is then grown by half
the physical memory, untouched (address space, not memory), and advised MADV_HUGEPAGE, so the
buffers carved from it later are faulted in as 2 MiB pages: on the Intel Xeon ViT-S/16 train
1-11% faster, eval 8-20%, ViT-Ti/16 train 7-10%, the embedded default 8-9%; on the AMD Zen 4
the embedded default 7-28% faster, the 224 px train steps 3-6% slower with one device and level
with two (docs/performance.md). That is what
glibc does with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which must be set before the process
starts.

This must run before threads allocate (arenas are per thread), so `vit_jax/__init__.py` calls
it first thing; a process that imported jax or tensorflow earlier gets it only partly. The
price is that the process keeps its peak heap instead of returning it to the system. Hosts
with an accelerator plugin are left alone (their large buffers live on the device, and the
input pipeline's threads keep their own arenas), as is any process with
`VIT_JAX_HOST_ALLOCATOR=system`; `VIT_JAX_HOST_ALLOCATOR=small_pages` keeps freed memory in
4 KiB pages.
"""
import ctypes
import importlib.util
import os
import pkgutil
from typing import Optional
import warnings

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>.
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_MADV_HUGEPAGE = 14  # From <sys/mman.h>.
_SETTINGS = ('keep', 'small_pages', 'system')


def _setting() -> str:
  setting = os.environ.get('VIT_JAX_HOST_ALLOCATOR', 'keep')
  if setting not in _SETTINGS:
    warnings.warn(f'VIT_JAX_HOST_ALLOCATOR={setting!r} is not one of {", ".join(_SETTINGS)}; '
                  'using keep')
    return 'keep'
  return setting


def _glibc() -> Optional[ctypes.CDLL]:
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # Not glibc (macOS): nothing to tune.
    return None
  return libc if hasattr(libc, 'mallopt') else None  # musl has no mallopt.


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ''


def accelerator_expected() -> bool:
  """Whether jax will run on something other than the CPU, read before jax is imported."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return True
  plugins = importlib.util.find_spec('jax_plugins')
  return bool(plugins and any(pkgutil.iter_modules(plugins.submodule_search_locations)))


def keep_freed_memory() -> bool:
  """One glibc arena, no mmap, no trimming, on CPU-only hosts; True where it was applied."""
  libc = _glibc()
  if _setting() == 'system' or accelerator_expected() or libc is None:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def advise_huge_pages() -> int:
  """After `keep_freed_memory`, grows the heap untouched and advises it for transparent huge
  pages; the bytes advised, 0 where it was not done.

  Skipped where THP is not in `madvise` mode (`always` needs no advice, `never` takes none) and
  under strict overcommit (`vm.overcommit_memory=2`), where the reserved address space would
  count against the commit limit. Heap grown beyond the reservation gets 4 KiB pages.
  """
  libc = _glibc()
  if (_setting() != 'keep' or libc is None
      or '[madvise]' not in _read('/sys/kernel/mm/transparent_hugepage/enabled')
      or _read('/proc/sys/vm/overcommit_memory').strip() == '2'):
    return 0
  libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
  libc.malloc.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_ssize_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  # With mmap off this block comes from growing the heap; malloc touches only its header page,
  # and freed it joins the heap's top, never trimmed, for later allocations to be cut from.
  page = os.sysconf('SC_PAGE_SIZE')
  start = libc.malloc(os.sysconf('SC_PHYS_PAGES') * page // 2)
  if not start:
    return 0
  end = libc.sbrk(0)
  libc.free(start)
  low, high = -(-start // page) * page, end // page * page  # end < start: glibc used mmap.
  if high <= low or libc.madvise(low, high - low, _MADV_HUGEPAGE) != 0:
    return 0
  return high - low


def huge_pages_bytes() -> int:
  """Process memory now in transparent huge pages (Linux; 0 elsewhere)."""
  lines = _read('/proc/self/smaps_rollup').splitlines()
  return next((int(line.split()[1]) * 1024 for line in lines
               if line.startswith('AnonHugePages:')), 0)
