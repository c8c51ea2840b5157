#!/usr/bin/env python3
r"""Cloud TPU VM pod launcher: create, setup, run, logs, stop, delete (vit_jax).

Why Python and not bash: every step is an argv list run without a local shell,
so names, paths and config overrides reach gcloud intact whatever characters
they hold. The one string a shell does parse, the remote `--command=`, is built
from words quoted one by one with shlex.quote. `--dry-run` prints the very same
commands, shell-quoted so they can be pasted.

Usage (see launch/README.md):
  python3 launch/tpu.py create NAME --zone=Z --accelerator-type=v4-32 [--spot]
  python3 launch/tpu.py setup NAME --zone=Z [--repo=URL [--branch=B]]
  python3 launch/tpu.py run NAME --zone=Z --config=configs/X.py \
      --workdir=gs://B/run --tfds-data-dir=gs://B/tfds [--detach] \
      -- --config.key=value
  python3 launch/tpu.py logs NAME --zone=Z [--follow] [--worker=all]
  python3 launch/tpu.py stop NAME --zone=Z
  python3 launch/tpu.py delete NAME --zone=Z [--queued]
"""
import argparse
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tarfile
from typing import Callable, List, NoReturn, Optional, Sequence

Cmd = List[str]
Step = Callable[[argparse.Namespace], List[Cmd]]

# Layout on each TPU VM worker, relative to the login user's home directory.
REMOTE_DIR = 'vit_jax'
REMOTE_TARBALL = 'vit_jax.tar.gz'
REMOTE_VENV = 'vit_jax_venv'  # outside REMOTE_DIR: survives a fresh setup
# The venv's python as seen from inside REMOTE_DIR, where runs start.
REMOTE_PYTHON = posixpath.join('..', REMOTE_VENV, 'bin', 'python')
DEFAULT_LOG = 'vit_jax_run.log'
TRAINING_MODULES = ('vit_jax.main', 'vit_jax.finetune')  # Both take the same launch flags.
# Where `setup` packs the local tree; inside the source tree so no shared /tmp.
PACK_DIR = 'build/launch'
LIBTPU_INDEX = ('https://storage.googleapis.com/jax-releases/'
                'libtpu_releases.html')
# Default runtime image per TPU generation (docs: "TPU software versions").
RUNTIMES = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5p': 'v2-alpha-tpuv5',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v6e': 'v2-alpha-tpuv6e',
}


class LaunchError(Exception):
  """A mistake the user can fix, or a failed command: one line, no traceback."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


class _Parser(argparse.ArgumentParser):
  """Reports usage mistakes in one line, like LaunchError, not a usage dump."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _sh(*words: str) -> str:
  """Quotes each word for the remote shell so it stays exactly one word."""
  return ' '.join(shlex.quote(w) for w in words)


def _gcloud(args: argparse.Namespace, group: str, verb: str,
            *words: str) -> Cmd:
  """`gcloud compute tpus GROUP VERB WORDS --zone=Z [--project=P]`."""
  cmd = ['gcloud', 'compute', 'tpus', group, verb, *words]
  cmd.append(f'--zone={args.zone}')
  return cmd + ([f'--project={args.project}'] if args.project else [])


def _ssh(args: argparse.Namespace, remote: str) -> Cmd:
  """Runs the shell string `remote` on the selected workers (all at once)."""
  return _gcloud(args, 'tpu-vm', 'ssh', args.name, f'--worker={args.worker}',
                 f'--command={remote}')


def _matching(pattern: str, want: str) -> Callable[[str], str]:
  """An argparse type that accepts only full matches of `pattern`."""
  regex = re.compile(pattern, re.DOTALL)

  def check(value: str) -> str:
    if not regex.fullmatch(value):
      raise argparse.ArgumentTypeError(f'{value!r}: want {want}')
    return value

  return check


