#!/usr/bin/env python3
r"""A multi-host run on one machine: N processes of vit_jax.main joined over gloo on CPU.

Why: the pod code paths (per-process data slices, global arrays built from process-local
batches, process-0-only metrics, Orbax saves from every process) run here exactly as on a
TPU pod, so they can be tested without one.

Usage:
  launch/local.sh N [--devices_per_process=4] [--port=0] [--module=vit_jax.main] \
      --config=configs/default.py --workdir=DIR [more flags of the module]

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`
(process 0's coordinator bound to 127.0.0.1 only, through JAX_COORDINATOR_BIND_ADDRESS) and K
simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K; a
JAX_NUM_CPU_DEVICES of the caller's is dropped, since it would win), and its own share of the
launcher's CPUs where there are at least N (`cpu_shares`). A --port another program
listens on is refused before any process starts. Output lines are prefixed with `[I] `; once
the launcher's stdout is closed (`| head`), the rest is dropped, so no process blocks. If one
process fails, the others are stopped (SIGTERM, then SIGKILL after a grace period), one line on
stderr names it, and the launcher exits with the first nonzero code. A process that exits
143 (128 + SIGTERM: a run that saved and stopped on a preemption notice) has not failed: the
others, told by JAX's preemption service, save and stop at the same step, and are waited for (a
kill could cut their saves short); the launcher then exits 143. SIGTERM or
Ctrl-C to the launcher sends SIGTERM to every process (a preemption notice: the run saves a
checkpoint and stops) and it exits 128 + the signal; a second Ctrl-C kills them. Children stay
in the launcher's process group, so killing the group kills the whole run.
"""
import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NoReturn, Optional, Sequence

USAGE = ('usage: launch/local.sh N [--devices_per_process=K] [--port=P] [--module=M] '
         '--config=... --workdir=... [flags of M]')
OWN_FLAGS = {'devices_per_process': 4, 'port': 0, 'module': 'vit_jax.main'}
GRACE_S = 10.0
STOPPED = 128 + signal.SIGTERM  # vit_jax's exit status for a saved stop (Ctrl-C: by SIGINT).
COORDINATOR_HOST = '127.0.0.1'  # Not localhost, which may resolve to ::1 first.
_DEVICE_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def fail(message: str) -> NoReturn:
  print(f'error: {message}\n{USAGE}', file=sys.stderr)
  sys.exit(2)


def parse(argv: Sequence[str]) -> tuple[int, dict, list[str]]:
  """(N, launcher options, the module's flags in their order)."""
  if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
    fail('the first argument must be the number of processes (>= 1)')
  options, rest, args = dict(OWN_FLAGS), [], list(argv[1:])
  while args:
    arg = args.pop(0)
    name, eq, value = arg[2:].partition('=')
    if arg.startswith('--') and name in OWN_FLAGS:
      if not eq:
        if not args:
          fail(f'--{name} needs a value')
        value = args.pop(0)
      options[name] = value
    else:
      rest.append(arg)
  for name in ('devices_per_process', 'port'):
    if not str(options[name]).isdigit():
      fail(f'--{name}={options[name]} must be a non-negative integer')
    options[name] = int(options[name])
  if options['devices_per_process'] < 1:
    fail('--devices_per_process must be at least 1')
  if options['port'] > 65535:
    fail(f'--port={options["port"]} is not a TCP port: pick one below 65536, or 0 for a free one')
  return int(argv[0]), options, rest


def check_port(port: int) -> None:
  """Fails in one line if another program listens on 127.0.0.1:`port` (or on every
  interface), where process 0's coordinator binds (else each process dies in jax.distributed
  with a traceback)."""
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As the coordinator's server.
      s.bind((COORDINATOR_HOST, port))
  except OSError as e:
    if e.errno in (errno.EADDRINUSE, errno.EACCES):
      fail(f'--port={port} is {"in use" if e.errno == errno.EADDRINUSE else "not allowed"}: '
           'pick another, or --port=0 for a free one')


def free_port() -> int:
  """A port the OS says is free now (another program could take it before process 0 binds)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((COORDINATOR_HOST, 0))
    return s.getsockname()[1]


def cpu_shares(n: int) -> Optional[list[set[int]]]:
  """The launcher's CPUs in `n` disjoint, contiguous shares (sizes within one of each other), or
  None where there are fewer CPUs than processes or the OS has no affinity masks.

  Hosts of a pod do not share cores: each process gets its own, so XLA sizes its thread pool to
  them (instead of N pools contending for every core) and the per-core throughput a process
  reports (`perf.cores`: its cores times the process count) counts the machine's cores once.
  Unpinned, 2 x 4 devices of the embedded default on 2 cores ran faster at first (266 img/s
  against 176-180) but hung twice in gloo's all-reduce within 200 steps; pinned, they finished."""
  if not hasattr(os, 'sched_getaffinity'):
    return None
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < n:
    return None
  return [set(cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n]) for i in range(n)]


