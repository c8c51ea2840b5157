"""launch/tpu.py end to end, with a fake `gcloud` on PATH that records its argv.

What matters: the exact gcloud argv, hostile values (spaces, quotes, `$(...)`,
backticks, `;`) arriving as single intact words both locally and in the remote
shell, --dry-run printing the same commands without running any, and mistakes
ending in one stderr line.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List

import pytest

TPU = str(Path(__file__).resolve().parents[1] / 'launch' / 'tpu.py')
HOSTILE = 'a b \'c\' "d" $(touch pwned) `touch pwned`;touch pwned $HOME \\'
VENV_PY = '../vit_jax_venv/bin/python'
APT_GET = ['apt-get', '-o', 'DPkg::Lock::Timeout=300']  # waits out unattended-upgrades
TPUS = ['compute', 'tpus']
# The fake gcloud: records argv, plus the members of any .tar.gz it is handed.
FAKE_GCLOUD = f"""#!{sys.executable} -S
import json, os, sys, tarfile
tars = {{a: sorted(tarfile.open(a).getnames()) for a in sys.argv[1:]
        if a.endswith('.tar.gz') and os.path.isfile(a)}}
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps({{'argv': sys.argv[1:], 'tars': tars}}) + '\\n')
sys.exit(int(os.environ.get('FAKE_GCLOUD_RC', '0')))
"""


class Fake:
  """Runs tpu.py with the fake gcloud first on PATH and reads what it saw."""

  def __init__(self, tmp_path: Path):
    self.tmp = tmp_path
    self.log = tmp_path / 'gcloud_calls.jsonl'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
    (bin_dir / 'gcloud').chmod(0o755)
    self.env = dict(os.environ, FAKE_GCLOUD_LOG=str(self.log),
                    PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')

  def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TPU, *args], cwd=self.tmp,
                          env=dict(self.env, **env), capture_output=True,
                          text=True, timeout=60)

  def records(self) -> List[Dict]:
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def calls(self) -> List[List[str]]:
    return [r['argv'] for r in self.records()]


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
  return Fake(tmp_path)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr
  return result


def remote_words(argv: List[str]) -> List[str]:
  """The words the remote shell sees in `--command=...`."""
  [command] = [a for a in argv if a.startswith('--command=')]
  return shlex.split(command[len('--command='):])


def alive(pid: int) -> bool:
  """Running, i.e. neither gone nor a zombie awaiting its reaper."""
  try:
    stat = Path(f'/proc/{pid}/stat').read_text()
    return stat.rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def git_tree(root: Path) -> Path:
  """A small work tree: tracked, untracked and ignored files."""
  for rel, text in {'requirements.txt': 'absl-py\n', 'setup.py': '',
                    'vit_jax/__init__.py': '', 'new.py': '',
                    '.gitignore': '.venv/\nworkdirs/\n',
                    '.venv/junk': '', 'workdirs/ckpt': ''}.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
  subprocess.run(['git', 'init', '-q', str(root)], check=True)
  subprocess.run(['git', '-C', str(root), 'add', 'setup.py', 'vit_jax',
                  'requirements.txt', '.gitignore'], check=True)
  return root


@pytest.mark.parametrize('accelerator,runtime', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5p-16', 'v2-alpha-tpuv5'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_create_picks_runtime_per_generation(fake, accelerator, runtime):
  ok(fake.run('create', 'pod', '--zone=us-central2-b', '--project=proj',
              f'--accelerator-type={accelerator}', '--spot'))
  assert fake.calls() == [TPUS + [
      'tpu-vm', 'create', 'pod', f'--accelerator-type={accelerator}',
      f'--version={runtime}', '--spot', '--zone=us-central2-b',
      '--project=proj']]


def test_create_and_delete_queued_resource(fake):
  ok(fake.run('create', 'pod', '--zone=z', '--accelerator-type=v5p-8',
              '--queued', '--qr-id=qr', '--version=v2-alpha-tpuv5', '--spot'))
  ok(fake.run('delete', 'pod', '--zone=z', '--queued', '--qr-id=qr'))
  ok(fake.run('delete', 'pod', '--zone=z'))
  ok(fake.run('create', 'pod', '--zone=z', '--accelerator-type=v4-8',
              '--preemptible'))
  assert fake.calls() == [
      TPUS + ['queued-resources', 'create', 'qr', '--node-id=pod',
              '--accelerator-type=v5p-8', '--runtime-version=v2-alpha-tpuv5',
              '--spot', '--zone=z'],
      TPUS + ['queued-resources', 'delete', 'qr', '--force', '--quiet',
              '--zone=z'],
      TPUS + ['tpu-vm', 'delete', 'pod', '--quiet', '--zone=z'],
      TPUS + ['tpu-vm', 'create', 'pod', '--accelerator-type=v4-8',
              '--version=tpu-ubuntu2204-base', '--preemptible', '--zone=z']]


def test_hostile_values_arrive_as_single_argv_elements(fake):
  ok(fake.run('create', HOSTILE, f'--zone={HOSTILE}', f'--project={HOSTILE}',
              '--accelerator-type=v4-8', f'--version={HOSTILE}'))
  assert fake.calls() == [TPUS + [
      'tpu-vm', 'create', HOSTILE, '--accelerator-type=v4-8',
      f'--version={HOSTILE}', f'--zone={HOSTILE}', f'--project={HOSTILE}']]
  assert not list(fake.tmp.rglob('pwned'))


def pod_home(tmp_path: Path) -> Path:
  """A worker's home after setup, with a stand-in training that records its
  argv, TFDS_DATA_DIR and pid, prints "started", and on SIGTERM prints "term"
  and exits 7 (as a run saves and stops)."""
  home = tmp_path / 'home'
  (home / 'vit_jax').mkdir(parents=True)
  (home / 'vit_jax_venv' / 'bin').mkdir(parents=True)
  python = home / 'vit_jax_venv' / 'bin' / 'python'
  python.write_text(
      f'#!{sys.executable} -S\nimport json, os, signal, sys, time\n'
      'signal.signal(signal.SIGTERM, lambda *a: (print("term", flush=True), '
      'sys.exit(7)))\n'
      f'open({str(home / "seen.json")!r}, "w").write(json.dumps([sys.argv[1:], '
      'os.environ.get("TFDS_DATA_DIR"), os.getpid()]))\n'
      'print("started", flush=True)\n'
      'for _ in range(600):\n  time.sleep(0.1)\n')
  python.chmod(0o755)
  return home


def remote_command(argv: List[str]) -> str:
  """The `--command=` of a recorded gcloud ssh (followed by --zone)."""
  return argv[-2][len('--command='):]


def remote(home: Path, argv: List[str]) -> subprocess.CompletedProcess:
  """Runs the remote command of a recorded gcloud ssh in bash, in `home`."""
  return subprocess.run(['bash', '-c', remote_command(argv)], cwd=home,
                        timeout=30, capture_output=True, text=True)


def test_run_in_the_foreground_streams_and_ends_with_the_training_status(
    fake, tmp_path):
  """The run leaves the ssh session (Ctrl-C or a dropped connection no longer
  orphans it unstoppably), `stop` ends it, and `run` exits with its status."""
  home = pod_home(tmp_path)
  override = f'--config.name={HOSTILE}'
  ok(fake.run('run', 'pod', '--zone=z', f'--config=configs/{HOSTILE}.py',
              f'--workdir=gs://b/{HOSTILE}', f'--tfds-data-dir=gs://{HOSTILE}',
              f'--env=XLA_FLAGS={HOSTILE}', '--', override, ';touch pwned'))
  ok(fake.run('stop', 'pod', '--zone=z'))
  run, stop = fake.calls()
  assert run[:6] == TPUS + ['tpu-vm', 'ssh', 'pod', '--worker=all']
  streaming = subprocess.Popen(['bash', '-c', remote_command(run)], cwd=home,
                               text=True, stdout=subprocess.PIPE)
  pid = None
  try:
    assert streaming.stdout.readline() == 'started\n'
    argv, tfds_data_dir, pid = json.loads((home / 'seen.json').read_text())
    assert argv == ['-m', 'vit_jax.main', '--distributed',
                    f'--config=configs/{HOSTILE}.py', f'--workdir=gs://b/{HOSTILE}',
                    override, ';touch pwned']
    assert tfds_data_dir == f'gs://{HOSTILE}'
    assert os.getpgid(pid) == int((home / 'vit_jax_run.log.pid').read_text())
    assert remote(home, stop).returncode == 0
    out, _ = streaming.communicate(timeout=30)
  finally:
    if streaming.poll() is None:
      streaming.kill()
    if pid and alive(pid):
      os.kill(pid, signal.SIGKILL)
  assert (streaming.returncode, out) == (7, 'term\n')
  assert not list(tmp_path.rglob('pwned'))


def test_detached_run_logs_and_stop_in_a_real_shell(fake, tmp_path):
  """Detached: started, refused a second time while alive, its log shown,
  stopped; a stop with no run says so. The log name starts with "-"."""
  home = pod_home(tmp_path)
  log = f'-{HOSTILE}'
  ok(fake.run('run', 'pod', '--zone=z', '--config=c.py', '--workdir=gs://w',
              '--detach', f'--log={log}'))
  ok(fake.run('logs', 'pod', '--zone=z', f'--log={log}'))
  ok(fake.run('stop', 'pod', '--zone=z', f'--log={log}'))
  run, logs, stop = fake.calls()
  assert remote(home, run).returncode == 0
  pid_file, seen = home / f'{log}.pid', home / 'seen.json'
  deadline = time.time() + 20
  while not seen.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert seen.exists(), 'the detached run did not start'
  pid = json.loads(seen.read_text())[2]
  try:
    pgid = int(pid_file.read_text())
    assert os.getpgid(pid) == pgid != os.getpgid(0)  # setsid: its own group
    again = remote(home, run)
    assert again.returncode == 3 and again.stderr.count('\n') == 1
    assert again.stderr.startswith('tpu.py: a run is active on ')
    assert 'tpu.py stop' in again.stderr
    assert int(pid_file.read_text()) == pgid and alive(pid)
    while 'started' not in remote(home, logs).stdout and time.time() < deadline:
      time.sleep(0.05)
    assert remote(home, logs).stdout == 'started\n'
    assert remote(home, stop).returncode == 0
    while alive(pid) and time.time() < deadline:
      time.sleep(0.05)
    assert not alive(pid), 'stop left the run alive'
  finally:
    if alive(pid):
      os.kill(pid, signal.SIGKILL)
  while Path(f'/proc/{pgid}').exists() and time.time() < deadline:
    time.sleep(0.05)  # its sh saves the status, then is reaped
  assert (home / f'{log}.status').read_text() == '7\n'
  assert pid_file.exists()  # kept until the run is gone: no run beside it
  again = remote(home, stop)
  assert again.returncode == 0 and not pid_file.exists()
  assert again.stderr.startswith('tpu.py: no run is active on ')
  assert again.stderr.endswith(': nothing to stop\n')


def test_run_can_start_fine_tuning_and_refuses_other_modules(fake):
  ok(fake.run('run', 'pod', '--zone=z', '--module=vit_jax.finetune', '--config=c.py',
              '--workdir=gs://w'))
  [argv] = fake.calls()
  words = remote_words(argv)
  start = words.index(VENV_PY)
  assert words[start:words.index('>', start)] == [  # up to the log's redirection
      VENV_PY, '-m', 'vit_jax.finetune', '--distributed', '--config=c.py', '--workdir=gs://w']
  failed = fake.run('run', 'pod', '--zone=z', '--module=vit_jax.export', '--config=c.py',
                    '--workdir=gs://w')
  assert failed.returncode == 2 and 'invalid choice' in failed.stderr


def test_setup_copies_the_local_tree(fake, tmp_path):
  source = git_tree(tmp_path / 'src')
  ok(fake.run('setup', 'pod', '--zone=z', f'--source={source}'))
  tarball = str(source / 'build' / 'launch' / 'pod.tar.gz')
  [scp, ssh] = fake.records()
  assert scp['argv'] == TPUS + ['tpu-vm', 'scp', tarball, 'pod:vit_jax.tar.gz',
                                '--worker=all', '--zone=z']
  assert scp['tars'] == {tarball: ['.gitignore', 'new.py', 'requirements.txt',
                                   'setup.py', 'vit_jax/__init__.py']}
  assert not Path(tarball).exists()
  pip = [VENV_PY, '-m', 'pip', 'install', '-q']
  assert ssh['argv'][:6] == TPUS + ['tpu-vm', 'ssh', 'pod', '--worker=all']
  assert remote_words(ssh['argv']) == [
      'rm', '-rf', 'vit_jax', '&&', 'mkdir', '-p', 'vit_jax', '&&',
      'tar', '-xzf', 'vit_jax.tar.gz', '-C', 'vit_jax', '&&',
      'rm', '-f', 'vit_jax.tar.gz', '&&',
      '(python3.11', '-c', 'import ensurepip', '>', '/dev/null', '2>&1', '||',
      '(sudo', *APT_GET, 'update', '-q', '&&', 'sudo', *APT_GET, 'install', '-y',
      '-q', 'python3.11', 'python3.11-venv))', '&&',
      'python3.11', '-m', 'venv', 'vit_jax_venv', '&&', 'cd', 'vit_jax', '&&',
      *pip, '--upgrade', 'pip', '&&', *pip, '-r', 'requirements.txt', '&&',
      *pip, '--no-deps', '-e', '.', '&&', *pip, 'jax[tpu]', '-f',
      'https://storage.googleapis.com/jax-releases/libtpu_releases.html']


@pytest.mark.parametrize('has_ensurepip', [True, False])
def test_setup_adds_the_venv_package_when_python_lacks_it(fake, tmp_path,
                                                          has_ensurepip):
  """An image may have python3.11 without its -venv (ensurepip), with which
  `venv` fails; `command -v python3.11` took that for installed."""
  bin_dir, home = tmp_path / 'remote_bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  calls = tmp_path / 'remote_calls'
  record = f'#!/bin/sh\necho "${{0##*/}} $*" >> {shlex.quote(str(calls))}\n'
  for name, body in {
      'sudo': '', 'git': 'mkdir -p vit_jax\n',
      'python3.11': (f'[ "$1" = -c ] && exit {0 if has_ensurepip else 1}\n'
                     'mkdir -p vit_jax_venv/bin && cp "$0" vit_jax_venv/bin/python\n')
  }.items():
    (bin_dir / name).write_text(record + body)
    (bin_dir / name).chmod(0o755)
  ok(fake.run('setup', 'pod', '--zone=z', '--repo=https://example.com/r.git'))
  [argv] = fake.calls()
  subprocess.run(['bash', '-c', argv[-2][len('--command='):]], cwd=home,
                 check=True, timeout=30,
                 env=dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}'))
  done = calls.read_text().splitlines()
  apt = 'sudo apt-get -o DPkg::Lock::Timeout=300'
  assert [c for c in done if c.startswith('sudo')] == ([] if has_ensurepip else [
      f'{apt} update -q', f'{apt} install -y -q python3.11 python3.11-venv'])
  assert 'python3.11 -m venv vit_jax_venv' in done
  assert done[-1].startswith('python -m pip install -q jax[tpu] -f ')


def test_setup_clones_without_option_injection(fake):
  ok(fake.run('setup', 'pod', '--zone=z', '--repo=--upload-pack=touch pwned',
              f'--branch={HOSTILE}', '--jax=jax[tpu]==0.10.2', '--worker=0-3'))
  [argv] = fake.calls()
  assert argv[:6] == TPUS + ['tpu-vm', 'ssh', 'pod', '--worker=0-3']
  words = remote_words(argv)
  assert words[:14] == ['rm', '-rf', 'vit_jax', '&&', 'git', 'clone',
                        '--depth=1', f'--branch={HOSTILE}', '--',
                        '--upload-pack=touch pwned', 'vit_jax', '&&',
                        '(python3.11', '-c']
  assert words[-3:] == ['jax[tpu]==0.10.2', '-f', words[-1]]


def test_logs_and_stop_workers(fake):
  ok(fake.run('logs', 'pod', '--zone=z', '--follow', '--lines=5',
              f'--log={HOSTILE}'))
  ok(fake.run('logs', 'pod', '--zone=z', '--worker=all'))
  ok(fake.run('stop', 'pod', '--zone=z'))
  follow, every, stop = fake.calls()
  assert follow[:6] == TPUS + ['tpu-vm', 'ssh', 'pod', '--worker=0']
  assert remote_words(follow) == ['tail', '-n', '5', '-F', '--', HOSTILE]
  assert every[5] == '--worker=all'
  assert stop[:6] == TPUS + ['tpu-vm', 'ssh', 'pod', '--worker=all']


@pytest.mark.parametrize('args', [
    ['create', HOSTILE, '--zone=z', '--accelerator-type=v6e-8', '--queued'],
    ['delete', 'pod', f'--zone={HOSTILE}'],
    ['run', 'pod', '--zone=z', '--config=c.py', '--workdir=gs://w',
     '--detach', '--', f'--config.a={HOSTILE}'],
    ['logs', 'pod', '--zone=z', '--follow'],
    ['stop', 'pod', '--zone=z', '--project=p'],
    ['setup', 'pod', '--zone=z'],
])
def test_dry_run_prints_the_commands_and_runs_none(fake, tmp_path, args):
  if args[0] == 'setup':
    args = args + [f'--source={git_tree(tmp_path / "src")}']
  dry = ok(fake.run(*args[:2], '--dry-run', *args[2:])).stdout
  printed = [shlex.split(line) for line in dry.splitlines()]
  assert not fake.log.exists()
  assert not list(tmp_path.rglob('*.tar.gz'))
  ok(fake.run(*args))
  assert [p[1:] for p in printed if p[0] == 'gcloud'] == fake.calls()
  if args[0] == 'setup':
    tarball = fake.calls()[0][4]
    assert printed[0] == [sys.executable, TPU, 'pack',
                          f'--source={tmp_path / "src"}', tarball]
    assert printed[2] == ['rm', '-f', tarball]


@pytest.mark.parametrize('args,message', [
    (['create', 'pod', '--accelerator-type=v4-8'], '--zone'),
    (['create', 'pod', '--zone=z', '--accelerator-type=v5e-8'], 'v5e-8'),
    (['create', 'pod', '--zone=z', '--accelerator-type=tpu-8'], 'GENERATION'),
    (['create', 'pod', '--zone=z', '--accelerator-type=v4-8', '--queued',
      '--preemptible'], '--spot'),
    (['delete', 'pod', '--zone=z', '--qr-id=q'], '--queued'),
    (['delete', '-1', '--zone=z'], 'name'),
    (['logs', 'pod', '--zone=z', '--worker=0;reboot'], '--worker'),
    (['run', 'pod', '--zone=z', '--config=c', '--workdir=w', '--env=A B=1'],
     'KEY=VALUE'),
    (['setup', 'pod', '--zone=z', '--python=python3;reboot'], 'python3.X'),
    (['setup', 'pod', '--zone=z', '--branch=main'], '--repo'),
    (['stop', 'pod', '--zone=z', '--', '--config.x=1'], 'only `run`'),
    (['setup', 'pod', '--zone=z', '--source=.'], 'git'),
    (['launch', 'pod'], 'invalid choice'),
])
def test_bad_input_is_one_line_without_traceback(fake, args, message):
  result = fake.run(*args)
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
  assert result.stderr.startswith('tpu.py') and message in result.stderr
  assert not fake.log.exists()


def test_failing_gcloud_stops_the_sequence_with_its_exit_code(fake, tmp_path):
  source = git_tree(tmp_path / 'src')
  result = fake.run('setup', 'pod', '--zone=z', f'--source={source}',
                    FAKE_GCLOUD_RC='3')
  assert result.returncode == 3
  assert [c[3] for c in fake.calls()] == ['scp']
  last = result.stderr.splitlines()[-1]
  assert last.startswith('tpu.py: error: exit 3 from: gcloud compute tpus')


def test_missing_gcloud_is_one_line(fake, tmp_path):
  result = fake.run('delete', 'pod', '--zone=z', PATH=str(tmp_path / 'empty'))
  assert result.returncode == 2
  assert result.stderr.splitlines()[-1].startswith(
      'tpu.py: error: gcloud not found on PATH')
  assert 'Traceback' not in result.stderr


def test_run_refuses_a_local_workdir_unless_on_one_worker(fake):
  """Each worker would write its own shards of every checkpoint to its own disk
  (unrestorable). A local data dir is each worker's copy of the data: kept."""
  args = ['run', 'pod', '--zone=z', '--config=c.py', '--workdir=/data/run', '--dry-run']
  result = fake.run(*args)
  assert result.returncode == 2 and result.stderr.count('\n') == 1
  assert result.stderr.startswith('tpu.py: error: --workdir=/data/run is not on GCS')
  assert 'use gs://BUCKET/..., or --worker=N' in result.stderr
  [line] = ok(fake.run(*args, '--worker=0')).stdout.splitlines()
  argv = shlex.split(line)
  assert argv[6] == '--worker=0' and '/data/run' in argv[7]
  ok(fake.run('run', 'pod', '--zone=z', '--config=c.py', '--workdir=gs://w',
              '--tfds-data-dir=/mnt/tfds', '--dry-run'))


