"""The configs/ files as the tests load them: a file's `get_config`, or `--config` and its
overrides parsed as a command parses them."""
import importlib.util
from pathlib import Path
from typing import Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def get_config(name: str, *args) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s get_config(*args), e.g. get_config('default')."""
  spec = importlib.util.spec_from_file_location(f'{name.replace("/", "_")}_config',
                                                CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def parse_config_flag(argv: list[str], flag_values: Optional[flags.FlagValues] = None,
                      lock_config: bool = True) -> ml_collections.ConfigDict:
  """The config that `argv` (argv[0] the program) gives a command: `--config=FILE[:ARG]` and its
  `--config.KEY=VALUE` overrides, parsed into `flag_values` (a FlagValues of its own unless
  given, with whatever other flags the command defines) as config_flags parses them."""
  flag_values = flags.FlagValues() if flag_values is None else flag_values
  flag = config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                         lock_config=lock_config, sys_argv=argv)
  flag_values(argv)
  return flag.value
