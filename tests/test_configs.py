"""The paper's pre-training configs: load as the CLI does, build abstractly, Table 3 values."""
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import config_files
import imports
from vit_jax import models
from vit_jax.data import pp_options
from vit_jax import errors
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import finetune
from vit_jax.training import recipes

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# config file -> (model, hidden, mlp, layers, patch)
CONFIGS = {
    'vit_ti16': ('ViT-Ti_16', 192, 768, 12, 16),
    'vit_s16': ('ViT-S_16', 384, 1536, 12, 16),
    'vit_b16': ('ViT-B_16', 768, 3072, 12, 16),
    'vit_b32': ('ViT-B_32', 768, 3072, 12, 32),
    'vit_l16': ('ViT-L_16', 1024, 4096, 24, 16),
    'vit_l32': ('ViT-L_32', 1024, 4096, 24, 32),
    'vit_h14': ('ViT-H_14', 1280, 5120, 32, 14),
    'r50_vit_b16': ('R50+ViT-B_16', 768, 3072, 12, 16),
}
# Exact counts with a 1000-class head and no pre-logits (tests/test_models.py checks the zoo
# against the same figures): anchors for the formula below and for the hybrid.
PAPER_COUNTS = {'ViT-Ti_16': 5_717_416, 'ViT-S_16': 22_050_664, 'ViT-B_16': 86_567_656,
                'ViT-L_16': 304_326_632, 'ViT-H_14': 632_045_800, 'R50+ViT-B_16': 98_659_112}
# Table 3 (the ImageNet-21k rows: 90 epochs for B, 30 for L; H and the small ones as documented).
EPOCHS_21K = {'vit_ti16': 90, 'vit_s16': 90, 'vit_b16': 90, 'vit_b32': 90, 'r50_vit_b16': 90,
              'vit_l16': 30, 'vit_l32': 30, 'vit_h14': 30}


def _load(name: str, arg=None):
  """Exactly what `--config=configs/NAME.py[:ARG]` gives main (config_flags, locked)."""
  argv = ['main', f'--config={os.path.join(CONFIGS_DIR, name)}.py' + (f':{arg}' if arg else '')]
  return config_files.parse_config_flag(argv)


