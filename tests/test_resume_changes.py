"""Resuming with another config: each setting changed since the checkpoint is named, and a train
state of another structure (a changed model, optimizer, scan layout; averaging switched off, in
test_polyak.py) is refused in
one line before any array is read, every checkpoint kept. Same tiny recipe as test_resume.py.
"""
import logging
import os
import shutil

import ml_collections
import pytest

from training_setup import (  # baseline and compile_cache are fixtures: imported, pytest uses them
    TOTAL_STEPS, assert_states_equal, baseline, compile_cache, restore_state, tiny_config)
from vit_jax.checkpoints.manager import Checkpointer
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import loop


@pytest.mark.parametrize('overrides,difference', [
    ({'model_overrides': {'mlp_dim': 128}},
     r'another shape in 36 arrays, e\.g\. params/Transformer/encoderblock_0/MlpBlock_3/'
     r'Dense_0/bias: \(256,\) saved, \(128,\) here\).*; changed since the newest: '
     r'eval_every: 20 -> 30; model_overrides.mlp_dim: unset -> 128$'),
    ({'optimizer': 'sgd'},
     r'only in the checkpoints: opt_state/1/\.\.\. \(146 arrays\); only in this config\'s '
     r'state: opt_state/1/1/\.\.\. \(73 arrays\)\).*; changed since the newest: eval_every: '
     r'20 -> 30; optimizer: adamw -> sgd$'),
    ({'model_overrides': {'scan': True}},  # The params named before the optimizer's.
     r'only in the checkpoints: params/Transformer/\.\.\. \(64 arrays\), opt_state/1/0/\.\.\. '
     r'\(128 arrays\); only in this config\'s state: params/Transformer/encoderblock/\.\.\. '
     r'\(16 arrays\), opt_state/1/0/\.\.\. \(32 arrays\)\)')])
def test_resuming_with_a_changed_model_or_optimizer_is_one_line_naming_what_differs(
    baseline, tmp_path, caplog, overrides, difference):
  """Every checkpoint would fail alike: before any is read, one line names the arrays that
  differ and the settings changed; none is called unreadable, moved or deleted."""
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  changed = tiny_config(config.data_dir, **overrides)
  saved_config = open(os.path.join(workdir, 'config.json'), encoding='utf-8').read()
  with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match=(
      r'^the checkpoints in \S+ hold another train state than this config builds \(' +
      difference)) as error:
    loop.train_and_evaluate(changed, workdir)
  assert '\n' not in str(error.value)
  assert not [r for r in caplog.records if 'unreadable' in r.getMessage()]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20', '30']
  # The config the error says to restore is still the one the checkpoints were written with.
  assert open(os.path.join(workdir, 'config.json'), encoding='utf-8').read() == saved_config


def test_another_mesh_resumes_and_an_unchanged_config_says_so(baseline, tmp_path):
  """The check compares shapes, not shardings: the same state on another mesh resumes. A
  structure that changed with no setting changed (a new optax release) says that no setting
  did, rather than only 'resume with the config they were written with'."""
  config, workdir, _ = baseline
  other_mesh = config.copy_and_resolve_references()
  other_mesh.mesh = 'fsdp:-1'
  assert_states_equal(restore_state(other_mesh, workdir), restore_state(config, workdir))
  changed = experiment.build(tiny_config(config.data_dir, model_overrides={'mlp_dim': 128}))
  with Checkpointer(workdir, read_only=True) as checkpointer, pytest.raises(
      ConfigError, match=r'another shape .*; no setting changed since the newest: the code or '
      'the optax or flax release that wrote them built another state$'):
    loop._restore(checkpointer, changed, config)  # pylint: disable=protected-access


def test_the_structure_is_checked_on_the_newest_step_whose_metadata_reads(baseline, tmp_path):
  """A corrupt newest step is left to the fallback (the same config resumes from the one
  before), and does not hide a changed model."""
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  open(os.path.join(workdir, 'checkpoints', '30', 'state', '_METADATA'), 'w').close()
  with pytest.raises(ConfigError, match='another shape in 36 arrays'):
    restore_state(tiny_config(config.data_dir, model_overrides={'mlp_dim': 128}), workdir)
  assert int(restore_state(config, workdir).step) == 20


def test_resuming_with_changed_settings_names_each_change(baseline, tmp_path, caplog):
  """A new batch or seed resumes (as a larger total_steps does), but not silently."""
  config, base_workdir, _ = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_workdir, workdir)
  assert loop.config_changes(_saved_meta(workdir)['config'], config) == []
  changed = config.copy_and_resolve_references()
  changed.batch, changed.seed = 2 * config.batch, config.seed + 1
  with caplog.at_level(logging.WARNING):
    assert loop.train_and_evaluate(changed, workdir) == {'step': TOTAL_STEPS}  # Nothing to train.
  [warning] = [r.getMessage() for r in caplog.records if 'settings changed' in r.getMessage()]
  assert warning.endswith(f': batch: {config.batch} -> {2 * config.batch}; '
                          f'seed: {config.seed} -> {config.seed + 1}')
  # A tuple is saved as a JSON list: the same setting.
  saved = {'pp': {'randaug': [2, 10]}, 'mesh': 'data:-1'}
  assert loop.config_changes(saved, ml_collections.ConfigDict(
      {'pp': {'randaug': (2, 10)}, 'mesh': 'data:-1'})) == []
  assert loop.config_changes(saved, ml_collections.ConfigDict({'pp': {'randaug': (2, 15)}})) == [
      'mesh: data:-1 -> unset', 'pp.randaug: [2, 10] -> [2, 15]']
  # A key the configs gained since (polyak_decay), at its off value, is no change; on, it is.
  for value, changes in ((0.0, []), (0.9, ['polyak_decay: unset -> 0.9'])):
    assert loop.config_changes(saved, ml_collections.ConfigDict(
        dict(saved, polyak_decay=value))) == changes


def _saved_meta(workdir):
  with Checkpointer(workdir, read_only=True, async_save=False) as checkpointer:
    return checkpointer.restore_meta()


def test_a_key_added_since_at_its_default_or_off_is_no_change():
  """A workdir saved before pp.eval.crop_fraction (or polyak_decay) existed resumes without a
  warning about them, as the code took their defaults then; any other value is named."""
  saved = {'batch': 8, 'pp': {'eval': {'crop': 'resize_crop'}}}
  config = ml_collections.ConfigDict({'batch': 8, 'polyak_decay': 0.0, 'pp': {
      'eval': {'crop': 'resize_crop', 'crop_fraction': 0.875}}})
  assert loop.config_changes(saved, config) == []
  config.pp.eval.crop_fraction = 0.9
  config.pp.eval.crop = 'timm'
  assert loop.config_changes(saved, config) == ['pp.eval.crop: resize_crop -> timm',
                                                'pp.eval.crop_fraction: unset -> 0.9']
