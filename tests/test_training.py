"""End-to-end pre-training on real data: a tiny ViT (ViT-Mu_4) on the 8x8 digits, 8 CPU devices.

What is asserted: learning happens, every parallelism computes the same thing, gradient
accumulation is the big batch, metrics.jsonl holds what the docs say, and config mistakes are one
line before anything compiles. Resume and failures are in test_resume.py; the shared recipe,
compilation cache and baseline run in training_setup.py.
"""
import glob
import io
import json
import math
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from training_setup import (  # baseline and compile_cache are fixtures: imported, pytest uses them
    TOTAL_STEPS, MainProcess, baseline, compile_cache, tiny_config, write_config_file)
from vit_jax import models
from vit_jax import sharding
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import loop
from vit_jax.training import metrics as metrics_lib
from vit_jax.training import profiling


def _mlp_kernel(params):
  return params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']



# ---- Learning and metrics ---------------------------------------------------------------


def test_loss_decreases_and_accuracy_beats_chance(baseline):
  _, workdir, result = baseline
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r]
  losses = [r['train/loss'] for r in rows]
  # Measured: 2.27 (steps 2-5) -> 1.10 (steps 26-30); test accuracy 0.69 at step 20, 0.75 at 30
  # (chance 0.10).
  assert losses[0] > 2.0
  assert losses[-1] < 1.6 < math.log(10)
  assert losses[-1] < losses[0] - 0.6
  assert result['step'] == TOTAL_STEPS
  assert result['test/examples'] == 297  # Every test example once.
  assert result['test/accuracy'] > 0.5
  assert result['test/accuracy_top5'] >= result['test/accuracy']


def test_metrics_jsonl_has_the_documented_keys(baseline):
  config, workdir, _ = baseline
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in rows if 'train/loss' in r]
  evals = [r for r in rows if 'test/accuracy' in r]
  assert [r['step'] for r in train] == [5, 10, 15, 20, 25, 30]
  assert [r['step'] for r in evals] == [20, 30]  # Every eval_every steps, and at the end.
  assert [r['test/examples'] for r in evals] == [297, 297]
  assert evals[0]['test/loss'] != evals[1]['test/loss']
  for row in train:
    assert {'train/loss', 'train/learning_rate', 'train/grad_norm', 'perf/img_per_sec',
            'perf/img_per_sec_per_core', 'perf/tflops_per_device'} <= set(row)
    assert np.isfinite(row['train/loss']) and 0 < row['train/grad_norm'] < 100
    assert 0 < row['perf/img_per_sec'] < 1e7
    assert 0 < row['perf/img_per_sec_per_core'] <= row['perf/img_per_sec']
    assert 0 < row['perf/tflops_per_device'] < 10  # A few GFLOP/s on a CPU.
  for row in evals:
    assert 0 <= row['test/accuracy'] <= 1 and row['test/loss'] > 0
  # The learning rate is the schedule's at the row's step, the one its last update used
  # (optax's count before it): linear warmup over 5 steps to 3e-3, then cosine to 0. It was the
  # window's mean, which lags the schedule.
  schedule = experiment.build(config).schedule
  for row in train:
    assert row['train/learning_rate'] == pytest.approx(float(schedule(row['step'] - 1)),
                                                       rel=1e-5)
  assert train[0]['train/learning_rate'] == pytest.approx(3e-3 * 4 / 5)
  lrs = [r['train/learning_rate'] for r in train]
  assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > lrs[5]  # Decaying after the warmup.
  saved = json.load(open(os.path.join(workdir, 'config.json'), encoding='utf-8'))
  assert saved['model'] == 'ViT-Mu_4' and saved['total_steps'] == TOTAL_STEPS


def test_an_object_store_workdir_gets_the_config_and_metrics(baseline, tmp_path):
  """gs:// workdirs: orbax writes the checkpoints, tf.io.gfile the config and metrics rows;
  ram:// stands in here (its writer cannot truncate, so one flush is all it can check)."""
  config = baseline[0]
  workdir = f'ram://{tmp_path.name}/run'
  loop.save_config(config, workdir)
  with tf.io.gfile.GFile(f'{workdir}/config.json') as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())
  writer = metrics_lib.JsonlWriter(f'{workdir}/metrics.jsonl')
  writer.write_scalars(1, {'a': 1.0})
  writer.write_scalars(2, {'a': 0.5})
  writer.close()
  with tf.io.gfile.GFile(f'{workdir}/metrics.jsonl') as f:
    assert [json.loads(line) for line in f] == [{'step': 1, 'a': 1.0}, {'step': 2, 'a': 0.5}]


