"""Fine-tuning and export: the transferred start state, the CLIs end to end, .npz round trips.

A tiny ViT-Mu_4 is pre-trained here for 100 steps on Fashion-MNIST at 16 px, then fine-tuned on
digits at 24 px (so the position embeddings are resized from a 4x4 to a 6x6 grid).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import param_trees

import config_files
import imports
from vit_jax import models
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import posemb as posemb_lib
from vit_jax.checkpoints import restore
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import finetune
from vit_jax.training import loop
from vit_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
POSEMB = npz.POSEMB_KEY
# Steps are cheap at 16 px (~5 ms per image on 2 cores); compiling and evaluating dominate.
PRETRAIN = dict(model='ViT-Mu_4', image_size=16, total_steps=100, batch=64, warmup_steps=10,
                base_lr=3e-3, eval_every=0, progress_every=50, checkpoint_every=1000)
FINETUNE = dict(image_size=24, total_steps=40, batch=64, eval_every=40, progress_every=20)


def _load_config(name: str, arg: str = ''):
  """What `--config=configs/NAME.py[:ARG]` gives a command (config_flags, locked)."""
  argv = ['cmd', f'--config={ROOT / "configs" / name}.py' + (f':{arg}' if arg else '')]
  return config_files.parse_config_flag(argv)


def _default_config(**overrides):
  config = config_files.get_config('default')
  config.update(overrides)
  return config


def _env(data_dir: str = '') -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='cpu', TFDS_DATA_DIR=data_dir)


def _cli(module: str, *args: str, data_dir: str = '') -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=_env(data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def pretrained(prepared_data_dir, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  loop.train_and_evaluate(_default_config(data_dir=prepared_data_dir, **PRETRAIN), workdir)
  return workdir


@pytest.fixture(scope='module')
def exported(pretrained, tmp_path_factory) -> Path:
  """The pre-trained params exported through the CLI."""
  path = tmp_path_factory.mktemp('export') / 'params.npz'
  proc = _cli('vit_jax.export', f'--workdir={pretrained}', f'--output={path}')
  assert 'ViT-Mu_4' in proc.stdout and '--image_size' not in proc.stdout  # Its posemb tells 16 px.
  assert not re.search(r'^I\d{4} .*\.py:\d+\]', proc.stderr, re.M), proc.stderr  # No INFO lines.
  return path


def _finetune_config(data_dir, init):
  config = _load_config('finetune/digits')
  config.update(dict(FINETUNE, data_dir=data_dir, init=init))
  return config


@pytest.fixture(scope='module')
def transferred(prepared_data_dir, pretrained):
  """(experiment, step-0 state, pre-trained) of the digits fine-tune, as the command builds it."""
  pre = restore.load(pretrained)
  config = finetune.with_architecture(_finetune_config(prepared_data_dir, pretrained), pre.model,
                                      pre.model_overrides, pre.channels)
  exp = experiment.build(config)
  return exp, finetune.initial_state(exp, pre), pre


def test_transfer_zeroes_the_head_and_resizes_the_position_embeddings(transferred):
  exp, state, pre = transferred
  assert int(state.step) == 0
  params = param_trees.flat(jax.device_get(state.params))
  pre_params = param_trees.flat(pre.params)
  assert params['head/kernel'].shape == (64, 10)
  assert not np.any(params['head/kernel']) and not np.any(params['head/bias'])
  assert params[POSEMB].shape == (1, 1 + 6 * 6, 64)  # 16 px -> 24 px: 4x4 -> 6x6 patches.
  np.testing.assert_array_equal(params[POSEMB],
                                posemb_lib.resize_posemb(pre_params[POSEMB], (6, 6)))
  for key, value in pre_params.items():
    if not key.startswith('head/') and key != POSEMB:
      assert params[key].tobytes() == value.tobytes(), key
  # A fresh optimizer (SGD momentum), not the pre-training's Adam state.
  assert exp.config.optimizer == 'sgd'
  assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(state.opt_state)))
  # The state lives on the experiment's mesh with its shardings.
  for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(exp.state_shardings.params)):
    assert x.sharding == s


def test_a_polyak_fine_tune_starts_its_average_at_the_transferred_params(prepared_data_dir,
                                                                         pretrained):
  pre = restore.load(pretrained)
  config = _finetune_config(prepared_data_dir, pretrained)
  config.polyak_decay = 0.9999
  exp = experiment.build(
      finetune.with_architecture(config, pre.model, pre.model_overrides, pre.channels))
  state = jax.device_get(finetune.initial_state(exp, pre))
  param_trees.assert_bit_identical(state.averaged_params, state.params)
  assert np.any(param_trees.flat(state.params)['embedding/kernel'])  # The checkpoint's values.


def test_a_workdir_trained_from_a_finetune_config_is_read_back(prepared_data_dir, tmp_path):
  """Its saved config leaves the model overrides None (the checkpoint's, when fine-tuning): the
  model's defaults, for every reader and for a fine-tune from it (they failed on remat=None)."""
  config = config_files.get_config('finetune/digits')
  config.update(data_dir=prepared_data_dir, total_steps=2, warmup_steps=1, eval_every=0,
                batch=8, model='ViT-Mu_4')  # As its docstring trains it from scratch.
  workdir = str(tmp_path / 'scratch')
  loop.train_and_evaluate(config, workdir)
  pretrained = restore.load(workdir)
  assert pretrained.model_overrides == {}
  pretrained.create_model(10)
  fine_tune = finetune.with_architecture(config, pretrained.model,
                                         {'remat': None, 'scan': True}, 1)
  assert dict(fine_tune.model_overrides) == {'scan': True}


def test_new_layers_take_the_new_models_own_init(prepared_data_dir, pretrained):
  """The head's bias and a pre-logits layer that pre-training lacked are the values the new
  model's full init gives them, though only they are initialised."""
  pre = restore.load(pretrained)
  config = _finetune_config(prepared_data_dir, pretrained)
  config.model_overrides = {'representation_size': 32, 'head_bias_init': -2.0}
  exp = experiment.build(
      finetune.with_architecture(config, pre.model, pre.model_overrides, pre.channels))
  params = param_trees.flat(jax.device_get(finetune.initial_state(exp, pre).params))
  with exp.rules_context():
    full = jax.jit(lambda rng: exp.model.init(rng, jnp.zeros((1,) + exp.image_shape))['params'])(
        jax.random.PRNGKey(exp.config.seed))
  full = param_trees.flat(jax.device_get(nn.meta.unbox(full)))
  assert params['pre_logits/kernel'].shape == (64, 32) and np.any(params['pre_logits/kernel'])
  for key in ('pre_logits/kernel', 'pre_logits/bias', 'head/bias'):
    np.testing.assert_array_equal(params[key], full[key])
  assert np.all(params['head/bias'] == -2.0) and not np.any(params['head/kernel'])
  assert params[POSEMB].shape == full[POSEMB].shape  # The rest: the checkpoint's, as above.
  assert params['embedding/kernel'].tobytes() == param_trees.flat(pre.params)[
      'embedding/kernel'].tobytes()


@pytest.mark.parametrize('patch, grids', [
    ((4, 4), ((4, 4), (6, 6))),  # 16 px -> 24 px.
    # The posemb was resized as a square grid (8x8 -> 12x12 here), scrambling its rows.
    ((2, 4), ((8, 4), (12, 6)))])
def test_a_gap_npz_fine_tunes_as_gap_without_saying_so(prepared_data_dir, tmp_path, patch, grids):
  """The fine-tune configs cannot set `classifier` (not a key of theirs), nor an oblong patch:
  the .npz's keys tell."""
  model = nn.meta.unbox(jax.eval_shape(
      lambda: models.create('ViT-Mu_4', classifier='gap', patch_size=patch).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), model['params'])
  path = str(tmp_path / 'gap.npz')
  npz.save_npz(params, path)
  config = _finetune_config(prepared_data_dir, path)
  config.model = 'ViT-Mu_4'  # A .npz names none.
  pre = restore.load(path, config.model)  # As `finetune` does: the config's overrides are None.
  exp = experiment.build(finetune.with_architecture(config, pre.model, pre.model_overrides,
                                                    pre.channels))
  assert exp.model.classifier == 'gap' and tuple(exp.model.patch_size) == patch
  assert pre.posemb_grid() == grids[0]
  state = jax.device_get(finetune.initial_state(exp, pre).params)
  assert 'cls' not in state
  np.testing.assert_array_equal(  # No class token's row.
      state['Transformer']['posembed_input']['pos_embedding'],
      posemb_lib.resize_posemb(params['Transformer']['posembed_input']['pos_embedding'],
                               grids[1], grids[0], num_prefix_tokens=0))


def test_finetune_cli_improves_over_the_transferred_start(transferred, prepared_data_dir,
                                                          pretrained, tmp_path):
  exp, state, _ = transferred
  start = loop.evaluate(exp, exp.jit_eval_step(), state.params, loop.make_eval_data(exp))
  workdir = tmp_path / 'ft'
  args = [f'--config.{k}={v}' for k, v in FINETUNE.items()]
  _cli('vit_jax.finetune', '--config=configs/finetune/digits.py', f'--workdir={workdir}',
       f'--config.init={pretrained}', *args, data_dir=prepared_data_dir)
  final = [row for row in read_jsonl(str(workdir / 'metrics.jsonl')) if 'test/accuracy' in row]
  assert final[-1]['step'] == FINETUNE['total_steps']
  # Measured: start 0.09 (a zero head predicts class 0 everywhere), after 40 steps 0.28-0.32.
  assert start['test/accuracy'] < 0.15
  assert final[-1]['test/accuracy'] > start['test/accuracy'] + 0.1, (start, final)
  # Rerunning resumes from the fine-tune checkpoint instead of transferring again.
  config = _finetune_config(prepared_data_dir, pretrained)
  assert finetune.finetune(config, str(workdir)) == {'step': FINETUNE['total_steps']}


def test_export_round_trip_is_bit_exact(pretrained, exported, tmp_path):
  with Checkpointer(pretrained, read_only=True) as checkpointer:
    orbax_params, _ = restore.restore_params(checkpointer, checkpointer.all_steps()[-1])
  loaded = npz.load_npz(str(exported))
  param_trees.assert_bit_identical(loaded, orbax_params)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
  replaced = tmp_path / 'replaced.npz'
  replaced.write_text('an older export')
  _cli('vit_jax.export', f'--workdir={pretrained}', f'--output={replaced}', '--overwrite')
  param_trees.assert_bit_identical(npz.load_npz(str(replaced)), orbax_params)


def test_scanned_checkpoints_export_and_load_in_both_layouts(prepared_data_dir, tmp_path):
  config = _default_config(data_dir=prepared_data_dir, **PRETRAIN)
  config.model_overrides.scan = True
  state = experiment.build(config).init_state()
  params = jax.device_get(state.params)
  with Checkpointer(str(tmp_path), async_save=False) as checkpointer:
    checkpointer.save(1, state, {'step': 1, 'config': config.to_dict()})
  pre = restore.load(str(tmp_path))
  path = str(tmp_path / 'scanned.npz')
  npz.save_npz(pre.params, path)
  from_npz = restore.load(path, pre.model, {})
  assert 'encoderblock_3' in from_npz.params['Transformer']  # The released (unrolled) layout.
  for scan in (False, True):
    model = from_npz.create_model(num_classes=10, scan=scan)
    loaded = restore.checked_params(from_npz, model)
    expected = params if scan else npz.to_layout_of(params, loaded, 'reference')
    param_trees.assert_bit_identical(loaded, expected)


@pytest.mark.parametrize('image_size', [28, 32])
def test_export_names_the_image_size_a_hybrids_npz_cannot_tell(prepared_data_dir, exported,
                                                                 tmp_path, image_size):
  """The embedded default (R8+ViT-Mu_8 at 28 px): its posemb fits 25-32 px and readers guess 32;
  trained at 32, there is nothing to tell."""
  config = _default_config(data_dir=prepared_data_dir)
  config.model_overrides.scan, config.image_size = True, image_size
  with Checkpointer(str(tmp_path), async_save=False) as checkpointer:
    checkpointer.save(1, experiment.build(config).init_state(),
                      {'step': 1, 'config': config.to_dict()})
  out = _cli('vit_jax.export', f'--workdir={tmp_path}', f'--output={tmp_path / "h.npz"}').stdout
  assert f'{config.model} from workdir' in out and 'scan' not in out  # The file is unrolled.
  if image_size == 32:
    assert 'trained at' not in out
  else:
    assert 'trained at 28 px' in out and '--image_size=28 to infer, analyze and fewshot' in out
  assert restore.load(str(tmp_path / 'h.npz'), config.model).image_size == 32  # Its guess.


def test_checkpoint_errors_are_one_line_without_traceback(
    pretrained, exported, prepared_data_dir, tmp_path):
  corrupt = tmp_path / 'corrupt.npz'
  corrupt.write_bytes(b'PK\x03\x04 not really a zip')
  truncated = tmp_path / 'truncated'
  shutil.copytree(pretrained, truncated)
  newest = max(Checkpointer(str(truncated), read_only=True).all_steps())
  for data in (truncated / 'checkpoints' / str(newest) / 'state').glob('ocdbt.process_*/d/*'):
    data.write_bytes(b'')
  no_tree = tmp_path / 'no_tree'  # An empty _METADATA was an AttributeError's traceback.
  shutil.copytree(pretrained, no_tree)
  (no_tree / 'checkpoints' / str(newest) / 'state' / '_METADATA').write_bytes(b'')
  bad_meta = tmp_path / 'bad_meta'  # And no config.json to fall back on.
  shutil.copytree(pretrained, bad_meta)
  for meta in (bad_meta / 'checkpoints' / str(newest) / 'meta').iterdir():
    meta.write_text('{corrupt')
  (bad_meta / 'config.json').unlink()
  with np.load(exported) as data:  # Damaged .npz files: each a traceback at some later point.
    arrays = dict(data)
  posemb = arrays[npz.POSEMB_KEY]
  damaged = {name: tmp_path / f'{name}.npz'
             for name in ('int_cls', 'flat_posemb', 'odd_posemb', 'nan_head')}
  np.savez(damaged['int_cls'], **arrays | {'cls': arrays['cls'].astype(np.int32)})
  np.savez(damaged['flat_posemb'], **arrays | {npz.POSEMB_KEY: posemb[0]})
  np.savez(damaged['odd_posemb'], **arrays | {npz.POSEMB_KEY: posemb[:, :13]})
  head = arrays['head/kernel'].copy()
  head[0, 0] = np.nan  # Bytes overwritten: "loss is nan at step 5; lower base_lr".
  np.savez(damaged['nan_head'], **arrays | {'head/kernel': head})
  width = posemb.shape[-1]
  # The command itself where its flags or orbax's background reads are what is tested (a read
  # of a damaged checkpoint left shard reads behind, each a traceback at exit).
  commands = {
      # Its only step: a newest one falls back to an older (test_resume.py).
      f'no checkpoint in {truncated} is readable (the newest, step {newest}: ValueError: '
      'OUT_OF_RANGE': [f'--config.init={truncated}'],
      f'no checkpoint in {no_tree} is readable (the newest, step {newest}: ValueError: its '
      '_METADATA names no arrays': [f'--config.init={no_tree}'],
      # The later --workdir wins: fine-tuning into the pre-training workdir.
      'is the pre-training workdir config.init': [f'--config.init={pretrained}',
                                                  f'--workdir={pretrained}/'],
  }
  procs = {expected: subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.finetune', '--config=configs/finetune/digits.py',
       f'--workdir={tmp_path / "w"}', *args], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=_env(prepared_data_dir))
           for expected, args in commands.items()}
  # The rest in this process (each command imports TensorFlow: ~9 s of CPU), as
  # (config.init, config.model, workdir).
  calls = {
      'does not exist': ('/nonexistent/workdir', None, None),
      f'step {newest} in {bad_meta} has an unreadable meta (JSONDecodeError':
          (str(bad_meta), None, None),
      'not a readable .npz': (str(corrupt), 'ViT-Mu_4', None),
      f"{exported} holds no architecture: name the model it was trained as (--model; "
      "fine-tuning's --config.model)": (str(exported), None, None),
      'holds a ViT-Mu_4, not ViT-B_16: drop the model name': (pretrained, 'ViT-B_16', None),
      f'the pre-trained checkpoint {exported} does not fit the model':
          (str(exported), 'ViT-Ti_4', None),
      f"checkpoint {damaged['int_cls']} holds cls as int32, not floating point":
          (str(damaged['int_cls']), 'ViT-Mu_4', None),
      f"the position embeddings of {damaged['flat_posemb']}, of shape (17, {width}), are not "
      "(1, tokens, width)": (str(damaged['flat_posemb']), 'ViT-Mu_4', None),
      f"of shape (1, 13, {width}), are not (1, tokens, width) for a square grid of ViT-Mu_4's "
      '4x4 px patches: the file is damaged': (str(damaged['odd_posemb']), 'ViT-Mu_4', None),
      f"checkpoint {damaged['nan_head']} holds NaN or infinite values in 1 of its arrays (e.g. "
      'head/kernel): it is damaged': (str(damaged['nan_head']), 'ViT-Mu_4', None),
      # Accepted, then deleted with that step by the pre-training's keep_checkpoints.
      f'lies inside the checkpoint of step {newest} of the workdir {pretrained}, which may delete':
          (pretrained, None, f'{pretrained}/checkpoints/{newest}'),
  }
  for expected, (init, model, workdir) in calls.items():
    config = _load_config('finetune/digits')
    config.update(dict(data_dir=prepared_data_dir, init=init, model=model))
    with pytest.raises(ConfigError) as error:
      finetune.finetune(config, workdir or str(tmp_path / 'w'))
    assert expected in str(error.value) and '\n' not in str(error.value), str(error.value)
  for expected, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert proc.returncode == 2, stderr[-2000:]
    assert 'Traceback' not in stderr and 'Exception ignored' not in stderr, stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], errors