# gcloud would read a name starting with "-" as a flag (e.g. --project=other).
_tpu_name = _matching(r'[^-].*', 'a name that does not start with "-"')
# Catches typos (v5e-8 is v5litepod-8) before a slow gcloud round trip.
_accelerator = _matching(
    r'(%s)-[1-9][0-9]*' % '|'.join(RUNTIMES),
    f'GENERATION-SIZE, GENERATION in {"|".join(RUNTIMES)} (e.g. v4-32, '
    'v5p-16, v5litepod-16, v6e-8)')
# What `gcloud compute tpus tpu-vm ssh --worker` accepts.
_worker = _matching(r'all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*',
                    'all, N, N,M or N-M')
# A shell name as KEY, so that `env` cannot take the pair for an option.
_env_pair = _matching(r'[A-Za-z_][A-Za-z0-9_]*=.*', 'KEY=VALUE')
# Also an apt package name, so nothing apt could take as a flag.
_python = _matching(r'python3(\.[0-9]+)?', 'python3.X')


def _queued_id(args: argparse.Namespace) -> Optional[str]:
  """The queued resource id if --queued, else None; --qr-id alone is a slip."""
  if args.qr_id and not args.queued:
    raise LaunchError('--qr-id needs --queued')
  return (args.qr_id or args.name) if args.queued else None


def create(args: argparse.Namespace) -> List[Cmd]:
  """A TPU VM now, or (--queued) a queued resource that waits for capacity."""
  family = args.accelerator_type.split('-')[0]
  runtime = args.runtime_version or RUNTIMES[family]
  accel = f'--accelerator-type={args.accelerator_type}'
  qr_id = _queued_id(args)
  if not qr_id:
    extra = ['--spot'] if args.spot else []
    extra += ['--preemptible'] if args.preemptible else []
    return [_gcloud(args, 'tpu-vm', 'create', args.name, accel,
                    f'--version={runtime}', *extra)]
  if args.preemptible:
    raise LaunchError('queued resources take --spot, not --preemptible')
  return [_gcloud(args, 'queued-resources', 'create', qr_id,
                  f'--node-id={args.name}', accel,
                  f'--runtime-version={runtime}',
                  *(['--spot'] if args.spot else []))]


def delete(args: argparse.Namespace) -> List[Cmd]:
  """Deletes the VM; --queued: the queued resource and its VM (--force)."""
  qr_id = _queued_id(args)
  if qr_id:
    return [_gcloud(args, 'queued-resources', 'delete', qr_id, '--force',
                    '--quiet')]
  return [_gcloud(args, 'tpu-vm', 'delete', args.name, '--quiet')]