@pytest.mark.parametrize('where', ['local', 'ram'])
def test_a_resumed_run_sets_aside_the_metrics_rows_of_the_steps_it_trains_again(tmp_path,
                                                                                 where):
  """A run killed at step 23 with its checkpoint at 20 had logged steps 21-23 (train and eval
  rows); resumed at 20 it logs them again: metrics.jsonl keeps the resumed run's, the others
  move to metrics.superseded.jsonl (ram:// stands in for gs://, where files are rewritten)."""
  workdir = str(tmp_path) if where == 'local' else f'ram://{tmp_path.name}'
  path = f'{workdir}/metrics.jsonl'
  first = metrics_lib.JsonlWriter(path)
  for step in (10, 20, 21, 22, 23):
    first.write_scalars(step, {'train/loss': 1.0})
  first.write_scalars(20, {'test/accuracy': 0.5})
  first.write_scalars(22, {'test/accuracy': 0.6})
  first.close()
  resumed = metrics_lib.JsonlWriter(path, start_step=20)
  resumed.write_scalars(21, {'train/loss': 0.9})
  if where == 'local':  # ram:// files cannot be rewritten in place, so only read back once.
    resumed.close()
    assert metrics_lib.read_jsonl(path) == [
        {'step': 10, 'train/loss': 1.0}, {'step': 20, 'train/loss': 1.0},
        {'step': 20, 'test/accuracy': 0.5}, {'step': 21, 'train/loss': 0.9}]
    assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'metrics.superseded.jsonl']
  with tf.io.gfile.GFile(f'{workdir}/metrics.superseded.jsonl') as f:
    assert [json.loads(line) for line in f] == [
        {'step': 21, 'train/loss': 1.0}, {'step': 22, 'train/loss': 1.0},
        {'step': 23, 'train/loss': 1.0}, {'step': 22, 'test/accuracy': 0.6}]