def _vit_params(hidden, mlp, layers, patch, num_classes, representation_size=None,
                image_size=224, channels=3):
  tokens = (image_size // patch) ** 2 + 1
  block = 4 * hidden + 4 * (hidden * hidden + hidden) + 2 * hidden * mlp + mlp + hidden
  count = (patch * patch * channels * hidden + hidden  # embedding
           + hidden + tokens * hidden  # cls, pos_embedding
           + layers * block + 2 * hidden)  # blocks, encoder_norm
  width = representation_size or hidden
  if representation_size:
    count += hidden * width + width
  return count + width * num_classes + num_classes


def test_param_formula_matches_the_paper_counts():
  for name, (model, hidden, mlp, layers, patch) in CONFIGS.items():
    if model in PAPER_COUNTS and not model.startswith('R50'):
      assert _vit_params(hidden, mlp, layers, patch, 1000) == PAPER_COUNTS[model], name


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('dataset', ['imagenet21k', 'imagenet2012'])
def test_config_loads_and_builds_with_the_right_param_count(name, dataset):
  config = _load(name, dataset)
  model, hidden, mlp, layers, patch = CONFIGS[name]
  assert config.model == model
  exp = experiment.build(config)  # num_classes from the config: no dataset is read.
  num_classes = {'imagenet21k': 21_843, 'imagenet2012': 1000}[dataset]
  assert exp.num_classes == num_classes
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
  if model.startswith('R50'):
    # The hybrid: its 1000-class count, plus pre-logits, plus the bigger head.
    expected = (PAPER_COUNTS[model] + hidden * hidden + hidden
                + (num_classes - 1000) * (hidden + 1))
  else:
    expected = _vit_params(hidden, mlp, layers, patch, num_classes, representation_size=hidden)
  assert count == expected
  params = exp.abstract_state.params
  assert params['pre_logits']['kernel'].shape == (hidden, hidden)
  assert params['head']['kernel'].shape == (hidden, num_classes)
  # Built abstractly: shapes with shardings, nothing allocated.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(exp.abstract_state))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_imagenet21k_recipe_is_table_3(name):
  config = _load(name, 'imagenet21k')
  assert config.dataset == 'imagenet21k'
  assert (config.train_split, config.eval_split) == ('train[:98%]', 'train[98%:]')
  assert config.num_classes == 21_843
  assert config.batch == 4096 and config.image_size == 224 and config.channels == 3
  assert config.optimizer == 'adam' and (config.b1, config.b2) == (0.9, 0.999)
  assert config.warmup_steps == 10_000
  assert config.base_lr == 1e-3 and config.decay_type == 'linear'
  assert config.weight_decay == 0.03
  assert not config.grad_norm_clip
  assert config.model_overrides.dropout_rate == 0.1
  assert config.model_overrides.representation_size == CONFIGS[name][1]
  assert config.model_overrides.head_bias_init == -10.0
  assert config.loss == 'sigmoid_xent'
  assert config.total_steps == math.ceil(EPOCHS_21K[name] * 13_913_180 / 4096)
  assert config.mesh == 'data:-1' and config.dtype == 'bfloat16'
  assert config.pp.train.crop == 'inception' and config.pp.train.flip
  assert config.pp.eval.crop == 'resize_crop'


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_imagenet2012_recipe_is_table_3(name):
  config = _load(name, 'imagenet2012')
  assert config.dataset == 'imagenet2012'
  assert (config.train_split, config.eval_split) == ('train', 'validation')
  assert config.num_classes == 1000
  assert config.batch == 4096 and config.image_size == 224
  assert config.optimizer == 'adam' and (config.b1, config.b2) == (0.9, 0.999)
  assert config.warmup_steps == 10_000
  assert config.base_lr == 3e-3 and config.decay_type == 'cosine'
  assert config.weight_decay == 0.3 and config.grad_norm_clip == 1.0
  assert config.model_overrides.dropout_rate == 0.1
  assert config.model_overrides.representation_size == CONFIGS[name][1]
  assert config.model_overrides.head_bias_init == 0.0
  assert config.loss == 'softmax_xent'
  assert config.total_steps == 93_836  # ceil(300 * 1,281,167 / 4096)
  assert config.mesh == 'data:-1' and config.dtype == 'bfloat16'


def test_recipe_schedule_warms_up_then_decays():
  config = _load('vit_b16', 'imagenet21k')
  exp = experiment.build(config)
  lr = lambda step: float(exp.schedule(step))
  assert lr(0) == 0.0
  assert lr(5000) == pytest.approx(5e-4)
  assert lr(10_000) == pytest.approx(1e-3)
  midpoint = 10_000 + (config.total_steps - 10_000) // 2
  assert lr(midpoint) == pytest.approx(5e-4, rel=1e-3)  # Linear decay to 0.
  assert lr(config.total_steps) == pytest.approx(0.0, abs=1e-9)


def test_default_argument_is_imagenet2012():
  assert _load('vit_b16').dataset == 'imagenet2012'


def test_overrides_apply_on_top_of_the_recipe():
  argv = ['main', f'--config={CONFIGS_DIR}/vit_l16.py:imagenet21k', '--config.batch=512',
          '--config.grad_norm_clip=1.0', '--config.model_overrides.dropout_rate=0.0']
  config = config_files.parse_config_flag(argv)
  assert config.batch == 512 and config.grad_norm_clip == 1.0
  assert config.model_overrides.dropout_rate == 0.0


@pytest.mark.parametrize('name', ['default', 'vit_ti16'])
def test_scan_and_remat_can_be_set_from_the_command_line(name):
  """The model options the README names as flags exist in the configs, so they can be set."""
  argv = ['main', f'--config={CONFIGS_DIR}/{name}.py', '--config.model_overrides.scan=True',
          '--config.model_overrides.remat=dots']
  config = config_files.parse_config_flag(argv)
  model = experiment.build(config, num_classes=10).model
  assert model.scan and model.remat == 'dots'


@pytest.mark.parametrize('opener', ['open', '__import__("tensorflow").io.gfile.GFile'])
def test_a_full_disk_is_one_line(opener):
  """Python's and tf.io.gfile's (config.json, metrics.jsonl) ENOSPC: it was a traceback. Linux's
  /dev/full takes no byte."""
  proc = subprocess.run([sys.executable, '-c', (
      'from vit_jax.errors import cli_main\n'
      'def write():\n'
      f'  with {opener}("/dev/full", "w") as f:\n'
      '    f.write("x")\n'
      'cli_main(write)()')], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1].startswith('error: no space left on the device (')
  assert proc.stderr.rstrip().endswith(
      'free disk space, or pass another path, then run again (a training run resumes)')


@pytest.mark.parametrize('error, first_line, summary', [
    (ValueError('Unrecognized name:\n  foo\n  bar'), 'Unrecognized name',
     'ValueError: Unrecognized name'),
    (EOFError(), 'EOFError', 'EOFError'),
    (KeyError('blocks.0'), "'blocks.0'", "KeyError: 'blocks.0'"),
])
def test_a_library_error_is_quoted_by_its_first_line(error, first_line, summary):
  """What every one-line error quotes of the library error behind it."""
  assert errors.first_line(error) == first_line
  assert errors.summary(error) == summary


@pytest.mark.parametrize('config_arg', ['default.py', 'vit_b16.py', 'finetune/digits.py'])
def test_data_dir_can_be_given_on_the_command_line(config_arg, tmp_path):
  """Unset it is None (TFDS_DATA_DIR); as a flag it reaches the config (it was an untyped None)."""
  argv = ['main', f'--config={CONFIGS_DIR}/{config_arg}']
  config = config_files.parse_config_flag(argv)
  assert config.data_dir is None
  argv.append(f'--config.data_dir={tmp_path}')
  config = config_files.parse_config_flag(argv)
  assert config.data_dir == str(tmp_path) and config.get('data_dir') == str(tmp_path)


@pytest.mark.parametrize('flags_given', [False, True])
def test_finetune_compute_options_default_to_the_checkpoints(flags_given):
  """Unset (None), scan / remat come from the pre-trained run; given as flags, they win."""
  argv = ['finetune', f'--config={CONFIGS_DIR}/finetune/digits.py']
  if flags_given:
    argv += ['--config.model_overrides.scan=False', '--config.model_overrides.remat=dots',
             '--config.model_overrides.dropout_rate=0.2']
  config = config_files.parse_config_flag(argv)
  checkpoints = {'scan': True, 'remat': 'full', 'dropout_rate': 0.1}
  overrides = finetune.with_architecture(config, 'ViT-Mu_4', checkpoints, 1).model_overrides
  expected = {'scan': False, 'remat': 'dots'} if flags_given else {'scan': True, 'remat': 'full'}
  assert {k: overrides[k] for k in expected} == expected
  # Pre-training's dropout is not inherited; the fine-tune's own is set like the rest.
  assert overrides.get('dropout_rate') == (0.2 if flags_given else None)


def test_a_finetune_config_trained_from_scratch_builds_the_models_defaults():
  """Its None overrides mean the checkpoint's; without one (vit_jax.main), the model's own: a
  dropout rate of None failed in the first training step."""
  config = config_files.get_config('finetune/digits')
  with pytest.raises(ConfigError, match=r'^config.model is not set: pass --config.model=<name>'):
    experiment.build(config, num_classes=10)  # It leaves the model to the checkpoint.
  config.model = 'ViT-Mu_4'  # As its docstring trains it from scratch.
  model = experiment.build(config, num_classes=10).model
  default = models.create(config.model, num_classes=10)
  for option in ('dropout_rate', 'scan', 'remat', 'attention_impl'):
    assert getattr(model, option) == getattr(default, option), option
  config.model_overrides.dropout_rate = 0.2
  assert experiment.build(config, num_classes=10).model.dropout_rate == 0.2


@pytest.mark.parametrize('arg', ['imagenet', 'jft300m', 'imagenet21k,extra'])
def test_bad_argument_is_a_config_error(arg):
  with pytest.raises(ConfigError, match=r'use :imagenet21k or :imagenet2012'):
    config_files.get_config('vit_b16', arg)
  # Through config_flags (what the CLI does) the same one-line message surfaces.
  with pytest.raises(Exception, match=r'use :imagenet21k or :imagenet2012'):
    _load('vit_b16', arg)


@pytest.mark.parametrize('model,image_size', [('ViT-L_16', 512), ('ViT-H_14', 518)])
def test_imagenet_finetune_argument_gives_table_2_s_high_resolution_polyak_recipe(model,
                                                                                  image_size):
  config = config_files.get_config('finetune/imagenet2012', model)
  assert (config.model, config.image_size, config.polyak_decay) == (model, image_size, 0.9999)
  exp = experiment.build(finetune.with_architecture(config, model, {}, 3), num_classes=1000)
  # A 32x32 (L/16) or 37x37 (H/14) patch grid, and the class token.
  assert (image_size // exp.model.patch_size[0]) ** 2 + 1 == exp.abstract_state.params[
      'Transformer']['posembed_input']['pos_embedding'].shape[1]
  assert jax.tree.structure(exp.abstract_state.averaged_params) == jax.tree.structure(
      exp.abstract_state.params)
  # Without the argument: Table 4's recipe, no averaging; another argument is a ConfigError.
  assert config_files.get_config('finetune/imagenet2012').polyak_decay == 0.0
  with pytest.raises(ConfigError, match=r"imagenet2012.py:ViT-B_16 is not one of \['ViT-L_16'"):
    config_files.get_config('finetune/imagenet2012', 'ViT-B_16')


def test_steps_for_rounds_up():
  assert recipes.steps_for(300, 1_281_167) == 93_836
  assert recipes.steps_for(1, 4096) == 1 and recipes.steps_for(1, 4097) == 2


def test_cli_runs_a_paper_config_up_to_the_missing_dataset(tmp_path):
  """`python -m vit_jax.main --config=configs/vit_b16.py:imagenet2012` builds the model, then
  stops on the unprepared dataset with one line (and exit code 2) before compiling anything."""
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--config={CONFIGS_DIR}/vit_b16.py:imagenet2012',
       f'--workdir={tmp_path / "run"}'], cwd=os.path.dirname(CONFIGS_DIR), env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.rstrip().splitlines()[-1]
  assert last.startswith("error: dataset 'imagenet2012' is not prepared in "), last
  assert 'python -m vit_jax.datasets prepare imagenet2012 --data_dir=' in last
  assert not (tmp_path / 'run').exists()  # Nothing written before the check.


