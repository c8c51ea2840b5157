"""Runs XLA on a CPU-only host as two devices instead of one.

One XLA:CPU device runs its ops one after another, each split across the cores, and whatever
does not split evenly leaves a core waiting. Two devices, each taking half of every batch on the
mesh's data axis, run two streams of ops side by side that fill each other's gaps. Measured on
a 2-core AMD Zen 4 (docs/performance.md, alternated runs): the ViT-S/16 train step
5-12% faster (75-79% of the measured matmul peak instead of 68-73%, the same CPU time per step
spread over busier cores), the embedded default 6-14%, the ViT-S/16 eval step 2-6%; on an Intel
Xeon the ViT-S/16 train step 1-7%, ViT-Ti/16's 13-17%, the default 8-12%, eval level. Four devices
on those two cores were 10% slower than two, so it is two whatever the core count; hosts with
more cores were not measured.

It sets XLA_FLAGS, which jax reads when its CPU backend starts, so it must run before the first
jax computation: `vit_jax/__init__.py` calls it. A device count the user chose
(`--xla_force_host_platform_device_count` in XLA_FLAGS, or JAX_NUM_CPU_DEVICES) is kept; set
either to 1 for a single device. Hosts with an accelerator and single-core hosts are left alone.
"""
import os
import re
from typing import Optional

from vit_jax import host_allocator

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
CPU_DEVICES = 2


def schedulable_cores() -> int:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def with_device_count(xla_flags: str, count: int) -> str:
  """`xla_flags` asking for `count` CPU devices, any count it gave replaced."""
  kept = re.sub(rf'{DEVICE_COUNT_FLAG}=\S*', '', xla_flags).strip()
  return f'{kept} {DEVICE_COUNT_FLAG}={count}'.strip()


def split_cpu() -> int:
  """Asks XLA for two CPU devices where that applies; the count set, 0 where left alone."""
  if (DEVICE_COUNT_FLAG in os.environ.get('XLA_FLAGS', '') or 'JAX_NUM_CPU_DEVICES' in os.environ
      or host_allocator.accelerator_expected() or schedulable_cores() < CPU_DEVICES):
    return 0
  os.environ['XLA_FLAGS'] = with_device_count(os.environ.get('XLA_FLAGS', ''), CPU_DEVICES)
  return CPU_DEVICES


def _is_count(text: str) -> bool:
  return text.strip().isdigit() and int(text) > 0


def device_count_mistake() -> Optional[str]:
  """A CPU device count set in the environment that jax or XLA would stop on with a traceback
  (or XLA abort on), as one line naming the fix; None if there is none."""
  value = os.environ.get('JAX_NUM_CPU_DEVICES')
  if value is not None and not _is_count(value):
    return (f'JAX_NUM_CPU_DEVICES={value!r} must be a positive number of CPU devices (1: one '
            'device) or unset')
  flag = re.search(rf'{DEVICE_COUNT_FLAG}=(\S*)', os.environ.get('XLA_FLAGS', ''))
  if flag and not _is_count(flag[1]):
    return (f'XLA_FLAGS has {flag[0]}: it must be a positive number of CPU devices (1: one '
            'device) or left out')
  return None
