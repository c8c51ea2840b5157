"""Polyak averaging (config.polyak_decay): the average of the params that the paper's Table 2
fine-tunes evaluated (0.9999, Sec. 4.1), kept beside the params, evaluated, checkpointed, resumed
and read by every command that reads a checkpoint. The tiny recipe on real digits batches."""
import contextlib
import io
import json
import shutil

import jax
import numpy as np
import pytest

import param_trees
from training_setup import compile_cache, tiny_config  # pylint: disable=unused-import
from vit_jax.checkpoints import restore
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify
from vit_jax.training import experiment
from vit_jax.training import loop
from vit_jax.training.state import AveragedTrainState, TrainState


def _trajectory(config, steps):
  """The params after each of `steps` train steps (index 0: the init), and the last state."""
  exp = experiment.build(config)
  train_step, state = exp.jit_train_step(), exp.init_state()
  batches = global_batch.prefetch_to_mesh(input_pipeline.train_iterator(config, 0), exp.mesh)
  params = [jax.device_get(state.params)]
  for _ in range(steps):
    state, _ = train_step(state, next(batches))
    params.append(jax.device_get(state.params))
  return params, jax.device_get(state)


def test_the_average_moves_towards_each_step_s_params_and_training_is_unchanged(
    prepared_data_dir):
  # The warm-up's (1 + n) / (10 + n) after n updates is 0.18, 0.25, 0.31, then above 0.35.
  decay = 0.35
  averaged_run, last = _trajectory(tiny_config(prepared_data_dir, polyak_decay=decay), 6)
  plain_run, plain_last = _trajectory(tiny_config(prepared_data_dir), 6)
  assert isinstance(last, AveragedTrainState) and type(plain_last) is TrainState
  for averaged, plain in zip(averaged_run, plain_run):
    param_trees.assert_bit_identical(averaged, plain)  # The average is only read.
  expected = averaged_run[0]
  for n, params in enumerate(averaged_run[1:], start=1):
    weight = min(decay, (1 + n) / (10 + n))
    expected = jax.tree.map(lambda p, a: p * (1 - weight) + a * weight, params, expected)
  for key, value in param_trees.flat(expected).items():
    np.testing.assert_allclose(param_trees.flat(last.averaged_params)[key], value, rtol=1e-6,
                               atol=1e-7, err_msg=key)
  # Neither the first nor the last params: the six steps moved the kernels apart.
  kernel = lambda tree: param_trees.flat(tree)['head/kernel']
  assert not np.allclose(kernel(last.averaged_params), kernel(last.params), atol=1e-4)
  assert not np.allclose(kernel(last.averaged_params), kernel(averaged_run[0]), atol=1e-4)


@pytest.fixture(scope='module')
def averaged_run(prepared_data_dir, tmp_path_factory):
  """30 steps with polyak_decay=0.9 (checkpoints at 10, 20, 30; an evaluation at the end)."""
  config = tiny_config(prepared_data_dir, polyak_decay=0.9)
  workdir = str(tmp_path_factory.mktemp('polyak'))
  with contextlib.redirect_stdout(io.StringIO()) as stdout:
    result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result | {'stdout': stdout.getvalue()}


def _saved_state(config, workdir):
  exp = experiment.build(config)
  with Checkpointer(workdir, read_only=True) as checkpointer:
    state, _ = checkpointer.restore_latest(exp.abstract_state)
  return exp, state


def test_evaluation_and_readers_take_the_average(averaged_run):
  config, workdir, result = averaged_run
  exp, state = _saved_state(config, workdir)
  eval_step, eval_data = exp.jit_eval_step(), loop.make_eval_data(exp)
  averaged = loop.evaluate(exp, eval_step, state.averaged_params, eval_data)
  plain = loop.evaluate(exp, eval_step, state.params, eval_data)
  assert result['test/loss'] == pytest.approx(averaged['test/loss'], rel=1e-6)
  assert result['test/accuracy'] == averaged['test/accuracy']
  assert abs(plain['test/loss'] - averaged['test/loss']) > 1e-3  # Not the params evaluated.
  # infer, analyze, fewshot, export and fine-tuning read a workdir through restore.load.
  pretrained = restore.load(workdir)
  param_trees.assert_bit_identical(pretrained.params, jax.device_get(state.averaged_params))
  assert pretrained.source.endswith('(step 30, Polyak-averaged params)')
  out = io.StringIO()
  classify.report(classify.Classifier.from_checkpoint(workdir), [], as_json=True, out=out)
  assert json.loads(out.getvalue())['params'] == pretrained.source  # infer --json says so.
  first = result['stdout'].splitlines()[0]
  assert first.startswith('keeping the Polyak average of the params (polyak_decay=0.9)')
  assert first.endswith('holds the decay below 0.9 all run: 0.77500 at step 30')  # 31 / 40.