@pytest.mark.parametrize('flags_given, expected', [
    (['--config=configs/vit_b16.py:bogus'],
     "error: config argument 'bogus' is not a pre-training dataset: use :imagenet21k"),
    (['--config=configs/no_such.py'], 'error: --config=configs/no_such.py: no such config file'),
    (['--config=configs/default.py', '--config.batchh=8'], "error: unknown config key 'batchh'"),
    # Names from other trainers (ml_collections alone would suggest accum_steps here).
    (['--config=configs/default.py', '--config.num_steps=8'],
     "error: unknown config key 'num_steps': here it is --config.total_steps"),
    (['--config=configs/finetune/imagenet2012.py', '--config.ema_decay=0.9999'],
     "error: unknown config key 'ema_decay': here it is --config.polyak_decay"),
    # The paper recipes' epochs were a key that changed nothing.
    (['--config=configs/vit_b16.py:imagenet21k', '--config.epochs=30'],
     "error: unknown config key 'epochs': here it is --config.total_steps (steps, not epochs)"),
    (['--config=configs/default.py', '--config.batch=many'],
     "error: flag --config.batch=many: invalid literal for int()"),
    # A stray word (here a subcommand another trainer has) was absl's whole help text.
    (['--config=configs/default.py', 'train'],
     "error: unexpected arguments ['train']: flags take the form --name=value"),
])
def test_cli_flag_mistakes_are_one_line(tmp_path, flags_given, expected):
  module = 'vit_jax.finetune' if 'finetune' in flags_given[0] else 'vit_jax.main'
  proc = subprocess.run(
      [sys.executable, *imports.IMPORTTIME, '-m', module, *flags_given,
       f'--workdir={tmp_path / "run"}'],
      cwd=os.path.dirname(CONFIGS_DIR), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1].startswith(expected), proc.stderr[-500:]
  assert not (tmp_path / 'run').exists()
  # Said before TensorFlow loads (the fine-tuning configs imported it: ~9 s for a typo).
  assert not imports.imported(proc.stderr, 'tensorflow')