def test_an_unreadable_meta_is_read_from_the_runs_config_json(pretrained, tmp_path, caplog):
  """It stopped fine-tuning from that workdir (and resuming a fine-tune) with "remove that step
  directory", though config.json holds the same config and the params read."""
  copy = tmp_path / 'copy'
  shutil.copytree(pretrained, copy)
  newest = max(Checkpointer(str(copy), read_only=True).all_steps())
  for meta in (copy / 'checkpoints' / str(newest) / 'meta').iterdir():
    meta.write_text('{corrupt')
  with open(copy / 'config.json', encoding='utf-8') as f:
    assert restore.saved_config(str(copy)) == json.load(f)
  assert f'the checkpoint at step {newest} in {copy} has an unreadable meta' in caplog.text
  param_trees.assert_bit_identical(restore.load(str(copy)).params,
                                   restore.load(pretrained).params)


@pytest.mark.parametrize('args,expected', [
    (['--workdir=/nonexistent/run', '--output=x.npz'],
     'error: --workdir=/nonexistent/run is not a directory: pass the training workdir'),
    (['--workdir=run.npz', '--output=x.npz'],
     'error: --workdir=run.npz is already a .npz: pass a training workdir'),
    (['--workdir=.', '--output=x.zip'], 'error: --output=x.zip must end in .npz'),
])
def test_export_mistakes_are_one_line(args, expected, tmp_path):
  proc = subprocess.run([sys.executable, *imports.IMPORTTIME, '-m', 'vit_jax.export', *args],
                        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env())
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == expected, proc.stderr
  assert not list(tmp_path.iterdir())
  assert not imports.imported(proc.stderr, 'tensorflow')  # Said in 0.2 s, not 8 s.


