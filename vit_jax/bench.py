"""Throughput and MFU of the real step:
`python -m vit_jax.bench --config=configs/vit_s16.py --config.batch=16` (the recipe's 4096 is a
pod's: `python -m vit_jax.plan` tells what fits a device).

  --what=train (default) | eval | data;  --steps=N timed steps (batches for data);  --json;
  --profile_dir=DIR: a trace of a few more steps (TensorBoard's profile plugin / XProf read it)
  and the step's top ops by time, by model scope.
The config's dataset decides the class count unless `config.num_classes` or --num_classes is set
(--num_classes=10 times configs/default.py without preparing Fashion-MNIST).
"""
import json

from absl import flags
from ml_collections import config_flags

from vit_jax.errors import ConfigError, check_no_arguments, quiet_unless_verbose, run_cli
from vit_jax.models import matmul
from vit_jax.training import benchmark
from vit_jax.training import profiling
from vit_jax.training.experiment import build

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=False)
_WHAT = flags.DEFINE_enum('what', 'train', benchmark.WHATS, 'What to time.')
_STEPS = flags.DEFINE_integer(
    'steps', None, 'Timed steps after warm-up (default 20); with --what=data, timed batches '
    '(default 50).', lower_bound=1)
_WARMUP = flags.DEFINE_integer(
    'warmup', 3, 'Untimed steps after compiling (train, eval); the peak memory is read after '
    'them, before the matmul peak is measured.', lower_bound=1)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', None, 'Trace --profile_steps steps after the timed ones into this folder.')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'Steps in the trace.', lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'Head size; default: config.num_classes, else the dataset\'s.',
    lower_bound=1)
flags.mark_flags_as_required(['config'])


def _print_table(result: dict) -> None:
  top_ops = result.pop('top_ops', None)
  width = max(len(k) for k in result)
  for key, value in result.items():
    text = f'{value:,.4g}' if isinstance(value, float) else str(value)
    print(f'{key:<{width}}  {text}')
  if top_ops:
    print(f'\nTop ops per traced step (op time summed over devices and threads; on CPU each '
          f"scope's median over the steps):\n{profiling.format_summary(top_ops)}")


def main(argv: list[str]) -> None:
  check_no_arguments(argv)
  config = _CONFIG.value
  quiet_unless_verbose()  # Its result is what it prints.
  step_flags = [f'--{name}' for name in ('profile_dir', 'profile_steps', 'warmup', 'num_classes')
                if flags.FLAGS[name].present]
  if _WHAT.value == 'data' and step_flags:
    raise ConfigError(f'--what=data times the input pipeline alone: drop {", ".join(step_flags)} '
                      '(for --what=train or eval)')
  if flags.FLAGS['profile_steps'].present and not _PROFILE_DIR.value:
    raise ConfigError('--profile_steps counts the steps traced into --profile_dir: pass that too')
  if _PROFILE_DIR.value:  # Before compiling, not after every step has run.
    profiling.check_logdir(_PROFILE_DIR.value)
  if _WHAT.value == 'data':
    result = benchmark.bench_data(config, batches=_STEPS.value or 50)
  else:
    exp = build(config, num_classes=_NUM_CLASSES.value)
    matmul.warn_of_slow_bfloat16(exp.model.dtype)
    result = benchmark.bench_step(exp, _WHAT.value,
                                  steps=_STEPS.value or 20, warmup=_WARMUP.value,
                                  profile_dir=_PROFILE_DIR.value,
                                  profile_steps=_PROFILE_STEPS.value)
  if _JSON.value:
    print(json.dumps(result))
  else:
    _print_table(result)


if __name__ == '__main__':
  run_cli(main)
