"""The multi-process flags of the training commands: mistakes are one `error:` line naming the
fix, not JAX's ValueError traceback (the joined runs themselves are in test_multihost.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What JAX's cluster detection reads: none of it, so this machine is in no cluster.
CLUSTER_VARIABLES = ('SLURM_', 'KUBERNETES_', 'OMPI_', 'TPU_', 'JAX_COORDINATOR')


@pytest.mark.parametrize('flags_given, expected', [
    (['--coordinator_address=localhost:12345'],
     'error: --coordinator_address needs --num_processes and --process_id too (all three on '
     'each process): launch/local.sh N passes them'),
    (['--coordinator_address=localhost:12345', '--num_processes=2', '--process_id=5'],
     'error: --process_id=5 is not one of --num_processes=2: number the processes 0 to N-1 '
     '(launch/local.sh N does)'),
    # JAX's IndexError traceback; gRPC's segfault; accepted.
    (['--coordinator_address=localhost', '--num_processes=1', '--process_id=0'],
     'error: --coordinator_address=localhost must be HOST:PORT of process 0, the port in 1-65535 '
     '(e.g. 127.0.0.1:1234)'),
    (['--coordinator_address=127.0.0.1:abc', '--num_processes=1', '--process_id=0'],
     'error: --coordinator_address=127.0.0.1:abc must be HOST:PORT of process 0, the port in '
     '1-65535 (e.g. 127.0.0.1:1234)'),
    (['--coordinator_address=127.0.0.1:99999', '--num_processes=1', '--process_id=0'],
     'error: --coordinator_address=127.0.0.1:99999 must be HOST:PORT of process 0, the port in '
     '1-65535 (e.g. 127.0.0.1:1234)'),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=0', '--process_id=0'],
     'error: --num_processes=0 must be at least 1: the processes of the run, all started with '
     'the same value'),
    (['--distributed'],
     'error: JAX found no cluster to join here (a Cloud TPU pod, GKE, SLURM): on one machine '
     'start the processes with launch/local.sh N, elsewhere pass --coordinator_address, '
     '--num_processes and --process_id'),
])
def test_multi_process_flag_mistakes_are_one_line(tmp_path, flags_given, expected):
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/default.py',
       f'--workdir={tmp_path / "run"}', *flags_given],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1] == expected
  assert not (tmp_path / 'run').exists()
