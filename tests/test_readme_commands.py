"""The README's `python -m vit_jax.bench` commands parse as the CLI parses them and build their
experiments, so that a renamed flag or config key cannot leave the Performance table's commands
stale (they are too slow to run here)."""
import copy
import re
import shlex
from pathlib import Path

import pytest
from absl import flags

import config_files
from vit_jax import bench  # Defines the bench's flags on absl's FLAGS.
from vit_jax.training import experiment

ROOT = Path(__file__).resolve().parents[1]
BENCH = ['python', '-m', 'vit_jax.bench']


def shell_commands(markdown: str) -> list[list[str]]:
  """The argv of every command in the shell code blocks, continuation lines joined and comments
  dropped."""
  blocks = re.findall(r'^```(?:sh|bash)\n(.*?)^```', markdown, re.DOTALL | re.MULTILINE)
  return [argv for block in blocks for line in block.replace('\\\n', ' ').splitlines()
          if (argv := shlex.split(line, comments=True))]


def parse_bench_command(argv: list[str]) -> flags.FlagValues:
  """The bench's flags parsed from `argv` (without `python -m vit_jax.bench`), config overrides
  applied, in a FlagValues of their own; absl's error if a flag or config key is unknown."""
  values = flags.FlagValues()
  for flag in flags.FLAGS.get_flags_for_module(bench.__name__):
    if flag.name != 'config':
      values[flag.name] = copy.deepcopy(flag)
  config_files.parse_config_flag(['bench', *argv], values, lock_config=False)
  return values


README_BENCH_COMMANDS = [argv[len(BENCH):]
                         for argv in shell_commands((ROOT / 'README.md').read_text())
                         if argv[:len(BENCH)] == BENCH]


def test_the_readme_has_its_bench_commands():
  # The Performance table's four float32 rows and the accelerator's two (train, eval).
  assert len(README_BENCH_COMMANDS) >= 6
  assert any('--config.weight_decay=0.0' in argv for argv in README_BENCH_COMMANDS)


@pytest.mark.parametrize('argv', README_BENCH_COMMANDS, ids=' '.join)
def test_readme_bench_command_builds_its_experiment(argv, monkeypatch):
  monkeypatch.chdir(ROOT)  # The commands name configs/ from the repository root.
  values = parse_bench_command(argv)
  exp = experiment.build(values.config, num_classes=values.num_classes)
  for arg in argv:  # Each override reached the config the experiment was built from.
    if match := re.fullmatch(r'--config\.([\w.]+)=(\S+)', arg):
      node = values.config
      for key in match.group(1).split('.'):
        node = node[key]
      assert str(node) == match.group(2), arg
  assert exp.flops_per_image > 0


@pytest.mark.parametrize('arg, error', [('--config.weightdecay=0.0', AttributeError),
                                        ('--num_class=10', flags.UnrecognizedFlagError)])
def test_a_misspelled_flag_or_config_key_is_refused(arg, error, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(error, match=arg[2:].split('=')[0].split('.')[-1]):
    parse_bench_command(['--config=configs/default.py', arg])