@pytest.mark.parametrize('output,expected', [
    ('out.npz', 'error: --output=out.npz is a directory: name a .npz file (e.g. '
                'out.npz/params.npz)'),
    ('file/x.npz', 'error: --output=file/x.npz is inside {tmp_path}/file, which is a file: pass '
                   'another path'),
    # It was replaced: a released checkpoint, or a run's own init.
    ('kept.npz', 'error: --output=kept.npz exists: pass another path, or --overwrite to replace '
                 'it'),
    # A good output reaches the empty workdir (whose fix was "or pass a .npz file", refused).
    ('new.npz', 'error: no checkpoint in run yet: train one there with python -m vit_jax.main (a '
                'run saves every config.checkpoint_every steps and at its end)')])
def test_export_checks_its_output_before_reading_the_checkpoint(output, expected, tmp_path):
  """An --output that is a folder, lies inside a file or exists: one line (was a traceback from
  the write, after the whole checkpoint had been read; or the file replaced)."""
  (tmp_path / 'out.npz').mkdir()
  (tmp_path / 'file').write_text('')
  (tmp_path / 'kept.npz').write_text('kept')
  (tmp_path / 'run').mkdir()  # No checkpoint in it: the output is checked first.
  proc = subprocess.run([sys.executable, *imports.IMPORTTIME, '-m', 'vit_jax.export',
                         '--workdir=run', f'--output={output}'], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120, env=_env())
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == expected.format(tmp_path=tmp_path), proc.stderr
  assert 'Traceback' not in proc.stderr and (tmp_path / 'kept.npz').read_text() == 'kept'
  # Only reading the checkpoint loads TensorFlow.
  assert imports.imported(proc.stderr, 'tensorflow') == (output == 'new.npz')