def _git_files(source: str) -> List[str]:
  """Files git would version (tracked + untracked, not ignored), minus packs.

  Respecting .gitignore keeps virtualenvs, workdirs and data off the pod.
  """
  try:
    listing = subprocess.run(
        ['git', '-C', source, 'ls-files', '-z', '--cached', '--others',
         '--exclude-standard'], capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    raise LaunchError(f'cannot list files of {source!r} with git: pack a git '
                      'work tree, or clone on the workers (setup --repo=URL)')
  files = sorted({f for f in os.fsdecode(listing).split('\0')
                  if f and not f.startswith(PACK_DIR + '/')
                  and os.path.lexists(os.path.join(source, f))})
  if not files:
    raise LaunchError(f'nothing to pack in {source!r}')
  return files


def pack(source: str, out: str) -> int:
  """Tars the files git would version; returns how many."""
  files = _git_files(source)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tar = tarfile.open(out, 'w:gz')
  except OSError as e:
    raise LaunchError(f'cannot write {out!r} ({e.filename}: {e.strerror}): '
                      'pick another output path')
  with tar:
    for f in files:
      tar.add(os.path.join(source, f), arcname=f, recursive=False)
  return len(files)


def _install(args: argparse.Namespace) -> str:
  """Installs as the Makefile does, in a venv of --python on each worker.

  The package needs Python 3.11 while TPU images ship 3.10, so apt adds it when
  missing, with its -venv (ensurepip, which `venv` needs: the image may have
  the interpreter without it); the lock timeout waits out unattended-upgrades
  of a fresh VM. jax[tpu] goes last so that libtpu matches the pinned jax.
  """
  py = args.python
  apt = ('sudo', 'apt-get', '-o', 'DPkg::Lock::Timeout=300')
  pip = (REMOTE_PYTHON, '-m', 'pip', 'install', '-q')
  return ' && '.join([
      f'({_sh(py, "-c", "import ensurepip")} > /dev/null 2>&1 || '
      f'({_sh(*apt, "update", "-q")} && '
      f'{_sh(*apt, "install", "-y", "-q", py, py + "-venv")}))',
      _sh(py, '-m', 'venv', REMOTE_VENV),
      _sh('cd', REMOTE_DIR),
      _sh(*pip, '--upgrade', 'pip'),
      _sh(*pip, '-r', 'requirements.txt'),
      _sh(*pip, '--no-deps', '-e', '.'),
      _sh(*pip, args.jax, '-f', LIBTPU_INDEX),
  ])


def setup(args: argparse.Namespace) -> List[Cmd]:
  """Puts the code on every worker (local tree or git clone) and installs it."""
  fresh = _sh('rm', '-rf', REMOTE_DIR)
  if args.repo:
    branch = [f'--branch={args.branch}'] if args.branch else []
    fetch = _sh('git', 'clone', '--depth=1', *branch, '--', args.repo,
                REMOTE_DIR)
    return [_ssh(args, ' && '.join([fresh, fetch, _install(args)]))]
  if args.branch:
    raise LaunchError('--branch needs --repo=URL (a local tree goes as it is)')
  source = os.path.abspath(args.source)
  _git_files(source)  # a bad --source fails here, in one line, before gcloud
  tarball = os.path.join(source, PACK_DIR,
                         re.sub(r'[^A-Za-z0-9_.-]', '_', args.name) + '.tar.gz')
  unpack = ' && '.join([
      fresh, _sh('mkdir', '-p', REMOTE_DIR),
      _sh('tar', '-xzf', REMOTE_TARBALL, '-C', REMOTE_DIR),
      _sh('rm', '-f', REMOTE_TARBALL)])
  return [
      [sys.executable, os.path.abspath(__file__), 'pack',
       f'--source={source}', tarball],
      _gcloud(args, 'tpu-vm', 'scp', tarball,
              f'{args.name}:{REMOTE_TARBALL}', f'--worker={args.worker}'),
      ['rm', '-f', tarball],
      _ssh(args, ' && '.join([unpack, _install(args)])),
  ]


def _active(pid_file: str) -> str:
  """Shell test: the run whose process group `pid_file` saved is alive (its id in $pgid)."""
  return (f'pgid=$(cat -- {_sh(pid_file)} 2>/dev/null) && '
          'kill -0 -- -"$pgid" 2>/dev/null')


def _check_shared(args: argparse.Namespace) -> None:
  """Refuses a local --workdir on several workers: each would write its own
  shards of every checkpoint to its own disk, none restorable. (A local
  --tfds-data-dir is fine where each worker holds a copy of the data.)"""
  if not re.fullmatch('[0-9]+', args.worker) and not args.workdir.startswith('gs://'):
    raise LaunchError(f'--workdir={args.workdir} is not on GCS, yet every worker '
                      'writes its part of each checkpoint there: use '
                      'gs://BUCKET/..., or --worker=N for a single-host TPU')


def run(args: argparse.Namespace) -> List[Cmd]:
  """Starts the training command on all workers at once, as multi-host JAX
  requires, each joining the others (--distributed: JAX finds the pod's
  workers itself).

  Either way the run leaves the ssh session (setsid, nohup, a log and a pid
  file): neither Ctrl-C, a dropped connection nor gcloud's retry of the
  command ends it or starts a second copy, and `stop` ends it. Without
  --detach the log streams until the run ends, then its exit status returns.
  """
  _check_shared(args)
  env = [f'TFDS_DATA_DIR={args.tfds_data_dir}'] if args.tfds_data_dir else []
  env += args.env
  train = (['env', *env] if env else []) + [
      REMOTE_PYTHON, '-m', args.module, '--distributed',
      f'--config={args.config}', f'--workdir={args.workdir}', *args.overrides]
  log = posixpath.join('..', args.log)  # from inside REMOTE_DIR
  pid, status = log + '.pid', log + '.status'
  # sh saves the training's exit status; its trap lets it outlive `stop`'s
  # SIGTERM to the group to do so (a caught signal resets at exec: the
  # training still gets SIGTERM).
  wrapped = ['setsid', 'nohup', 'sh', '-c',
             'trap : TERM; s=$1; shift; "$@"; echo $? > "$s"', 'sh', status,
             *train]
  # $! is the run's pid = its process group (setsid), saved for `stop`. The
  # shell that started it reaps it, so `tail --pid=$!` sees it end even where
  # no init reaps orphans.
  start = (f'cd {_sh(REMOTE_DIR)} || exit; if {_active(pid)}; then echo '
           '"tpu.py: a run is active on $(hostname) (process group $pgid): '
           'end it with tpu.py stop (same --log), or watch it with tpu.py '
           f'logs" >&2; exit 3; fi; rm -f {_sh(status)} || exit; '
           f'{_sh(*wrapped)} > {_sh(log)} 2>&1 < /dev/null & '
           f'echo $! > {_sh(pid)}')
  if args.detach:
    return [_ssh(args, start)]
  return [_ssh(args, f'{start}; tail -n +1 -F --pid=$! -- {_sh(log)}; '
               f'[ -s {_sh(status)} ] || {{ echo "tpu.py: the run on '
               '$(hostname) left no exit status (killed?)" >&2; exit 1; }; '
               f'exit "$(cat {_sh(status)})"')]


def logs(args: argparse.Namespace) -> List[Cmd]:
  """Shows a run's log (worker 0 unless --worker says otherwise)."""
  follow = ['-F'] if args.follow else []
  return [_ssh(args, _sh('tail', '-n', str(args.lines), *follow, '--',
                         args.log))]


def stop(args: argparse.Namespace) -> List[Cmd]:
  """Ends the run by SIGTERM to its process group on every worker (it saves a
  checkpoint first). The pid file stays until the run is gone, so `run` keeps
  refusing to start beside one still saving; no run is one line, exit 0."""
  pid = args.log + '.pid'
  return [_ssh(args, f'if {_active(pid)}; then kill -TERM -- -"$pgid"; else '
               'echo "tpu.py: no run is active on $(hostname): nothing to '
               f'stop" >&2; rm -f -- {_sh(pid)}; fi')]


def _pack_command(args: argparse.Namespace) -> List[Cmd]:
  """`pack` runs here, in Python: no gcloud command to print or run."""
  count = pack(args.source, args.out)
  print(f'packed {count} files into {args.out}', file=sys.stderr)
  return []


def execute(cmds: Sequence[Cmd], dry_run: bool) -> None:
  """Prints (dry run) or runs the commands in order, stopping at a failure."""
  for cmd in cmds:
    line = shlex.join(cmd)
    if dry_run:
      print(line)
      continue
    print(f'+ {line}', file=sys.stderr, flush=True)
    try:
      code = subprocess.run(cmd).returncode
    except FileNotFoundError:
      hint = (': install the Google Cloud SDK, '
              'https://cloud.google.com/sdk/docs/install'
              if cmd[0] == 'gcloud' else '')
      raise LaunchError(f'{cmd[0]} not found on PATH{hint}')
    if code:
      raise LaunchError(f'exit {code} from: {line}', code=code)


def _parser() -> argparse.ArgumentParser:
  """One subcommand per step; each TPU one takes NAME --zone --dry-run."""
  parser = _Parser(prog='tpu.py', description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  def tpu_command(name: str, fn: Step, worker: str,
                  help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=fn.__doc__)
    p.set_defaults(fn=fn)
    p.add_argument('name', type=_tpu_name, help='TPU VM name')
    p.add_argument('--zone', required=True, help='e.g. us-central2-b')
    p.add_argument('--project', help='default: gcloud config project')
    p.add_argument('--dry-run', action='store_true',
                   help='print the commands, shell-quoted, and run nothing')
    if worker:
      p.add_argument('--worker', default=worker, type=_worker,
                     help=f'all, an index, a list or range (default: {worker})')
    return p

  for name, fn, help_ in (
      ('create', create, 'create a TPU VM or queued resource'),
      ('delete', delete, 'delete it')):
    p = tpu_command(name, fn, '', help_)
    p.add_argument('--queued', action='store_true',
                   help='use a queued resource (waits for capacity)')
    p.add_argument('--qr-id', type=_tpu_name,
                   help='queued resource id (default: NAME)')
    if fn is create:
      p.add_argument('--accelerator-type', required=True,
                     type=_accelerator,
                     help='e.g. v4-32, v5p-16, v5litepod-16, v6e-8')
      p.add_argument('--runtime-version', '--version',
                     help='TPU software version (default: per generation)')
      kind = p.add_mutually_exclusive_group()
      kind.add_argument('--spot', action='store_true')
      kind.add_argument('--preemptible', action='store_true')

  p = tpu_command('setup', setup, 'all', 'copy or clone the code, install it')
  p.add_argument('--repo', help='git URL to clone on the workers instead of '
                 'copying the local tree')
  p.add_argument('--branch', help='branch or tag of --repo')
  p.add_argument('--source', default=os.path.dirname(
      os.path.dirname(os.path.abspath(__file__))),
                 help='local tree to copy (default: this checkout)')
  p.add_argument('--python', default='python3.11', type=_python,
                 help='interpreter for the venv on the workers; apt installs '
                 'it (and its -venv) when missing')
  p.add_argument('--jax', default='jax[tpu]',
                 help='pip spec of JAX for TPU, e.g. "jax[tpu]==0.10.2"')

  p = tpu_command('run', run, 'all', 'run vit_jax.main (or --module) on all workers; '
                  'arguments after -- go to it (e.g. --config.base_lr=0.1)')
  p.add_argument('--module', default='vit_jax.main', choices=TRAINING_MODULES,
                 help='the training command to run')
  p.add_argument('--config', required=True, help='e.g. configs/X.py')
  p.add_argument('--workdir', required=True,
                 help='shared by all workers, so gs://BUCKET/...')
  p.add_argument('--tfds-data-dir', help='sets TFDS_DATA_DIR, e.g. gs://B/tfds')
  p.add_argument('--env', action='append', default=[], type=_env_pair,
                 metavar='KEY=VALUE',
                 help='extra environment variable (repeatable)')
  p.add_argument('--detach', action='store_true',
                 help='return once started, not streaming the log until the '
                 'run ends')
  p.add_argument('--log', default=DEFAULT_LOG,
                 help='log file on each worker, under home')

  p = tpu_command('logs', logs, '0', 'tail the log of a run')
  p.add_argument('--log', default=DEFAULT_LOG, help='log file, under home')
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--follow', action='store_true', help='keep streaming')

  p = tpu_command('stop', stop, 'all', 'stop the run')
  p.add_argument('--log', default=DEFAULT_LOG, help='log file of the run')

  p = sub.add_parser('pack', help='tar a git work tree (what setup copies)',
                     description=_git_files.__doc__)
  p.set_defaults(fn=_pack_command, dry_run=False)
  p.add_argument('--source', default='.')
  p.add_argument('out', help='output .tar.gz')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Parses, validates, then prints or runs; errors are one stderr line."""
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides: List[str] = []
  if '--' in argv:
    cut = argv.index('--')
    argv, overrides = argv[:cut], argv[cut + 1:]
  args = _parser().parse_args(argv)
  args.overrides = overrides
  try:
    if overrides and args.command != 'run':
      raise LaunchError('only `run` takes arguments after --')
    execute(args.fn(args), args.dry_run)
  except LaunchError as e:
    print(f'tpu.py: error: {e}', file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    # Only the streaming ends: the run left the ssh session.
    goes_on = ' (a run it started goes on: tpu.py stop ends it)' if args.command == 'run' else ''
    print(f'tpu.py: interrupted{goes_on}', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