def test_pack_into_a_folder_that_cannot_be_made_is_one_line(fake, tmp_path):
  source = git_tree(tmp_path / 'src')
  (tmp_path / 'file').write_text('')
  result = fake.run('pack', f'--source={source}', str(tmp_path / 'file' / 'x.tar.gz'))
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr == (f"tpu.py: error: cannot write '{tmp_path}/file/x.tar.gz' "
                           f"({tmp_path}/file: File exists): pick another output path\n")


def test_pack_keeps_what_git_would_version(fake, tmp_path):
  source = git_tree(tmp_path / 'src')
  out = tmp_path / 'out' / 'code.tar.gz'
  ok(fake.run('pack', f'--source={source}', str(out)))
  with tarfile.open(out) as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'new.py',
                                      'requirements.txt', 'setup.py',
                                      'vit_jax/__init__.py']


def test_pack_leaves_out_its_own_output_folder(fake, tmp_path):
  """`setup` packs into build/launch/ inside the tree: an earlier pack left there (untracked,
  not ignored) would otherwise be packed again, into every later tarball."""
  source = git_tree(tmp_path / 'src')
  for rel in ('build/launch/pod.tar.gz', 'build/notes.txt'):
    (source / rel).parent.mkdir(parents=True, exist_ok=True)
    (source / rel).write_text('x')
  out = tmp_path / 'out' / 'code.tar.gz'
  ok(fake.run('pack', f'--source={source}', str(out)))
  with tarfile.open(out) as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'build/notes.txt', 'new.py',
                                      'requirements.txt', 'setup.py', 'vit_jax/__init__.py']