def test_a_workdirs_checkpoints_folder_or_step_is_named_as_such(pretrained):
  """Was "no checkpoint in WORKDIR/checkpoints", of a folder full of them."""
  with Checkpointer(pretrained, read_only=True) as checkpointer:
    newest = checkpointer.all_steps()[-1]
  for path, what in ((f'{pretrained}/checkpoints', 'the checkpoints folder'),
                     (f'{pretrained}/checkpoints/{newest}/', f'the checkpoint of step {newest}'),
                     (f'{pretrained}/config.json', 'the file config.json')):  # "No architecture".
    with pytest.raises(ConfigError) as error:
      restore.load(path)
    assert str(error.value) == (f'{path.rstrip("/")} is {what} of the workdir {pretrained}: '
                                'pass the workdir itself (its newest checkpoint is read)')


def test_a_fine_tune_workdir_without_checkpoints_names_the_fine_tune_command(tmp_path):
  """Was "train one there with python -m vit_jax.main", which trains from scratch."""
  (tmp_path / 'config.json').write_text(json.dumps(dict(init='pre/ViT-B_16.npz', model='ViT-B_16')))
  with pytest.raises(ConfigError, match=r'yet: train one there with python -m vit_jax\.finetune '):
    restore.load(str(tmp_path))
  (tmp_path / 'config.json').write_text('[]')  # Not a config: the pre-training command.
  with pytest.raises(ConfigError, match=r'yet: train one there with python -m vit_jax\.main '):
    restore.load(str(tmp_path))