def test_a_batch_too_large_for_the_device_is_one_line():
  """As bench --config=configs/vit_s16.py without --config.batch (the recipe's 4096) was: XLA's
  RESOURCE_EXHAUSTED traceback."""
  proc = subprocess.run([sys.executable, '-c', (
      'import jax, jax.numpy as jnp\n'
      'from vit_jax.errors import cli_main\n'
      'cli_main(lambda: jax.jit(lambda x: jnp.ones(2**38) + x)(1.0).block_until_ready())()')],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1] == (
      'error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.): '
      "lower the batch (--config.batch or --config.batch_eval; infer's --batch_size, fewshot's "
      '--batch); python -m vit_jax.plan tells what fits a device')


@pytest.mark.parametrize('name,arg', [
    ('default', None), ('vit_b16', 'imagenet21k'), ('r50_vit_b16', 'imagenet2012'),
    ('finetune/digits', None), ('finetune/cifar10', None), ('finetune/vtab', 'caltech101'),
    ('finetune/imagenet2012', 'ViT-L_16'), ('finetune/fashion_mnist_56px', None)])
def test_every_key_of_the_configs_is_read(name, arg):
  assert set(_load(name, arg)) <= experiment.CONFIG_KEYS


def test_a_config_files_misspelt_key_is_an_error():
  # Both ran with the defaults (eval_every 1000; base_lr) without a word.
  config = config_files.get_config('default')
  config.eval_evry, config.lr = 100, 0.1
  with pytest.raises(ConfigError, match=r'^config has keys nothing reads: eval_evry, lr \(here: '
                     r'base_lr\): rename them'):
    experiment.check_config(config)