def test_a_row_cut_short_does_not_stop_the_resume_and_is_kept_aside(tmp_path, caplog):
  # A full disk or a kill mid-write left half a row: resuming stopped with a JSONDecodeError.
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 10, "train/loss": 1.0}\n{"step": 20, "train/loss": 0.9}\n{"step": 2')
  with caplog.at_level(logging.WARNING):
    resumed = metrics_lib.JsonlWriter(str(path), start_step=20)
  resumed.write_scalars(21, {'train/loss': 0.8})
  resumed.close()
  assert metrics_lib.read_jsonl(str(path)) == [
      {'step': 10, 'train/loss': 1.0}, {'step': 20, 'train/loss': 0.9},
      {'step': 21, 'train/loss': 0.8}]
  assert (tmp_path / 'metrics.jsonl.unreadable').read_text() == '{"step": 2\n'
  assert '1 rows of' in caplog.text and 'moved to' in caplog.text


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


@pytest.mark.parametrize('stream', [io.StringIO, _Terminal])
def test_stdout_shows_progress_and_every_evaluation(stream):
  progress = metrics_lib.Progress(total_steps=30, start_step=0)
  progress.stream = stream()
  progress.update(10, 1.23456, 512.0)
  progress.report(20, {'test/accuracy': 0.8123, 'test/loss': 0.5, 'test/examples': 297.0,
                       'fewshot/digits_5shot': 0.5})
  progress.update(30, 0.5, None)
  lines = re.split('[\r\n]', progress.stream.getvalue())
  assert [line.split(' | ')[:2] for line in lines if line] == [
      ['step 10/30', 'loss 1.2346'], ['step 20/30', 'test/accuracy 81.23%'],
      ['step 30/30', 'loss 0.5000']]
  assert lines[[i for i, l in enumerate(lines) if 'accuracy' in l][0]].endswith(
      'test/accuracy 81.23% | test/loss 0.5000 | fewshot/digits_5shot 50.00%')


def test_a_window_logs_the_mean_loss_and_the_last_learning_rate():
  window = [{'loss': 1.0, 'learning_rate': 0.1}, {'loss': 3.0, 'learning_rate': 0.2}]
  assert metrics_lib.mean_of(window, 'train') == {'train/loss': 2.0,
                                                  'train/learning_rate': 0.2}


def test_a_closed_stdout_stops_the_progress_lines_not_the_training(caplog):
  # `main ... | head -1`: a BrokenPipeError traceback at the next progress line stopped the run.
  read_end, write_end = os.pipe()
  os.close(read_end)
  progress = metrics_lib.Progress(total_steps=30, start_step=0)
  progress.stream = os.fdopen(write_end, 'w')
  with caplog.at_level(logging.WARNING):
    progress.update(10, 1.0, 512.0)
    progress.report(20, {'test/accuracy': 0.5})
  assert not progress.enabled and 'stdout was closed: training goes on' in caplog.text
  progress.stream.close()  # Its descriptor now leads to /dev/null: no error at close either.


def test_a_finished_run_says_so_and_trains_nothing(baseline, tmp_path, capsys):
  config, workdir, _ = baseline
  shutil.copytree(workdir, tmp_path / 'run')
  saved_config = (tmp_path / 'run' / 'config.json').read_text()
  # Another setting given: the run's config.json, which says what trained it, is kept.
  config = config.copy_and_resolve_references()
  config.batch_eval = 152
  result = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result == {'step': TOTAL_STEPS}
  assert f'already holds step {TOTAL_STEPS} of total_steps={TOTAL_STEPS}: nothing to train' in (
      capsys.readouterr().out)
  assert (tmp_path / 'run' / 'config.json').read_text() == saved_config


def test_profile_traces_exactly_the_asked_steps_and_changes_nothing(baseline, tmp_path):
  config, _, expected = baseline
  # This run evaluates only at the end: matching the baseline, which also evaluates at step
  # 20, shows that a periodic eval leaves training unchanged.
  config = tiny_config(config.data_dir, profile_steps=2, profile_skip_steps=3)
  assert config.eval_every == TOTAL_STEPS
  result = loop.train_and_evaluate(config, str(tmp_path))
  traces = glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1
  assert profiling.traced_steps(traces[0], 'jit_train_step') == 2  # Steps 4 and 5.
  assert result == expected


# ---- Parallelism ------------------------------------------------------------------------


def test_data_fsdp_and_tensor_parallel_match_one_device(prepared_data_dir):
  """The baseline config on four meshes: losses and params after 4 steps agree."""
  config = tiny_config(prepared_data_dir)  # 'data:8' then reuses the baseline's executables.
  local = input_pipeline.train_iterator(config)
  batches = [next(local) for _ in range(4)]
  results = {}
  for mesh, devices in (('data:1', jax.devices()[:1]), ('data:8', None),
                        ('data:2,fsdp:4', None), ('data:2,tensor:4', None)):
    exp = experiment.build(tiny_config(prepared_data_dir, mesh=mesh), devices=devices)
    state, train_step = exp.init_state(), exp.jit_train_step()
    losses = []
    for batch in global_batch.prefetch_to_mesh(batches, exp.mesh):
      state, step_metrics = train_step(state, batch)
      losses.append(float(step_metrics['loss']))
    kernel = _mlp_kernel(state.params)
    mu = _mlp_kernel(optax.tree_utils.tree_get(state.opt_state, 'mu'))  # Adam's moment.
    results[mesh] = (losses, jax.device_get(state.params), kernel.sharding.spec,
                     mu.sharding.spec, kernel.addressable_shards[0].data.shape)
  ref_losses, ref_params = results['data:1'][:2]
  assert ref_losses[3] < ref_losses[0] - 0.01  # The steps did something.
  for mesh, (losses, params, *_) in results.items():
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=mesh)
    # Adam divides by sqrt(v): where a gradient is ~0 (e.g. the zero-initialised cls token),
    # summation-order noise moves a param by a fraction of the lr (3e-3), hence the atol.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4),
                 params, ref_params)
  # The (64, 256) MLP kernel: replicated under pure DP, split over fsdp / tensor otherwise;
  # Adam's moments follow their param.
  assert results['data:8'][4] == (64, 256)
  fsdp, tensor = results['data:2,fsdp:4'], results['data:2,tensor:4']
  assert fsdp[2] == fsdp[3] and fsdp[2][0] == 'fsdp' and fsdp[4] == (16, 256)
  assert tensor[2] == tensor[3] and tensor[2][1] == 'tensor' and tensor[4] == (64, 64)