@pytest.mark.parametrize('overrides,message', [
    (dict(eval_split='tset'), "digits has no split 'tset'"),
    (dict(dataset='digitz'), "unknown dataset 'digitz'"),
])
def test_finetune_checks_its_data_before_reading_the_pretrained_checkpoint(
    prepared_data_dir, tmp_path, monkeypatch, overrides, message):
  # They were found after the pre-trained params were read and transferred (minutes from gs://).
  monkeypatch.setattr(restore, 'load', lambda *a, **k: pytest.fail('read the checkpoint'))
  config = _finetune_config(prepared_data_dir, '/pretrained/elsewhere')
  config.update(overrides)
  with pytest.raises(ConfigError, match=re.escape(message)):
    finetune.finetune(config, str(tmp_path / 'ft'))
  assert not (tmp_path / 'ft').exists()


def test_a_finetune_workdir_resumes_only_its_own_init(pretrained, exported, prepared_data_dir,
                                                     tmp_path):
  """Resuming with another --config.init trained on silently from the old one (and wrote the
  new one into config.json); a pre-training workdir was taken for a fine-tune to resume."""
  fine_tune = str(tmp_path / 'ft')
  with Checkpointer(fine_tune) as checkpointer:  # What a fine-tune of `pretrained` saves.
    checkpointer.save(40, {'w': jnp.zeros(3)}, {'step': 40, 'config': dict(
        _finetune_config(prepared_data_dir, pretrained).to_dict(), model='ViT-Mu_4')})
  with pytest.raises(ConfigError) as error:
    finetune.finetune(_finetune_config(prepared_data_dir, str(exported)), fine_tune)
  assert str(error.value) == (
      f'--workdir {fine_tune} holds a fine-tune of {pretrained}, not of {exported}: pass '
      f'--config.init={pretrained} to resume it, or a new --workdir to fine-tune {exported}')
  # Another model or keep_pre_logits was ignored (the checkpoint's architecture resumed).
  for change, expected in (
      (dict(model='ViT-Ti_4'), f'--workdir {fine_tune} holds a fine-tune of a ViT-Mu_4, not of a '
       'ViT-Ti_4: drop --config.model to resume it, or pass a new --workdir'),
      (dict(keep_pre_logits=True), f'--workdir {fine_tune} holds a fine-tune with '
       'keep_pre_logits=False: pass --config.keep_pre_logits=False to resume it, or a new '
       '--workdir')):
    config = _finetune_config(prepared_data_dir, pretrained)
    config.update(change)
    with pytest.raises(ConfigError) as error:
      finetune.finetune(config, fine_tune)
    assert str(error.value) == expected
  # The same init, spelled another way, and the same model named, resume.
  config = _finetune_config(prepared_data_dir, f'{pretrained}/')
  config.model = 'ViT-Mu_4'
  finetune._check_resumes_the_same_run(  # pylint: disable=protected-access
      {'init': pretrained, 'model': 'ViT-Mu_4'}, config, fine_tune)
  pre_training = str(tmp_path / 'pre')
  shutil.copytree(pretrained, pre_training)
  with pytest.raises(ConfigError, match=rf'^--workdir {pre_training} holds the checkpoints of a '
                     r'pre-training run, not of a fine-tune: fine-tune into a new workdir'):
    finetune.finetune(_finetune_config(prepared_data_dir, str(exported)), pre_training)
  assert sorted(os.listdir(os.path.join(pre_training, 'checkpoints'))) == sorted(
      os.listdir(os.path.join(pretrained, 'checkpoints')))


