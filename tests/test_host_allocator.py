"""The CPU host allocator setting: freed XLA buffers are reused instead of faulted in again."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from vit_jax import host_allocator

# A fresh interpreter (the setting must come before jax starts threads) that runs a jitted
# function with a 128 MiB output 48 times, deleting each output (its buffer is freed at once,
# not whenever XLA gets to it), and reports the median minor page faults of the last 16 calls:
# a buffer that large comes from mmap unless the setting applies. With it, the heap still grows
# on some of the first calls (up to the 6th alone, up to the 18th with the 2 cores oversubscribed
# 2.5x; CI once failed on calls 13-24 of an earlier probe) before every call reuses it.
_PROBE = r'''
import json, resource, statistics
import vit_jax
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2)
x = jnp.ones((8192, 4096), jnp.float32)
faults = []
for _ in range(48):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  double(x).block_until_ready().delete()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'tuned': vit_jax.HOST_ALLOCATOR_TUNED,
                  'huge_page_heap_bytes': vit_jax.HUGE_PAGE_HEAP_BYTES,
                  'faults_per_call': statistics.median(faults[32:]),
                  'huge_pages_bytes': vit_jax.host_allocator.huge_pages_bytes()}))
'''


def _probe(**env) -> dict:
  environ = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  result = subprocess.run([sys.executable, '-c', _PROBE], env=environ | env, text=True,
                          capture_output=True, timeout=300, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
  kept, system = _probe(), _probe(VIT_JAX_HOST_ALLOCATOR='system')
  assert kept['tuned'] and not system['tuned']
  # Measured: ~32,800 faults per call with the system setting (all 128 MiB, in 4 KiB pages),
  # 0 with the setting.
  assert system['faults_per_call'] > 20_000
  assert kept['faults_per_call'] < 1_000


@pytest.mark.skipif('[madvise]' not in host_allocator._read(
    '/sys/kernel/mm/transparent_hugepage/enabled'), reason='transparent huge pages on request only')
def test_buffers_come_in_huge_pages_unless_switched_off():
  kept, small = _probe(), _probe(VIT_JAX_HOST_ALLOCATOR='small_pages')
  assert kept['tuned'] and small['tuned']
  assert kept['huge_page_heap_bytes'] > 2**30 and small['huge_page_heap_bytes'] == 0
  # At least the 128 MiB input and the reused 128 MiB output in 2 MiB pages; measured: 1.1 GB
  # with the setting (the heap's other blocks too), 0 without.
  assert kept['huge_pages_bytes'] >= 200 * 2**20
  assert small['huge_pages_bytes'] < 32 * 2**20
  assert kept['faults_per_call'] < 1_000


def test_left_alone_where_an_accelerator_is_expected_or_it_is_switched_off(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert host_allocator.accelerator_expected()
  assert not host_allocator.keep_freed_memory()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not host_allocator.accelerator_expected()
  monkeypatch.setenv('VIT_JAX_HOST_ALLOCATOR', 'system')
  assert not host_allocator.keep_freed_memory()
  assert host_allocator.advise_huge_pages() == 0
  monkeypatch.setenv('VIT_JAX_HOST_ALLOCATOR', 'small_pages')
  assert host_allocator.advise_huge_pages() == 0


def test_an_unknown_setting_warns_and_keeps(monkeypatch):
  monkeypatch.setenv('VIT_JAX_HOST_ALLOCATOR', 'small-pages')
  with pytest.warns(UserWarning, match='not one of keep, small_pages, system'):
    assert host_allocator._setting() == 'keep'


def _fake_glibc(calls: list):
  """A glibc stand-in that records the tuning calls instead of changing this process's heap:
  malloc hands out an address 1 GiB below the top of the heap."""
  heap_top = 1 << 40

  def record(name, result):
    return lambda *args: (calls.append((name, *args)), result)[1]

  return types.SimpleNamespace(
      mallopt=record('mallopt', 1), malloc=record('malloc', heap_top - 2**30),
      sbrk=record('sbrk', heap_top), free=record('free', None), madvise=record('madvise', 0))


def test_an_installed_libtpu_means_an_accelerator_and_the_allocator_is_left_alone(monkeypatch):
  """A TPU VM has libtpu but may have no jax_plugins (and no JAX_PLATFORMS)."""
  find_spec = importlib.util.find_spec
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('VIT_JAX_HOST_ALLOCATOR', raising=False)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
      find_spec('json') if name == 'libtpu' else None if name == 'jax_plugins'
      else find_spec(name, *a)))
  calls = []
  monkeypatch.setattr(host_allocator, '_glibc', lambda: _fake_glibc(calls))
  assert host_allocator.accelerator_expected()
  assert not host_allocator.keep_freed_memory()
  assert calls == []


def test_strict_overcommit_reserves_no_huge_page_heap(monkeypatch):
  """Under vm.overcommit_memory=2 the reserved half of memory would count against the commit
  limit (later allocations fail); with THP on request and overcommit allowed, it is reserved."""
  monkeypatch.delenv('VIT_JAX_HOST_ALLOCATOR', raising=False)
  calls = []
  monkeypatch.setattr(host_allocator, '_glibc', lambda: _fake_glibc(calls))
  files = {'/sys/kernel/mm/transparent_hugepage/enabled': 'always [madvise] never\n',
           '/proc/sys/vm/overcommit_memory': '2\n'}
  monkeypatch.setattr(host_allocator, '_read', files.get)
  assert host_allocator.advise_huge_pages() == 0
  assert calls == []
  files['/proc/sys/vm/overcommit_memory'] = '0\n'  # The usual heuristic overcommit.
  assert host_allocator.advise_huge_pages() == 2**30
  assert ('madvise', (1 << 40) - 2**30, 2**30, 14) in calls  # MADV_HUGEPAGE
