"""Fine-tuning: a pre-trained checkpoint transferred into the very same training loop.

The paper's transfer (Sec. 3.2): the pre-trained body, a zero-initialised head for the new classes,
position embeddings 2D-interpolated to the new patch grid. Everything else (mesh and sharding,
gradient accumulation, Orbax checkpoints and resuming, metrics) is the pre-training loop's: this
module only builds the initial state and hands it to `loop.train_and_evaluate`.
"""
import logging
import os
from typing import Any, Mapping

import jax
import ml_collections

from vit_jax import models
from vit_jax import sharding
from vit_jax.checkpoints import restore
from vit_jax.checkpoints import transfer
from vit_jax.checkpoints.manager import Checkpointer, checkpoint_dir
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError
from vit_jax.training import experiment
from vit_jax.training import loop
from vit_jax.training import state as state_lib

# Model options of a pre-training recipe that fine-tuning does not inherit (set them in the
# fine-tune config's model_overrides to keep them).
PRETRAIN_ONLY = ('dropout_rate', 'attention_dropout_rate', 'head_bias_init')

def with_architecture(config: ml_collections.ConfigDict, model: str,
                      model_overrides: dict[str, Any], channels: int,
                      normalisation: Mapping[str, Any] = pp_options.NORMALISATION
                      ) -> ml_collections.ConfigDict:
  """A copy of `config` with a checkpoint's architecture: model name, overrides, input channels,
  and the inputs its weights expect (the mean and std of `normalisation`, e.g. its pp.eval
  options, for pp.train and pp.eval).

  Of the checkpoint's overrides, the pre-training recipe's regularisation and head init
  (`PRETRAIN_ONLY`) and, unless `keep_pre_logits`, the pre-logits layer are dropped; the
  fine-tune config's own `model_overrides` apply on top.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  dropped = PRETRAIN_ONLY + (() if config.get('keep_pre_logits') else ('representation_size',))
  overrides = {k: v for k, v in models.given_overrides(model_overrides).items()
               if k not in dropped}
  overrides.update(models.given_overrides(config.get('model_overrides')))
  for key, value in (('model', model), ('channels', channels)):
    if config.get(key) != value:
      logging.info('config.%s=%s replaced by %s, the checkpoint\'s', key, config.get(key), value)
    config[key] = value
  config.model_overrides = overrides
  expected = {key: tuple(normalisation[key]) for key in pp_options.NORMALISATION}
  if not config.get('pp'):
    config.pp = ml_collections.ConfigDict()
  for part in ('train', 'eval'):
    given, options = pp_options.from_config(config, part), config.pp.get(part)
    config.pp[part] = ml_collections.ConfigDict(
        {**(options.to_dict() if options else {}), **expected})
    for key, values in expected.items():
      if given[key] != values:
        logging.info("config.pp.%s.%s=%s replaced by %s, what the checkpoint's weights expect",
                     part, key, given[key], values)
  return config


def initial_state(exp: experiment.Experiment, pretrained: restore.Pretrained, *,
                  keep_pre_logits: bool = False) -> state_lib.TrainState:
  """Step 0 of fine-tuning: the transferred params and a fresh optimizer state, on the mesh."""
  init_fn = lambda rng: state_lib.init_params(exp.model, rng, exp.image_shape)
  rng = jax.random.PRNGKey(exp.config.get('seed', 0))
  with exp.rules_context():
    # The checkpoint gives every other value: the new model's init contributes its shapes and
    # only the new layers' values, so XLA drops the other initialisers and no device holds a
    # second copy of the model.
    init = dict(jax.eval_shape(init_fn, rng))
    init.update(jax.device_get(jax.jit(
        lambda r: {k: v for k, v in init_fn(r).items() if k in transfer.NEW_LAYERS},
        out_shardings=sharding.replicated(exp.mesh))(rng)))
  params = transfer.transfer_params(
      pretrained.params, init, keep_pre_logits=keep_pre_logits,
      new_grid=models.token_grid(exp.model, *exp.image_shape[:2]),
      old_grid=pretrained.posemb_grid(),
      log=logging.info if jax.process_index() == 0 else lambda line: None,  # Said once a run.
      what=f'the pre-trained checkpoint {pretrained.source}')
  # Every process holds the whole host copy; each device takes its shard of it.
  params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      params, exp.state_shardings.params)
  fresh = lambda p: state_lib.fresh_state(p, exp.tx, averaged=exp.keeps_average)
  return jax.jit(fresh, out_shardings=exp.state_shardings)(params)


def _same_path(a: str, b: str) -> bool:
  if '://' in a or '://' in b:
    return a.rstrip('/') == b.rstrip('/')
  return os.path.realpath(a) == os.path.realpath(b)


def _has_checkpoints(workdir: str) -> bool:
  if '://' not in workdir and not os.path.isdir(checkpoint_dir(workdir)):
    return False
  with Checkpointer(workdir, read_only=True) as checkpointer:
    return bool(checkpointer.all_steps())


def _check_resumes_the_same_run(saved: dict[str, Any], config: ml_collections.ConfigDict,
                                workdir: str) -> None:
  """A workdir with checkpoints resumes its own fine-tune: another `init`, model or
  `keep_pre_logits` would be ignored (and config.json would name them), and a pre-training run's
  workdir is not a fine-tune's."""
  saved_init, init = saved.get('init'), config.init
  if not saved_init:
    raise ConfigError(f'--workdir {workdir} holds the checkpoints of a pre-training run, not of a '
                      'fine-tune: fine-tune into a new workdir (pass that run as '
                      f'--config.init={workdir})')
  if saved_init != init and not _same_path(saved_init, init):
    raise ConfigError(f'--workdir {workdir} holds a fine-tune of {saved_init}, not of {init}: '
                      f'pass --config.init={saved_init} to resume it, or a new --workdir to '
                      f'fine-tune {init}')
  if config.get('model') and config.model != saved['model']:
    raise ConfigError(f'--workdir {workdir} holds a fine-tune of a {saved["model"]}, not of a '
                      f'{config.model}: drop --config.model to resume it, or pass a new --workdir')
  keep = bool(saved.get('keep_pre_logits'))
  if bool(config.get('keep_pre_logits')) != keep:
    raise ConfigError(f'--workdir {workdir} holds a fine-tune with keep_pre_logits={keep}: pass '
                      f'--config.keep_pre_logits={keep} to resume it, or a new --workdir')


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes `config.init` per `config`; resumes instead when `workdir` has checkpoints.

  A resumed run takes its architecture from its own saved config, so the pre-trained checkpoint
  is not read again (and need not exist any more).
  """
  if not config.get('init'):
    raise ConfigError('config.init is empty: pass --config.init=<pre-training workdir, .npz or '
                      'timm .safetensors>')
  if _same_path(config.init, workdir):
    raise ConfigError(f'--workdir {workdir} is the pre-training workdir config.init: fine-tune '
                      'into a new workdir, so the pre-training checkpoints stay as they are')
  loop.check_run(config, workdir)  # Before a pre-trained checkpoint (minutes from gs://) is read.
  pretrained = None
  if _has_checkpoints(workdir):
    saved = restore.saved_config(workdir)
    _check_resumes_the_same_run(saved, config, workdir)
    architecture = (saved['model'], saved.get('model_overrides') or {}, saved.get('channels', 3),
                    pp_options.from_config(saved, 'eval'))
  else:  # For a .npz, the model is config.model; for a workdir, the one it was trained as.
    pretrained = restore.load(config.init, config.get('model'),
                              models.given_overrides(config.get('model_overrides')))
    architecture = (pretrained.model, pretrained.model_overrides, pretrained.channels,
                    pretrained.eval_pp())
  config = with_architecture(config, *architecture)
  exp = experiment.build(config)
  state = None
  if pretrained is not None:
    logging.info('fine-tuning %s from %s', config.model, pretrained.source)
    state = initial_state(exp, pretrained, keep_pre_logits=config.get('keep_pre_logits', False))
  return loop.train_and_evaluate(config, workdir, exp=exp, initial_state=state)