@pytest.mark.parametrize('name,dataset,steps,lr', [
    ('cifar10', 'cifar10', 10_000, 0.03), ('cifar100', 'cifar100', 10_000, 0.03),
    ('imagenet2012', 'imagenet2012', 20_000, 0.03),
    ('oxford_iiit_pet', 'oxford_iiit_pet', 500, 0.03),
    ('oxford_flowers102', 'oxford_flowers102', 500, 0.03), ('vtab', 'dtd', 2_500, 0.01)])
def test_paper_configs_follow_table_4(name, dataset, steps, lr):
  config = _load_config(f'finetune/{name}')
  assert (config.dataset, config.total_steps, config.base_lr) == (dataset, steps, lr)
  assert (config.optimizer, config.momentum, config.batch, config.decay_type) == (
      'sgd', 0.9, 512, 'cosine')
  assert (config.grad_norm_clip, config.weight_decay, config.image_size) == (1.0, 0.0, 384)
  assert config.warmup_steps == min(500, steps // 5)
  assert not config.keep_pre_logits


def test_vtab_config_names_its_tasks():
  assert _load_config('finetune/vtab', 'svhn').dataset == 'svhn_cropped'
  with pytest.raises(flags.IllegalFlagValueError, match='unknown VTAB task'):
    _load_config('finetune/vtab', 'clevr')


def test_demo_configs_load_and_short_runs_scale_the_warmup():
  assert _load_config('finetune/fashion_mnist_56px').image_size == 56
  config = _load_config('finetune/digits')
  assert config.init == 'workdirs/default'
  config.total_steps = 50
  assert config.warmup_steps == 10
