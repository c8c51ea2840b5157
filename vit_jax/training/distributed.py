"""Joining the processes of a multi-host run before anything touches the devices."""
import logging
import os
from typing import Optional

from absl import flags
import jax

from vit_jax.errors import ConfigError

# The commands that train (main, finetune) share these, so launch/local.sh can start either.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs off Cloud TPU.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a multi-process run.')
_DETECT = flags.DEFINE_bool(
    'distributed', False, 'Join the processes of the cluster JAX detects by itself: a Cloud '
    'TPU VM pod (launch/tpu.py run passes it), GKE, SLURM.')

SLURM_STEP_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                        'SLURM_LOCALID')


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, detect: bool = False) -> None:
  """Explicit flags win; else JAX's own detection when asked (`detect`) or when the
  environment names a cluster (GKE TPU, a coordinator, a SLURM step). A Cloud TPU VM pod names
  none: JAX finds it through the metadata server, which is only asked when told to.

  On CPU the processes talk through gloo collectives (how pod code paths are tested on one
  machine). A single process with no coordinator does nothing, and stops with one line if it
  turns out to be one of several hosts that were not joined (Orbax and preemption notices
  need the joined runtime).
  """
  _check_explicit(coordinator_address, num_processes, process_id)
  auto = detect or any(os.environ.get(k)
                       for k in ('TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS'))
  # A SLURM job step (srun), as JAX detects one: an salloc shell or a batch script without
  # srun has SLURM_JOB_ID but no step, and JAX could not find a coordinator there.
  auto = auto or all(k in os.environ for k in SLURM_STEP_VARIABLES)
  if coordinator_address is None and not auto:
    if num_processes is not None or process_id is not None:
      raise ConfigError('--num_processes/--process_id need --coordinator_address=HOST:PORT of '
                        'process 0 (off Cloud TPU and SLURM, which provide it)')
    if jax.process_count() > 1:
      raise ConfigError(f'this host is one of {jax.process_count()} processes, not joined: '
                        'pass --distributed (launch/tpu.py run does) or --coordinator_address')
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices only.
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:  # Detection found no cluster: "coordinator_address should be defined".
    if coordinator_address is not None:
      raise
    raise ConfigError('JAX found no cluster to join here (a Cloud TPU pod, GKE, SLURM): on one '
                      'machine start the processes with launch/local.sh N, elsewhere pass '
                      '--coordinator_address, --num_processes and --process_id') from e
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _check_explicit(coordinator_address: Optional[str], num_processes: Optional[int],
                    process_id: Optional[int]) -> None:
  """One line for explicit flags JAX would take with a traceback (or gRPC with a segfault): a
  process count under 1, a process number outside the run, a coordinator that is not HOST:PORT
  or comes without the process count and number."""
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f'--num_processes={num_processes} must be at least 1: the processes of the '
                      'run, all started with the same value')
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(':')
    if not host or not (port.isdigit() and 0 < int(port) < 2**16):
      raise ConfigError(f'--coordinator_address={coordinator_address} must be HOST:PORT of '
                        'process 0, the port in 1-65535 (e.g. 127.0.0.1:1234)')
  if (num_processes is not None and process_id is not None
      and not 0 <= process_id < num_processes):
    raise ConfigError(f'--process_id={process_id} is not one of --num_processes={num_processes}: '
                      'number the processes 0 to N-1 (launch/local.sh N does)')
  if coordinator_address is not None and None in (num_processes, process_id):
    raise ConfigError('--coordinator_address needs --num_processes and --process_id too (all '
                      'three on each process): launch/local.sh N passes them')


def initialize_from_flags() -> None:
  """`initialize` with the command line's --coordinator_address/--num_processes/--process_id/
  --distributed."""
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DETECT.value)
