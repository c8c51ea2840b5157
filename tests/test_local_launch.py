"""launch/local.sh on its own: N stand-in processes (a module that knows its --process_id), so
its arguments, environment, exit codes and signals are checked in seconds; the real 2-process
training runs are in test_multihost.py."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

LOCAL = str(Path(__file__).resolve().parents[1] / 'launch' / 'local.sh')


def fake_module(tmp_path: Path, body: str) -> dict[str, str]:
  """A module `fake_main` for the launcher to start, knowing its --process_id as `pid`."""
  (tmp_path / 'fake_main.py').write_text(
      'import sys, time\n'
      "pid = int(next(a for a in sys.argv if a.startswith('--process_id=')).split('=')[1])\n"
      + body)
  return dict(os.environ, PYTHONPATH=str(tmp_path))


def test_one_failing_process_stops_the_rest_with_its_exit_code(tmp_path):
  env = fake_module(tmp_path, "print('hello', flush=True)\n"
                               'if pid == 1:\n  sys.exit(3)\ntime.sleep(600)\n')
  start = time.monotonic()
  result = subprocess.run([LOCAL, '2', '--module=fake_main', '--x=1'], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 3
  assert time.monotonic() - start < 30  # Process 0 was stopped, not waited for.
  assert sorted(result.stdout.splitlines()) == ['[0] hello', '[1] hello']


def test_local_port_in_use_is_one_line_before_any_process_starts(tmp_path):
  """Else process 0's coordinator fails to bind and each process dies with jax's traceback."""
  env = fake_module(tmp_path, "open(f'started{pid}', 'w').close()\n")
  with socket.socket() as taken:
    taken.bind(('localhost', 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run([LOCAL, '2', f'--port={port}', '--module=fake_main'], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr.startswith(f'error: --port={port} is in use: pick another, or --port=0')
  assert 'Traceback' not in result.stderr and not list(tmp_path.glob('started*'))
  result = subprocess.run([LOCAL, '2', '--port=70000', '--module=fake_main'], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'error: --port=70000 is not a TCP port' in result.stderr


def test_local_crashing_process_is_named_in_one_line_and_the_rest_stopped(tmp_path):
  env = fake_module(tmp_path, "print('up', flush=True)\n"
                               "if pid == 1:\n  raise RuntimeError('boom')\n"
                               'time.sleep(600)\n')
  start = time.monotonic()
  proc = subprocess.Popen([LOCAL, '2', '--module=fake_main'], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 1 and time.monotonic() - start < 30
  assert '[1] RuntimeError: boom' in out
  assert err.strip().splitlines()[-1] == (
      'error: process 1 exited with status 1 (its output above, prefixed [1]): the other '
      'processes were stopped')
  # No process of the run is left: every member of the launcher's group is gone.
  left = subprocess.run(['pgrep', '-g', str(proc.pid)], capture_output=True, text=True)
  assert left.stdout.split() == []


def test_local_devices_per_process_wins_over_jax_num_cpu_devices(tmp_path):
  """JAX_NUM_CPU_DEVICES in the caller's environment would override the launcher's device flag
  (each process saw 1 device with --devices_per_process=3)."""
  env = fake_module(tmp_path, "import jax\nprint('devices', jax.local_device_count())\n")
  env['JAX_NUM_CPU_DEVICES'] = '1'
  result = subprocess.run([LOCAL, '2', '--devices_per_process=3', '--module=fake_main'],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = sorted(line for line in result.stdout.splitlines() if '] devices ' in line)
  assert lines == ['[0] devices 3', '[1] devices 3']


def test_processes_get_their_ids_devices_and_coordinator(tmp_path):
  env = fake_module(tmp_path, 'import os\n'
                               "print(' '.join(sys.argv[1:]), os.environ['XLA_FLAGS'],\n"
                               "      os.environ['JAX_COORDINATOR_BIND_ADDRESS'])\n")
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x'
  result = subprocess.run([LOCAL, '3', '--devices_per_process', '2', '--module=fake_main',
                           '--config=a b', '--workdir=w'],
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = sorted(result.stdout.splitlines())
  assert len(lines) == 3
  port = lines[0].split('--coordinator_address=127.0.0.1:')[1].split()[0]
  for i, line in enumerate(lines):
    assert line == (f'[{i}] --coordinator_address=127.0.0.1:{port} --num_processes=3 '
                    f'--process_id={i} --config=a b --workdir=w '
                    '--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2 '
                    f'127.0.0.1:{port}')  # JAX's coordinator binds there, not on every interface


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs CPU affinity masks and two CPUs')
def test_processes_get_disjoint_shares_of_the_cpus_or_all_of_them_when_too_few(tmp_path):
  """As hosts of a pod: each process its own cores (XLA's threads, the per-core rates), while
  there are at least as many CPUs as processes; with fewer, every process keeps them all."""
  env = fake_module(tmp_path, 'import json, os\n'
                               "print('cpus', json.dumps(sorted(os.sched_getaffinity(0))))\n")
  cpus = sorted(os.sched_getaffinity(0))

  def shares(n, launcher_cpus):
    # The launcher started with `launcher_cpus` (a preexec_fn would fork this JAX process).
    pinned_launcher = (f'import os; os.sched_setaffinity(0, {launcher_cpus}); '
                       f'os.execv({LOCAL!r}, [{LOCAL!r}, "{n}", "--module=fake_main"])')
    result = subprocess.run([sys.executable, '-c', pinned_launcher], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line.split(' cpus ')[1]) for line in sorted(result.stdout.splitlines())]

  two = shares(2, cpus)
  assert sorted(two[0] + two[1]) == cpus and two[0] and two[1]
  assert two[0] == cpus[:len(cpus) // 2]
  assert shares(2, cpus[:1]) == [cpus[:1], cpus[:1]]


def test_a_closed_stdout_drops_the_output_and_the_processes_run_on(tmp_path):
  """`launch/local.sh 2 ... | head -n 2` was BrokenPipeError tracebacks, then processes
  blocked on full pipes until killed."""
  env = fake_module(tmp_path, "for _ in range(20000):\n  print('x' * 50, flush=True)\n"
                               "open(f'done{pid}', 'w').close()\n")
  result = subprocess.run(['bash', '-c', f'set -o pipefail; {LOCAL} 2 --module=fake_main | '
                           'head -n 2'], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
  assert (result.returncode, result.stderr) == (0, '')
  assert len(result.stdout.splitlines()) == 2
  assert sorted(p.name for p in tmp_path.glob('done*')) == ['done0', 'done1']


@contextlib.contextmanager
def _launched(env: dict, **popen_args) -> Iterator[subprocess.Popen]:
  """`launch/local.sh 2` of the fake module in a session of its own (signalled as a terminal
  signals its foreground group), killed if the test leaves it running."""
  proc = subprocess.Popen([LOCAL, '2', '--module=fake_main'], env=env, stdout=subprocess.PIPE,
                          text=True, start_new_session=True, **popen_args)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_reaches_every_process_as_a_preemption_notice(tmp_path):
  """Like a terminal: SIGINT to the whole group. The processes ignore it; the launcher turns it
  into SIGTERM (on which vit_jax.main saves a checkpoint and exits 143) and exits 130."""
  env = fake_module(tmp_path, (
      'import signal\n'
      'signal.signal(signal.SIGTERM, lambda *a: (print("term", flush=True), sys.exit(143)))\n'
      'print("ready", signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)\n'
      # Short sleeps: a SIGTERM that lands between Python's last signal check and the sleep's
      # syscall runs its handler only when that sleep ends (one CI run hung on a single 600 s one).
      'while True:\n  time.sleep(0.1)\n'))
  with _launched(env) as proc:
    lines = [proc.stdout.readline().strip() for _ in range(2)]
    assert sorted(lines) == ['[0] ready True', '[1] ready True']
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 130
  assert sorted(out.split()) == ['[0]', '[1]', 'term', 'term']


def test_a_process_that_stopped_on_a_signal_leaves_the_others_to_finish_their_saves(tmp_path):
  """Exit 143 is vit_jax's saved stop, and JAX's preemption service stops the others at the
  same step: the launcher took it for a failure and SIGTERMed them, then SIGKILLed them after
  its grace period, saves in flight or not."""
  env = fake_module(tmp_path, (
      'import signal\n'
      'signal.signal(signal.SIGTERM, lambda *a: print("term", flush=True))\n'
      'if pid == 0:\n  time.sleep(2)\n  print("saved", flush=True)\n'
      'sys.exit(143)\n'))
  with _launched(env, stderr=subprocess.PIPE) as proc:
    out, err = proc.communicate(timeout=60)
  assert (proc.returncode, out, err) == (143, '[0] saved\n', '')


@pytest.mark.parametrize('args', [[], ['zero'], ['0'], ['2', '--devices_per_process=0'],
                                  ['2', '--port=x']])
def test_bad_launcher_arguments_are_one_line_errors(args):
  result = subprocess.run([LOCAL, *args], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and 'usage: launch/local.sh N' in result.stderr
  assert 'Traceback' not in result.stderr


def test_a_process_killed_by_a_signal_exits_128_plus_it_and_is_named(tmp_path):
  """As a shell reports it: SIGKILL (an OOM kill, say) is 137, not a negative return code."""
  env = fake_module(tmp_path, 'import os\n'
                               'if pid == 1:\n  os.kill(os.getpid(), 9)\n'
                               'while True:\n  time.sleep(0.1)\n')
  with _launched(env, stderr=subprocess.PIPE) as proc:
    _, err = proc.communicate(timeout=60)
  assert proc.returncode == 137
  assert err.strip().splitlines()[-1] == (
      'error: process 1 was killed by signal 9 (its output above, prefixed [1]): the other '
      'processes were stopped')


def test_a_second_ctrl_c_kills_processes_that_ignore_sigterm(tmp_path):
  """A run stuck in its checkpoint save (here: ignoring SIGTERM) ends on the second Ctrl-C at
  once, not after the launcher's grace period, and leaves no process behind."""
  env = fake_module(tmp_path, (
      'import os, signal\n'
      'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
      'print("ready", os.getpid(), flush=True)\n'
      'while True:\n  time.sleep(0.1)\n'))
  with _launched(env) as proc:
    ready = [proc.stdout.readline().split() for _ in range(2)]
    assert sorted(line[:2] for line in ready) == [['[0]', 'ready'], ['[1]', 'ready']]
    children = [int(line[2]) for line in ready]
    os.killpg(proc.pid, signal.SIGINT)  # SIGTERM to the processes, which ignore it.
    time.sleep(0.5)
    assert proc.poll() is None  # Still waiting for them after the first.
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    proc.communicate(timeout=30)
    took = time.monotonic() - start
  assert took < 5  # The grace period (launch/local.py's GRACE_S) is 10 s.
  assert proc.returncode == 137  # The processes' SIGKILL: the first nonzero code.
  for child in children:
    with pytest.raises(ProcessLookupError):
      os.kill(child, 0)
  left = subprocess.run(['pgrep', '-g', str(proc.pid)], capture_output=True, text=True)
  assert left.stdout.split() == []
