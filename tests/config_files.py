"""The configs/ files as the tests load them: a file's `get_config`, without the CLI's flags."""
import importlib.util
from pathlib import Path

import ml_collections

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def get_config(name: str, *args) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s get_config(*args), e.g. get_config('default')."""
  spec = importlib.util.spec_from_file_location(f'{name.replace("/", "_")}_config',
                                                CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)
