r"""Size up a pod run on this machine: memory per device, FLOPs, time, the largest batch.

  python -m vit_jax.plan --config=configs/vit_h14.py:imagenet21k --mesh=data:-1,fsdp:64 \
      --devices=256 --device_memory_gib=32 [--batch=4096] [--peak_tflops=275 --mfu=0.5] [--json]

`--devices=N` compiles for N simulated CPU devices (this module sets XLA_FLAGS before jax is
imported); without it, for the devices this host has. Nothing is allocated and no dataset is
read: the config must give num_classes (or pass --num_classes). See vit_jax/training/planner.py
for what the figures mean and how the largest batch is found.
"""
import os
import sys

from vit_jax import host_devices


def _simulate_devices(argv: list[str]) -> None:
  """--devices=N -> N CPU devices. Must run before jax is imported, hence before absl flags."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(('--devices=', '-devices=')):  # absl takes either.
      value = arg.split('=', 1)[1]
    elif arg in ('--devices', '-devices') and i + 1 < len(argv):
      value = argv[i + 1]
  if value and value.isdigit() and int(value) > 0:  # Else the flag's own check says why.
    os.environ['XLA_FLAGS'] = host_devices.with_device_count(os.environ.get('XLA_FLAGS', ''),
                                                             int(value))
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ.pop('JAX_NUM_CPU_DEVICES', None)  # It would win over the flag.


if __name__ == '__main__':
  _simulate_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import json

import jax
from absl import flags
from ml_collections import config_flags

from vit_jax.errors import ConfigError, check_no_arguments, quiet_unless_verbose, run_cli
from vit_jax.training import planner

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', None, 'Simulated CPU devices to plan for.',
                                lower_bound=1)
_MESH = flags.DEFINE_string('mesh', None, 'Mesh, e.g. data:-1,fsdp:64 (default: the config\'s).')
_BATCH = flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s).',
                              lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'If the config has no num_classes.',
                                    lower_bound=1)
_MEMORY = flags.DEFINE_float('device_memory_gib', None, 'Memory per device: fit and max batch.')
_SEARCH = flags.DEFINE_bool('max_batch', True, 'Search the largest batch that fits (compiles).')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device: step time and days.')
_MFU = flags.DEFINE_float('mfu', 0.5, 'Assumed model FLOPs utilisation for the time estimate.')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of the report.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  check_no_arguments(argv)
  if _DEVICES.value is not None and jax.device_count() != _DEVICES.value:
    raise ConfigError(f'--devices={_DEVICES.value} but jax sees {jax.device_count()} '
                      f'{jax.default_backend()} devices: run as python -m vit_jax.plan')
  quiet_unless_verbose()  # Its result is what it prints.
  for flag, needs in (('mfu', 'peak_tflops'), ('max_batch', 'device_memory_gib')):
    if flags.FLAGS[flag].present and flags.FLAGS[flag].value and flags.FLAGS[needs].value is None:
      raise ConfigError(f'--{flag} does nothing without --{needs}: pass that too')
  config = _CONFIG.value
  with config.unlocked():
    if _MESH.value:
      config.mesh = _MESH.value
    if _BATCH.value:
      config.batch = _BATCH.value
  result = planner.plan(config, num_classes=_NUM_CLASSES.value, device_memory_gib=_MEMORY.value,
                        peak_tflops=_PEAK.value, mfu=_MFU.value, search=_SEARCH.value)
  print(json.dumps(result.as_dict(), indent=2) if _JSON.value
        else planner.format_plan(result))


if __name__ == '__main__':
  run_cli(main)