def test_a_resumed_run_carries_the_average_on_bit_exactly(averaged_run, tmp_path):
  config, workdir, _ = averaged_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(f'{resumed}/checkpoints/30')  # Resumes from step 20.
  loop.train_and_evaluate(config, resumed)
  _, expected = _saved_state(config, workdir)
  _, state = _saved_state(config, resumed)
  param_trees.assert_bit_identical(jax.device_get(state.averaged_params),
                                   jax.device_get(expected.averaged_params))
  param_trees.assert_bit_identical(jax.device_get(state.params), jax.device_get(expected.params))


@pytest.fixture(scope='module')
def plain_run(prepared_data_dir, tmp_path_factory):
  """10 steps without averaging (a checkpoint at 10)."""
  config = tiny_config(prepared_data_dir, total_steps=10, eval_every=0)
  workdir = str(tmp_path_factory.mktemp('plain'))
  loop.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.parametrize('run,decay,message', [
    # The average would be lost.
    ('averaged_run', 0.0, r'\(only in the checkpoints: averaged_params/\.\.\. \(72 arrays\)\).*'
                          r"; changed since the newest: (.*; )?polyak_decay: 0.9 -> 0.0(;|$)"),
    # Averaging turned on with another change: the one line names both.
    ('plain_run', 0.9, r"\(another shape in 36 arrays, e\.g\. params/Transformer/encoderblock_0/"
                       r"MlpBlock_3/Dense_0/bias: \(\d+,\) saved, \(24,\) here; only in this "
                       r"config's state: averaged_params/\.\.\. \(72 arrays\)\).*; changed since "
                       r'the newest: (.*; )?model_overrides\.mlp_dim: unset -> 24(;|$)')])
def test_switching_averaging_off_or_with_another_change_is_one_line(run, decay, message, request,
                                                                    tmp_path):
  config, workdir = request.getfixturevalue(run)[:2]
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  with Checkpointer(resumed, read_only=True) as checkpointer:
    steps = checkpointer.all_steps()
  saved_config = open(f'{resumed}/config.json').read()
  config = tiny_config(config.data_dir, polyak_decay=decay, total_steps=40)
  if run == 'plain_run':
    config.model_overrides.mlp_dim = 24
  with pytest.raises(ConfigError, match=message) as error:
    loop.train_and_evaluate(config, resumed)
  assert '\n' not in str(error.value)
  with Checkpointer(resumed, read_only=True) as checkpointer:
    assert checkpointer.all_steps() == steps  # Nothing set aside or lost.
  assert open(f'{resumed}/config.json').read() == saved_config


def test_averaging_turned_on_when_resuming_starts_at_the_checkpoints_params(plain_run, tmp_path,
                                                                           caplog):
  config, workdir = plain_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  _, at_10 = _saved_state(config, resumed)
  config = tiny_config(config.data_dir, polyak_decay=0.9, total_steps=11, eval_every=0)
  with caplog.at_level('WARNING'):
    loop.train_and_evaluate(config, resumed)
  assert ('polyak_decay=0.9 is new since the checkpoint at step 10: the average starts at that '
          "step's params") in caplog.text
  _, at_11 = _saved_state(config, resumed)
  assert int(at_11.step) == 11
  decay = min(0.9, (1 + 11) / (10 + 11))  # Warmed up by the steps before, as a fresh run's.
  for key, value in param_trees.flat(at_11.averaged_params).items():
    np.testing.assert_allclose(value, decay * param_trees.flat(at_10.params)[key]
                               + (1 - decay) * param_trees.flat(at_11.params)[key],
                               rtol=1e-5, atol=1e-7, err_msg=key)
  assert not np.allclose(param_trees.flat(at_11.params)['head/kernel'],
                         param_trees.flat(at_10.params)['head/kernel'], atol=1e-5)


@pytest.mark.parametrize('decay,total_steps,reached', [
    (0.9, 30, '0.77500 at step 30'), (0.9999, 20_000, '0.99955 at step 20000'),
    (0.9, 200, None), (0.9999, 1_000_000, None), (1e-9, 2, None)])
def test_the_first_line_says_when_the_warm_up_holds_the_decay_all_run(decay, total_steps,
                                                                      reached):
  note = loop._polyak_note(decay, total_steps)  # pylint: disable=protected-access
  assert note.startswith(f'keeping the Polyak average of the params (polyak_decay={decay})')
  if reached:
    assert note.endswith(f'holds the decay below {decay} all run: {reached}')
  else:  # Reached (float32 would round 0.9 and 0.9999 down and claim otherwise).
    assert 'warm-up' not in note


@pytest.mark.parametrize('decay', [1.0, -0.1])
def test_a_decay_outside_zero_to_one_is_a_config_error(decay, prepared_data_dir):
  with pytest.raises(ConfigError, match=rf'config.polyak_decay={decay} must be in \[0, 1\)'):
    experiment.build(tiny_config(prepared_data_dir, polyak_decay=decay))
