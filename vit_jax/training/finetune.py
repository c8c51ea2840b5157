"""Fine-tuning: a pre-trained checkpoint transferred into the very same training loop.

The paper's transfer (Sec. 3.2): the pre-trained body, a zero-initialised head for the new classes,
position embeddings 2D-interpolated to the new patch grid. Everything else (mesh and sharding,
gradient accumulation, Orbax checkpoints and resuming, metrics) is the pre-training loop's: this
module only builds the initial state and hands it to `loop.train_and_evaluate`.
"""
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
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

def paper_config(dataset: str, *, total_steps: int, base_lr: float,
                 model: Optional[str] = None, image_size: int = 384, train_split: str = 'train',
                 eval_split: str = 'test') -> ml_collections.ConfigDict:
  """The paper's fine-tuning recipe (Table 4) for one dataset.

  SGD with momentum 0.9, batch 512, cosine decay, gradient clipping at global norm 1, no weight
  decay, 384 px. Warmup is 500 steps, a fifth of the run for recipes under 2,500 steps (a
  500-step run warms up for 100, as the released AugReg fine-tuning config does).
  """
  config = ml_collections.ConfigDict()
  # A pre-training workdir, a released-layout .npz or timm's .safetensors.
  config.init = ''
  config.keep_pre_logits = False  # The paper drops the pre-logits layer when transferring.
  # None: the checkpoint's (a workdir's saved config, timm's config.json); a .npz holds none, so
  # it needs one named, and so does training the config from scratch with `vit_jax.main`.
  config.model = ml_collections.config_dict.placeholder(str) if model is None else model
  # None: the checkpoint's setting. Listed so that `--config.model_overrides.scan=True` works.
  config.model_overrides = ml_collections.ConfigDict({
      k: ml_collections.config_dict.placeholder(type(v))
      for k, v in models.COMPUTE_OPTIONS.items()})
  # None: no dropout (pre-training's is not inherited); the released code fine-tunes ViT-L,
  # ViT-H and R50+ViT-B with --config.model_overrides.dropout_rate=0.1.
  config.model_overrides.dropout_rate = ml_collections.config_dict.placeholder(float)
  config.dataset = dataset
  # None: TFDS_DATA_DIR or ~/tensorflow_datasets. A typed placeholder, so that
  # --config.data_dir=DIR works on the command line.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = train_split
  config.eval_split = eval_split
  config.image_size = image_size
  config.channels = 3
  config.pp = pp_options.config_dict(train={'crop': 'inception', 'flip': True},
                                     eval_crop='resize')
  config.batch = 512
  config.batch_eval = 512
  config.accum_steps = 1  # The released code uses 8 for B/16 at 384 px on a TPUv3-8.
  config.total_steps = total_steps
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.base_lr = base_lr
  config.weight_decay = 0.0
  # Recipes under 2,500 steps warm up for a fifth of the run, also when --config.total_steps
  # changes it; a longer recipe keeps 500 (shortened below that, set --config.warmup_steps too).
  config.warmup_steps = 500 if total_steps >= 2500 else config.get_ref('total_steps') // 5
  config.decay_type = 'cosine'
  config.grad_norm_clip = 1.0
  config.label_smoothing = 0.0
  # > 0: evaluate (and save for readers) the Polyak average of the params, as the paper's
  # fine-tunes of Table 2 at 512 and 518 px did (0.9999, Sec. 4.1).
  config.polyak_decay = 0.0
  config.dtype = 'float32'
  config.mesh = 'data:-1'
  config.eval_every = max(total_steps // 10, 1)
  config.progress_every = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 2
  config.profile_steps = 0  # > 0: trace that many steps into WORKDIR/profile (XProf).
  config.profile_skip_steps = 5  # Steps of the run before the trace (compile, warm-up).
  config.seed = 0
  return config


def with_architecture(config: ml_collections.ConfigDict, model: str,
                      model_overrides: dict[str, Any], channels: int) -> ml_collections.ConfigDict:
  """A copy of `config` with a checkpoint's architecture: model name, overrides, input channels.

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
  return config


def initial_state(exp: experiment.Experiment, pretrained: restore.Pretrained, *,
                  keep_pre_logits: bool = False) -> state_lib.TrainState:
  """Step 0 of fine-tuning: the transferred params and a fresh optimizer state, on the mesh."""
  init_fn = lambda rng: exp.model.init(rng, jnp.zeros((1,) + exp.image_shape))['params']
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
    architecture = (saved['model'], saved.get('model_overrides') or {}, saved.get('channels', 3))
  else:  # For a .npz, the model is config.model; for a workdir, the one it was trained as.
    pretrained = restore.load(config.init, config.get('model'),
                              models.given_overrides(config.get('model_overrides')))
    architecture = (pretrained.model, pretrained.model_overrides, pretrained.channels)
  config = with_architecture(config, *architecture)
  exp = experiment.build(config)
  state = None
  if pretrained is not None:
    logging.info('fine-tuning %s from %s', config.model, pretrained.source)
    state = initial_state(exp, pretrained, keep_pre_logits=config.get('keep_pre_logits', False))
  return loop.train_and_evaluate(config, workdir, exp=exp, initial_state=state)