@pytest.mark.parametrize('name,overrides', [('R50+ViT-B_16', {}),
                                            ('ViT-Ti_16', {'classifier': 'map'}),
                                            ('ViT-Ti_16', {'scan': True})])
def test_fsdp_splits_every_matrix_the_hybrid_stem_and_map_head_included(name, overrides):
  """Every param of 4k+ values is split over fsdp: the stem's convs (11.8M of R50+ViT-B/16's
  99M) and the MAP head's attention and MLP stayed whole on every device before; a scanned
  model's blocks carry a leading layer axis. (Biases split over tensor alone: a scanned ViT-Ti's
  12 x 768 MLP biases are 9k values.)"""
  model = models.create(name, num_classes=10, **overrides)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))['params']
  shardings = jax.tree.leaves(sharding.tree_shardings(params, sharding.make_mesh('data:2,fsdp:4')))
  whole = [(path, leaf.shape) for (path, leaf), placed in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], shardings)
           if leaf.size >= 4096 and path[-1].key != 'bias' and 'fsdp' not in placed.spec]
  assert not whole, whole


def test_gradient_accumulation_equals_the_big_batch(prepared_data_dir):
  """SGD (the update is lr x grad), constant lr: one step with accum_steps=4 == accum 1."""
  overrides = dict(optimizer='sgd', weight_decay=0.0, warmup_steps=0, decay_type='constant',
                   grad_norm_clip=0.0, base_lr=0.5, model_overrides={'num_layers': 1})
  config = tiny_config(prepared_data_dir, **overrides)
  batch = next(input_pipeline.make_train_iterator(
      dataset='digits', split='train', data_dir=prepared_data_dir, global_batch=64,
      image_size=8, channels=1, pp=config.pp, seed=0))
  out = {}
  for accum in (1, 4):
    exp = experiment.build(tiny_config(prepared_data_dir, accum_steps=accum, **overrides))
    state = exp.init_state()
    init = jax.device_get(state.params)
    state, step_metrics = exp.jit_train_step()(
        state, global_batch.to_global(batch, exp.mesh))
    out[accum] = (jax.device_get(step_metrics), init, jax.device_get(state.params))
  (m1, init1, p1), (m4, init4, p4) = out[1], out[4]
  assert m1['loss'] == pytest.approx(m4['loss'], rel=1e-5)
  assert m1['grad_norm'] == pytest.approx(m4['grad_norm'], rel=1e-5)
  assert m1['grad_norm'] > 0.1
  updates1 = jax.tree.map(np.subtract, p1, init1)
  updates4 = jax.tree.map(np.subtract, p4, init4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               updates1, updates4)
  head = np.abs(updates1['head']['kernel']).max()
  assert head > 1e-3  # A real step, not a no-op.


