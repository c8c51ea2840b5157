"""The pod planner: its memory figures against a count done by hand, its batch search, the CLI.

The independent count: a ViT's parameters from its shape alone (the formula below, not the
model code), x 4 bytes (float32 params), / the fsdp shards; Adam holds two float32 moments per
parameter; the step's arguments are params + moments + the device's slice of the batch, and
donation makes params + moments alias the outputs.
"""
import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

import config_files
from vit_jax.errors import ConfigError
from vit_jax.models.registry import SIZES
from vit_jax.training import planner
from vit_jax.training import recipes

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.10


def vit_params(size: str, patch: int, image: int, channels: int, classes: int,
               representation: int = 0) -> int:
  """Parameters of a plain ViT (class token, learnt posemb), counted from its shape."""
  hidden, mlp, _, layers = SIZES[size]
  tokens = (image // patch)**2 + 1
  block = (4 * (hidden * hidden + hidden)  # q, k, v, out.
           + 2 * hidden * mlp + mlp + hidden  # MLP.
           + 4 * hidden)  # Two LayerNorms.
  head_in = representation or hidden
  return (patch * patch * channels * hidden + hidden  # Patch embedding.
          + hidden + tokens * hidden  # Class token, position embeddings.
          + layers * block + 2 * hidden  # Encoder and its final LayerNorm.
          + (representation * hidden + representation if representation else 0)
          + head_in * classes + classes)


def check_memory(p: planner.Plan, count: int, fsdp: int, image: int, channels: int) -> None:
  """The planner's per-device figures against params x bytes / shards, within 10%."""
  params = 4 * count / fsdp
  batch = p.per_device_batch * (image * image * channels * 4 + 4)
  assert p.num_params == count
  assert p.params_bytes == pytest.approx(params, rel=WITHIN)
  assert p.opt_state_bytes == pytest.approx(2 * params, rel=WITHIN)
  assert p.batch_bytes == batch
  assert p.memory.argument == pytest.approx(3 * params + batch, rel=WITHIN)
  assert p.memory.alias == pytest.approx(3 * params, rel=WITHIN)  # The state is donated.
  assert p.memory.temp > 0 and p.memory.peak >= p.memory.argument


def default_config(**overrides) -> ml_collections.ConfigDict:
  config = config_files.get_config('default')
  config.update(dict(dict(num_classes=10, batch=64, batch_eval=64), **overrides))
  return config


# The tests' model where its kind does not matter: the default's hybrid stem compiles 2x longer.
TINY_MODEL = 'ViT-Pico_4'


def run_plan(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'vit_jax.plan', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize('mesh,fsdp', [('data:-1', 1), ('data:2,fsdp:4', 4)])
def test_tiny_vit_memory_matches_the_count(mesh, fsdp):
  p = planner.plan(default_config(model=TINY_MODEL, mesh=mesh), search=False)
  assert p.devices == 8 and p.mesh == {'data': 8 // fsdp, 'fsdp': fsdp, 'tensor': 1}
  assert p.per_device_batch == 64 // 8
  check_memory(p, vit_params('Pico', 4, 28, 1, 10), fsdp, 28, 1)
  assert p.xla_flops_per_step == pytest.approx(p.model_flops_per_step, rel=0.15)


def test_a_tensor_axis_does_not_multiply_the_batch():
  # data:2,tensor:4 on the 8 devices: 2 data-parallel slices, so a per-device batch of 8 is a
  # global 16 (not 64), and room for 20 a device a global 40.
  compiler = planner.Compiler(default_config(mesh='data:2,tensor:4'), num_classes=10)
  assert compiler.build(8).config.batch == 16
  plan = planner.Plan(
      model='ViT-Mu_4', devices=8, platform='cpu', mesh={'data': 2, 'fsdp': 1, 'tensor': 4},
      batch=16, per_device_batch=8, accum_steps=1, num_params=1, params_bytes=1,
      opt_state_bytes=1, batch_bytes=1, memory=planner.StepMemory(8, 1, 1, 0, 1, 1),
      model_flops_per_step=1., xla_flops_per_step=1., max_per_device_batch=20)
  assert plan.max_batch == 40


def test_a_polyak_average_is_one_more_copy_of_the_params():
  plain = planner.plan(default_config(model=TINY_MODEL, mesh='data:2,fsdp:4'), search=False)
  averaged = planner.plan(default_config(model=TINY_MODEL, mesh='data:2,fsdp:4',
                                         polyak_decay=0.9999), search=False)
  assert plain.averaged_params_bytes == 0 and 'Polyak' not in planner.format_plan(plain)
  assert averaged.averaged_params_bytes == averaged.params_bytes == plain.params_bytes
  assert f'Polyak average   {planner._gib(averaged.params_bytes)}' in planner.format_plan(averaged)
  # The compiled step takes it as one more argument, updated in place (donated); its output
  # buffers grow by as much, give or take their alignment.
  extra = averaged.params_bytes
  assert averaged.memory.argument == plain.memory.argument + extra
  assert averaged.memory.alias == plain.memory.alias + extra
  assert averaged.memory.output - plain.memory.output == pytest.approx(extra, rel=0.01)


def test_a_mesh_that_cannot_split_the_heads_says_so():
  """ViT-Pico has 4 heads: tensor:8 splits its MLP (512 wide) but leaves q/k/v/out whole on
  every device, which the plan names with their bytes (6 layers x 7 arrays: q, k, v kernels
  and biases, out kernel; 3 x (128 x 128 + 128) + 128 x 128 floats a layer)."""
  p = planner.plan(default_config(model=TINY_MODEL, mesh='data:1,tensor:8'), search=False)
  per_layer = (3 * (128 * 128 + 128) + 128 * 128) * 4
  assert p.unsplit_note == (
      f'not split, kept whole on every device: heads (4) over tensor=8 in 42 arrays '
      f'({6 * per_layer / 2**20:.1f} MiB): pick mesh sizes that divide these dims')
  assert 'params not split' in planner.format_plan(p)
  assert planner.plan(default_config(model=TINY_MODEL, mesh='data:2,tensor:4'),
                      search=False).unsplit_note == ''


def test_mixup_plans_soft_labels_and_bad_pp_is_a_config_error():
  p = planner.plan(default_config(model=TINY_MODEL, pp={'train': {'mixup': 0.2}}),
                   search=False)
  assert p.batch_bytes == p.per_device_batch * (28 * 28 * 1 * 4 + 10 * 4)  # float32 [B, 10].
  config = default_config(model=TINY_MODEL)
  config.pp = {'train': 'inception'}
  with pytest.raises(ConfigError, match=r'pp.train=.inception.: pp.train holds options'):
    planner.plan(config, search=False)


def test_vit_b16_on_8_devices_matches_the_count():
  config = recipes.pretrain_config('ViT-B_16', 'imagenet21k')
  p = planner.plan(config, device_memory_gib=32, peak_tflops=275, search=False)
  check_memory(p, vit_params('B', 16, 224, 3, 21843, representation=768), 1, 224, 3)
  assert p.num_params == 103_186_515
  assert p.xla_flops_per_step == pytest.approx(p.model_flops_per_step, rel=0.15)
  assert p.step_seconds == pytest.approx(p.model_flops_per_step / (8 * 275e12 * 0.5))
  assert p.total_days == pytest.approx(p.step_seconds * config.total_steps / 86400)
  assert p.fits == (p.memory.peak <= 32 * 2**30)
  assert 'XLA:CPU computes bfloat16 in float32' in p.memory_note


def test_remat_without_scan_saves_nothing_on_cpu_and_the_plan_says_so():
  """XLA:CPU recomputes an unrolled model's layers before its backward pass (read in the
  schedule), so remat's saving shows only with scan; the note goes when jax changes that."""
  plans = {(scan, remat): planner.plan(default_config(
      model=TINY_MODEL, model_overrides={'scan': scan, 'remat': remat}), search=False)
           for scan, remat in [(False, 'none'), (False, 'full'), (True, 'full')]}
  temp = {key: p.memory.temp for key, p in plans.items()}
  assert temp[False, 'full'] > 0.9 * temp[False, 'none']  # 145 MB either way (jax 0.10.2).
  assert temp[True, 'full'] < 0.5 * temp[False, 'none']  # 38 MB.
  assert "remat='full' without scan saves no memory" in plans[False, 'full'].memory_note
  assert plans[False, 'none'].memory_note == plans[True, 'full'].memory_note == ''


class FakeCompiler:
  """Peak memory as a given function of the per-device batch, without compiling."""

  def __init__(self, peak):
    self.peak, self.batches = peak, []

  def compile(self, batch: int):
    self.batches.append(batch)
    return None, None, planner.StepMemory(batch, 0, 0, 0, self.peak(batch), 0)


@pytest.mark.parametrize('peak,capacity,multiple,best,confirmed', [
    (lambda b: 1000 + 100 * b, 5050, 1, 40, True),  # Linear: the first prediction is right.
    (lambda b: 1000 + 100 * b, 5050, 4, 40, True),
    (lambda b: 1000 + 100 * b + b * b / 2, 20_000, 1, 119, True),  # Curved: refined.
    (lambda b: 1000 + 100 * b + 3 * b * b, 20_000, 1, 64, False),  # Out of refines.
    (lambda b: 1000 + 100 * b, 1500, 1, 5, True),  # The configured batch does not fit.
    (lambda b: 10**9 + b, 1500, 1, 0, False),  # Nothing fits.
])
def test_batch_search_finds_the_largest_fitting_multiple(peak, capacity, multiple, best,
                                                         confirmed):
  compiler = FakeCompiler(peak)
  found, note = planner.largest_batch(compiler, compiler.compile(8)[2], capacity, multiple)
  assert found == best and found % multiple == 0
  assert len(compiler.batches) <= 2 + planner.MAX_REFINES
  assert (f'{best + multiple} does not' in note) == confirmed
  assert ('not compiled' in note) == (bool(best) and not confirmed)


def test_batch_search_from_the_smallest_batch_that_overflows():
  compiler = FakeCompiler(lambda b: 10**9 + b)
  assert planner.largest_batch(compiler, compiler.compile(2)[2], 1500, 2)[0] == 0
  assert compiler.batches == [2]


@pytest.mark.slow
def test_largest_batch_is_the_boundary_between_fit_and_overflow():
  config = default_config(accum_steps=2)
  small = planner.plan(config, search=False).memory.peak
  capacity_gib = 3 * small / 2**30  # Room for a few times the configured batch.
  p = planner.plan(config, device_memory_gib=capacity_gib)
  best, capacity = p.max_per_device_batch, int(capacity_gib * 2**30)
  assert p.fits and best > p.per_device_batch and best % 2 == 0  # A multiple of accum_steps.
  assert f'{best + 2} does not' in p.max_batch_note
  assert p.as_dict()['max_batch'] == best * p.batch // p.per_device_batch
  compiler = planner.Compiler(config, 10)
  assert compiler.compile(best)[2].peak <= capacity < compiler.compile(best + 2)[2].peak
  assert 'loop body once' in p.xla_flops_note  # The accumulation scan.


def test_cli_simulates_the_devices_it_is_asked_for_and_prints_json():
  # pytest's own XLA_FLAGS say 8 devices; the command must replace that before jax starts.
  result = run_plan('--config=configs/default.py', f'--config.model={TINY_MODEL}', '--devices=4',
                    '--num_classes=10', '--config.batch_eval=64', '--json', '--nomax_batch',
                    '--device_memory_gib=1', '--peak_tflops=1')
  assert result.returncode == 0, result.stderr[-2000:]
  p = json.loads(result.stdout)
  assert p['devices'] == 4 and p['platform'] == 'cpu' and p['mesh']['data'] == 4
  assert p['fits'] is True and p['max_per_device_batch'] is None and p['compiles'] == 1
  assert p['memory']['argument'] > p['params_bytes'] + p['opt_state_bytes']
  # The report's main figure was left out (a property, which asdict drops).
  m = p['memory']
  assert m['peak'] == m['argument'] + m['output'] - m['alias'] + m['temp'] + m['code'] > 0
  assert p['memory_used'] == pytest.approx(m['peak'] / 2**30) and p['max_batch'] is None


def test_cli_report_and_one_line_errors():
  result = run_plan('--config=configs/default.py', f'--config.model={TINY_MODEL}', '--devices=2',
                    '--num_classes=10', '--batch=32', '--mesh=fsdp:2', '--nomax_batch',
                    '--device_memory_gib=1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'on 2 cpu devices, mesh data=1 fsdp=2 tensor=1' in result.stdout
  assert 'batch 32 = 16 per device' in result.stdout and 'fits' in result.stdout
  result = run_plan('--config=configs/default.py', '--devices=2')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: the config has no num_classes')
  assert 'Traceback' not in result.stderr
  # Flags that did nothing without another.
  for args, line in ((['--mfu=0.3'], 'error: --mfu does nothing without --peak_tflops: pass that '
                      'too'),
                     (['--max_batch'], 'error: --max_batch does nothing without '
                      '--device_memory_gib: pass that too')):
    result = run_plan('--config=configs/default.py', '--num_classes=10', *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == line
  # absl takes one dash too: it was missed, and the error said to run python -m vit_jax.plan.
  result = run_plan('--config=configs/default.py', f'--config.model={TINY_MODEL}', '-devices=2',
                    '--num_classes=10', '--batch=32', '--nomax_batch')
  assert result.returncode == 0 and 'on 2 cpu devices' in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_vit_b16_on_64_devices_with_fsdp_matches_the_count():
  result = run_plan('--config=configs/vit_b16.py:imagenet21k', '--devices=64',
                    '--mesh=data:-1,fsdp:8', '--device_memory_gib=32', '--peak_tflops=275',
                    '--nomax_batch', '--json')
  assert result.returncode == 0, result.stderr[-2000:]
  p = json.loads(result.stdout)
  p['memory'].pop('peak')  # Derived figures, not fields.
  p['memory'] = planner.StepMemory(**p['memory'])
  p = planner.Plan(**{k: v for k, v in p.items() if k not in ('max_batch', 'memory_used')})
  assert p.devices == 64 and p.mesh == {'data': 8, 'fsdp': 8, 'tensor': 1}
  assert p.per_device_batch == 4096 // 64
  check_memory(p, vit_params('B', 16, 224, 3, 21843, representation=768), 8, 224, 3)
  assert p.xla_flops_per_step == pytest.approx(p.model_flops_per_step, rel=0.15)


@pytest.mark.parametrize('flag', ['device_memory_gib', 'peak_tflops'])
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_memory_or_peak_is_a_config_error(flag, value):
  """nan / inf memory crashed in int() after compiling; a nan peak printed nan days."""
  with pytest.raises(ConfigError, match=rf'--{flag}={value} must be a positive number'):
    planner.plan(default_config(model=TINY_MODEL), search=False, **{flag: value})


@pytest.mark.parametrize('devices,count', [(['--devices=4'], 4), (['--devices', '4'], 4),
                                           (['--devices=1'], 1)])
def test_cli_devices_win_over_jax_num_cpu_devices(monkeypatch, devices, count):
  """JAX_NUM_CPU_DEVICES in the environment overrode --devices (and the error said to run
  python -m vit_jax.plan, which was what had been run); absl's `--devices 4` and a single
  device are simulated too."""
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '2')
  result = run_plan('--config=configs/default.py', f'--config.model={TINY_MODEL}', *devices,
                    '--num_classes=10', '--nomax_batch', '--json')
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout)['devices'] == count


def test_cli_stray_arguments_and_non_finite_numbers_are_one_line():
  for args, line in (
      (['8'], "error: unexpected arguments ['8']: flags take the form --name=value"),
      (['--device_memory_gib=nan'], 'error: --device_memory_gib=nan must be a positive number')):
    result = run_plan('--config=configs/default.py', '--devices=2', '--num_classes=10', *args)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip().splitlines()[-1] == line and 'Traceback' not in result.stderr