def child_env(devices: int, port: int) -> dict[str, str]:
  """This environment with K CPU devices per process (any device-count flag replaced), and
  process 0's coordinator bound to loopback only (JAX's default is every interface: it would
  take connections from other machines)."""
  env = dict(os.environ, JAX_COORDINATOR_BIND_ADDRESS=f'{COORDINATOR_HOST}:{port}')
  xla = _DEVICE_FLAG.sub('', env.get('XLA_FLAGS', '')).strip()
  env['XLA_FLAGS'] = f'{xla} --xla_force_host_platform_device_count={devices}'.strip()
  env.pop('JAX_NUM_CPU_DEVICES', None)  # It would win over the flag.
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  return env


class Run:
  """The children, their prefixed output, and stopping them all together."""

  def __init__(self, n: int, options: dict, flags: list[str]):
    port = options['port'] or free_port()
    self.failed: Optional[tuple[int, int]] = None  # (process, return code) of the first failure.
    env = child_env(options['devices_per_process'], port)
    self.lock = threading.Lock()
    self.procs, self.pumps = [], []
    shares = cpu_shares(n)
    for i in range(n):
      cmd = [sys.executable, '-m', options['module'],
             f'--coordinator_address={COORDINATOR_HOST}:{port}', f'--num_processes={n}',
             f'--process_id={i}', *flags]
      proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
      if shares:
        # Before the child has started a thread: its threads inherit the mask.
        with contextlib.suppress(ProcessLookupError):
          os.sched_setaffinity(proc.pid, shares[i])
      self.procs.append(proc)
      pump = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
      pump.start()
      self.pumps.append(pump)

  def _pump(self, i: int, proc: subprocess.Popen) -> None:
    """Copies process i's output, prefixed. Once our stdout is gone (`| head` exited) the
    rest goes to /dev/null: still read, since a child blocked on a full pipe never exits."""
    for line in iter(proc.stdout.readline, b''):
      with self.lock:
        try:
          sys.stdout.buffer.write(f'[{i}] '.encode() + line)
          sys.stdout.flush()
        except OSError:  # BrokenPipeError, or the like.
          devnull = os.open(os.devnull, os.O_WRONLY)
          os.dup2(devnull, sys.stdout.fileno())  # Also spares the flush at exit.
          os.close(devnull)

  def signal_all(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          proc.send_signal(signum)
        except ProcessLookupError:
          pass

  def stop(self) -> None:
    """SIGTERM (a chance to exit cleanly), then SIGKILL whoever is left after the grace."""
    self.signal_all(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(0.1)
    self.signal_all(signal.SIGKILL)

  def wait(self) -> int:
    """The first failure's exit code (a signal -s as 128 + s), the others then stopped; else,
    once all exited, the first stopped one's code, or 0."""
    while True:
      codes = [p.poll() for p in self.procs]
      failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0, STOPPED)), None)
      if failed is not None:
        self.failed = failed
        self.stop()
        return exit_code(failed[1])
      if None not in codes:
        return next((c for c in codes if c), 0)
      time.sleep(0.1)

  def close(self) -> None:
    for proc in self.procs:
      proc.wait()
    for pump in self.pumps:
      pump.join(timeout=5)


def exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def main(argv: Sequence[str]) -> int:
  n, options, flags = parse(argv)
  if options['port']:
    check_port(options['port'])
  # Inherited as ignored, so a terminal's Ctrl-C reaches the processes only as SIGTERM below.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  run = Run(n, options, flags)
  first_signal: Optional[int] = None

  def forward(signum, frame):
    del frame
    nonlocal first_signal
    if first_signal is not None:  # A second Ctrl-C: no more waiting.
      run.signal_all(signal.SIGKILL)
    first_signal = first_signal or signum
    run.signal_all(signal.SIGTERM)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  code = run.wait()
  if first_signal is not None:
    run.stop()
  run.close()
  if run.failed is not None and first_signal is None:
    i, returncode = run.failed
    how = (f'was killed by signal {-returncode}' if returncode < 0 else
           f'exited with status {returncode}')
    print(f'error: process {i} {how} (its output above, prefixed [{i}]): the other processes '
          'were stopped', file=sys.stderr)
  return 128 + first_signal if first_signal and run.failed is None else code


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