def test_gradient_accumulation_keeps_micro_batches_on_their_devices(prepared_data_dir):
  """Each micro-batch is a slice of every device's shard: under pure data parallelism the
  compiled step's only collective is the gradient all-reduce (contiguous micro-batches would
  sit on 2 of the 8 devices and be all-gathered or permuted)."""
  exp = experiment.build(tiny_config(prepared_data_dir, accum_steps=4))
  batch_sharding = sharding.batch_sharding(exp.mesh)
  batch = {'image': jax.ShapeDtypeStruct((64, 8, 8, 1), np.float32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((64,), np.int32, sharding=batch_sharding)}
  hlo = exp.jit_train_step().lower(exp.abstract_state, batch).compile().as_text()
  assert 'all-reduce' in hlo
  for moving in ('all-gather', 'collective-permute', 'all-to-all'):
    assert moving not in hlo


# ---- Config errors ----------------------------------------------------------------------

CONFIG_ERRORS = {
    'unknown_model': (dict(model='ViT-Nope_4'), r"unknown model 'ViT-Nope_4'"),
    'mesh_does_not_divide': (dict(mesh='data:3,fsdp:-1'), r'does not divide the 8 devices'),
    'mesh_too_big': (dict(mesh='data:16'), r'^mesh data:16,fsdp:1,tensor:1 needs 16 devices but '
                     r"there are 8: set one axis to -1 to fill \(--config.mesh; plan's --mesh\)$"),
    'mesh_empty': (dict(mesh=''), r'^mesh is empty: give axis sizes like data:-1'),
    'batch_not_divisible': (dict(batch=60), r'config.batch=60 is not divisible by 8'),
    'missing_dataset': (dict(dataset='no_such_dataset', num_classes=None),
                        r"unknown dataset 'no_such_dataset'"),
    'unprepared_dataset': (dict(dataset='mnist', num_classes=None),
                           r"dataset 'mnist' is not prepared"),
    'misspelled_loss': (dict(loss='sigmoid_xnet'), r"config.loss='sigmoid_xnet' is not one of"),
    'zero_progress_every': (dict(progress_every=0), r'config.progress_every=0 must be positive'),
    'zero_mesh_axis': (dict(mesh='data:-1,fsdp:0'), r'axis sizes must be positive'),
    # -2 x -4 (the fill) is the 8 devices: a traceback inside jax.
    'negative_mesh_axis': (dict(mesh='data:-2,fsdp:-1'), r'axis sizes must be positive'),
    'two_fill_axes': (dict(mesh='data:-1,fsdp:-1'), r'only one axis may be -1'),
    'unknown_mesh_axis': (dict(mesh='dp:8'), r"unknown mesh axes \['dp'\]: use data, fsdp"),
    # Taken silently: the schedule shifted by 5 steps.
    'negative_warmup_steps': (dict(warmup_steps=-5),
                              r'config.warmup_steps=-5 must be positive \(or 0: no warmup\)'),
    'negative_profile_steps': (dict(profile_steps=-3),
                               r'config.profile_steps=-3 must be positive \(or 0: no profile\)'),
    'repeated_mesh_axis': (dict(mesh='data:2,fsdp:2,data:4'),
                           r"mesh 'data:2,fsdp:2,data:4' names data twice: give each axis once"),
    'warmup_not_below_total': (dict(warmup_steps=TOTAL_STEPS),
                               r'must be below total_steps=30: lower --config.warmup_steps'),
    'zero_patch': (dict(model='ViT-Mu_0'), r'patch size must be positive'),
    'moments_dtype': (dict(optimizer_moments_dtype='bf16'),
                      r"optimizer_moments_dtype='bf16' is not one of"),
    'zero_base_lr': (dict(base_lr=0.0), r'base_lr=0.0 must be positive'),
    # Each trained away from the minimum (digits' test accuracy 0.10% after 20 steps).
    'negative_grad_norm_clip': (dict(grad_norm_clip=-1.0),
                                r'grad_norm_clip=-1.0 must be positive \(or 0: no clipping\)'),
    'negative_weight_decay': (dict(weight_decay=-0.1),
                              r'weight_decay=-0.1 must be positive \(or 0: no weight decay\)'),
    'label_smoothing_above_one': (dict(label_smoothing=1.5),
                                  r'label_smoothing=1.5 must be in \[0, 1\)'),
    'negative_label_smoothing': (dict(label_smoothing=-0.2),
                                 r'label_smoothing=-0.2 must be in \[0, 1\)'),
    'zero_batch_eval': (dict(batch_eval=0), r'config.batch_eval=0 must be positive'),
    'negative_keep_checkpoints': (dict(keep_checkpoints=-1),
                                  r'keep_checkpoints=-1 must be positive \(or 0: keep them all\)'),
    'lr_end_fraction_above_one': (dict(lr_end_fraction=2.0),
                                  r'lr_end_fraction=2.0 must be in \[0, 1\]'),
    # Its 'val/accuracy' was measured on images the run trained on.
    'eval_slice_inside_the_train_split': (
        dict(eval_split='train[1400:]'), r"eval_split 'train\[1400:\]' shares 100 examples with "
        r"train_split 'train': hold them out of training"),
    'eval_slices_overlap': (dict(train_split='train[:90%]', eval_split='train[-10%:]+train[:5]'),
                            r'shares 5 examples'),
    # Evaluated on other inputs than it trains on, a model scores as if broken.
    'train_and_eval_normalised_apart': (
        dict(pp={'train': {'crop': 'resize'}, 'eval': {'mean': (0.485, 0.456, 0.406)}}),
        r'pp\.train\.mean=\(0\.5,\) but pp\.eval\.mean=\(0\.485, 0\.456, 0\.406\): the model would '
        r'be evaluated on other inputs than it trains on; set both alike'),
    'head_smaller_than_the_classes': (dict(num_classes=5),
                                      r'digits has 10 classes but the model.s head 5: set '
                                      r'--config.num_classes=10'),
}


@pytest.mark.parametrize('name', sorted(CONFIG_ERRORS))
def test_config_errors_come_before_compiling(name, prepared_data_dir, tmp_path, monkeypatch):
  overrides, message = CONFIG_ERRORS[name]
  compiled = []
  monkeypatch.setattr(experiment.Experiment, 'init_state',
                      lambda *a, **k: compiled.append('init') or pytest.fail('compiled'))
  with pytest.raises(ConfigError, match=message) as error:
    loop.train_and_evaluate(tiny_config(prepared_data_dir, **overrides), str(tmp_path / 'run'))
  assert '\n' not in str(error.value) and not compiled


def test_a_value_a_checkpoint_cannot_record_is_a_config_error(prepared_data_dir, tmp_path):
  # A numpy scalar in a config file wrote "unserializable object" into config.json and failed
  # every checkpoint's meta, reported only at the save after (steps lost, 'free disk space').
  config = tiny_config(prepared_data_dir)
  del config['seed']
  config.seed = np.int64(3)
  with pytest.raises(ConfigError, match=r'^config.seed=np.int64\(3\) is a numpy.int64, which a '
                     r'checkpoint cannot record: use a plain int'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_trace_folder_that_cannot_be_made_is_a_config_error_before_any_step(
    prepared_data_dir, tmp_path, monkeypatch):
  # It was the profiler's traceback at the traced steps, with no checkpoint yet.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'profile').write_text('kept')
  monkeypatch.setattr(experiment.Experiment, 'jit_train_step',
                      lambda *a, **k: pytest.fail('compiled a step'))
  with pytest.raises(ConfigError, match=f'^config.profile_steps cannot write its trace into '
                     f'{workdir}/profile .*: move what is there away, or set '
                     '--config.profile_steps=0$'):
    loop.train_and_evaluate(tiny_config(prepared_data_dir, profile_steps=2, profile_skip_steps=3),
                            str(workdir))
  assert (workdir / 'profile').read_text() == 'kept'


def test_a_workdir_that_is_a_file_is_a_config_error(prepared_data_dir, tmp_path):
  path = tmp_path / 'results.txt'
  path.write_text('kept')
  with pytest.raises(ConfigError, match=r'results.txt is a file: pass a directory'):
    loop.train_and_evaluate(tiny_config(prepared_data_dir), str(path))
  assert path.read_text() == 'kept'


def test_missing_dataset_is_an_error_before_init_even_with_num_classes(prepared_data_dir,
                                                                       tmp_path, monkeypatch):
  """config.num_classes skips the dataset lookup in build(); the loop still checks first."""
  monkeypatch.setattr(experiment.Experiment, 'init_state',
                      lambda *a, **k: pytest.fail('initialised before the data check'))
  with pytest.raises(ConfigError, match=r"unknown dataset 'no_such_dataset'"):
    loop.train_and_evaluate(tiny_config(prepared_data_dir, dataset='no_such_dataset'),
                            str(tmp_path / 'run'))


def test_cli_config_errors_are_one_line_and_exit_2(prepared_data_dir, tmp_path):
  """Through `python -m vit_jax.main`: `error: ...` on stderr, exit code 2, no traceback (each
  of CONFIG_ERRORS is one line in the process above; here a model's and TFDS's)."""
  mains = {}
  for name in ('unknown_model', 'missing_dataset'):
    config_file = write_config_file(tiny_config(prepared_data_dir, **CONFIG_ERRORS[name][0]),
                                     tmp_path / f'{name}.py')
    mains[name] = MainProcess(config_file, str(tmp_path / name))  # Together: ~10 s of imports each.
  for name, main in mains.items():
    assert main.finish(300) == 2, (name, main.err()[-3000:])
    assert 'Traceback' not in main.err() + main.out()
    errors = [line for line in main.err().splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and re.search(CONFIG_ERRORS[name][1], errors[0]), (name, main.err())
    assert main.err().rstrip().endswith(errors[0])