def test_a_full_disk_under_xla_is_not_called_out_of_memory(capsys):
  # The profiler's trace on a full disk: XLA's RESOURCE_EXHAUSTED said "lower the batch".
  jax_runtime_error = type('JaxRuntimeError', (RuntimeError,), {})

  def write_trace():
    raise jax_runtime_error('RESOURCE_EXHAUSTED: /w/profile/t.xplane.pb; No space left on device')

  with pytest.raises(SystemExit) as exit_:
    errors.cli_main(write_trace)()
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith('error: no space left on the device (RESOURCE_EXHAUSTED:')


@pytest.mark.parametrize('config_arg', ['default.py', 'vit_b16.py', 'finetune/digits.py'])
def test_every_pp_option_can_be_set_on_the_command_line(config_arg):
  """They were unknown keys (only crop and flip were in the configs). The file's own choices
  stay (digits: random_crop, no flip) and unset RandAugment is None."""
  argv = ['main', f'--config={CONFIGS_DIR}/{config_arg}']
  given = ['--config.pp.train.mixup=0.2', '--config.pp.train.randaug=(2, 15)',
           '--config.pp.train.inception_area_min=0.08', '--config.pp.train.shuffle_buffer=1000',
           '--config.pp.eval.crop=resize_crop']
  values = []
  for args in ([], given):
    config = config_files.parse_config_flag(argv + args)
    values.append(pp_options.train_options(config.pp.train) | {
        'eval_crop': pp_options.eval_options(config.pp.eval)['crop']})
  unset, set_ = values
  assert unset['randaug'] is None and unset['mixup'] == 0.0
  assert set_ == unset | dict(mixup=0.2, randaug=(2, 15.0), inception_area_min=0.08,
                              shuffle_buffer=1000, eval_crop='resize_crop')
  if config_arg.startswith('finetune/digits'):
    assert (set_['crop'], set_['flip'], set_['random_crop_pad']) == ('random_crop', False, 2)
