"""A CPU-only host runs as two XLA devices unless the user chose a count."""
import json
import os
import subprocess
import sys

import pytest

from vit_jax import host_devices

_PROBE = ('import json, os, vit_jax, jax; print(json.dumps({"set": vit_jax.CPU_DEVICES_SET, '
          '"devices": jax.device_count(), "platform": jax.default_backend()}))')


def _probe(**env) -> dict:
  environ = {k: v for k, v in os.environ.items()
             if k not in ('JAX_PLATFORMS', 'XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  result = subprocess.run([sys.executable, '-c', _PROBE], env=environ | env, text=True,
                          capture_output=True, timeout=120, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_devices.schedulable_cores() < 2, reason='needs 2 cores')
def test_cpu_host_gets_two_devices_unless_the_user_set_a_count():
  assert _probe() == {'set': 2, 'devices': 2, 'platform': 'cpu'}
  assert _probe(XLA_FLAGS='--xla_force_host_platform_device_count=1')['devices'] == 1
  assert _probe(JAX_NUM_CPU_DEVICES='3') == {'set': 0, 'devices': 3, 'platform': 'cpu'}


def test_other_xla_flags_are_kept(monkeypatch):
  monkeypatch.setattr(host_devices, 'schedulable_cores', lambda: 2)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/dump')
  assert host_devices.split_cpu() == 2
  assert os.environ['XLA_FLAGS'] == ('--xla_dump_to=/tmp/dump '
                                     '--xla_force_host_platform_device_count=2')


@pytest.mark.parametrize('cores,platforms', [(2, 'cuda,cpu'), (2, 'tpu'), (1, 'cpu')])
def test_left_alone_on_accelerator_or_single_core_hosts(monkeypatch, cores, platforms):
  monkeypatch.setattr(host_devices, 'schedulable_cores', lambda: cores)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host_devices.split_cpu() == 0
  assert 'XLA_FLAGS' not in os.environ


@pytest.mark.parametrize('env,line', [
    # jax's "Could not determine process_index" traceback, jax's ValueError from `import jax`,
    # and XLA's abort with its flag list.
    (dict(JAX_NUM_CPU_DEVICES='0'), "error: JAX_NUM_CPU_DEVICES='0' must be a positive number "
     'of CPU devices (1: one device) or unset'),
    (dict(JAX_NUM_CPU_DEVICES='two'), "error: JAX_NUM_CPU_DEVICES='two' must be a positive "
     'number of CPU devices (1: one device) or unset'),
    (dict(XLA_FLAGS='--xla_force_host_platform_device_count=x'), 'error: XLA_FLAGS has '
     '--xla_force_host_platform_device_count=x: it must be a positive number of CPU devices '
     '(1: one device) or left out')])
def test_a_bad_device_count_in_the_environment_is_one_line(env, line, tmp_path):
  environ = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.main', '--config=configs/default.py',
                         f'--workdir={tmp_path / "run"}'], env=environ | env, text=True,
                        capture_output=True, timeout=120, cwd=os.path.dirname(
                            os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'run').exists()


def test_a_device_count_already_in_the_flags_is_replaced():
  """Replaced, not appended beside it: of two count flags, which one wins is up to XLA's flag
  parsing."""
  assert host_devices.with_device_count('--a --xla_force_host_platform_device_count=8', 2) == (
      '--a --xla_force_host_platform_device_count=2')
