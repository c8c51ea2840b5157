"""Config -> the pieces of a run (mesh, model, optimizer, shardings, jitted steps).

Shared by pre-training, fine-tuning, the benchmark and the pod planner, so that all of them run
the very same step. Every check a user can fail happens here, before anything compiles.
"""
import contextlib
import dataclasses
import functools
import json
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
import optax

from vit_jax import models
from vit_jax import sharding
from vit_jax.errors import KEYS_ELSEWHERE, ConfigError
from vit_jax.models.flops import forward_flops
from vit_jax.training import optimizers
from vit_jax.training import state as state_lib
from vit_jax.training import step as step_lib

REQUIRED_KEYS = ('model', 'dataset', 'total_steps', 'batch', 'base_lr', 'warmup_steps',
                 'image_size')


@dataclasses.dataclass
class Experiment:
  """What one config builds: the mesh, model, optimizer and the state's shapes and
  shardings, shared by training, fine-tuning, the bench and the planner."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: nn.Module
  num_classes: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  abstract_state: Any  # ShapeDtypeStructs (with shardings) of the train state.
  state_shardings: Any

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.config.image_size, self.config.image_size, self.config.get('channels', 3))

  @property
  def keeps_average(self) -> bool:
    """Whether the state holds the Polyak average of the params (config.polyak_decay > 0)."""
    return isinstance(self.abstract_state, state_lib.AveragedTrainState)

  @property
  def flops_per_image(self) -> int:
    """Training FLOPs per image: forward x 3 (the backward pass costs twice the forward)."""
    return 3 * forward_flops(self.model, *self.image_shape)

  @contextlib.contextmanager
  def rules_context(self) -> Iterator[None]:
    """Logical-axis rules and the mesh, active while the model is traced."""
    with nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.set_mesh(self.mesh):
      yield

  def init_state(self, rng: Optional[jax.Array] = None) -> state_lib.TrainState:
    """Params and optimizer state created already sharded (jit with out_shardings)."""
    init = lambda r: state_lib.init_state(self.model, self.tx, r, self.image_shape,
                                          averaged=self.keeps_average)
    return self._init_sharded(init, self.state_shardings, rng)

  def init_params(self, rng: Optional[jax.Array] = None) -> Any:
    """The params alone, created already sharded: all an eval step reads (no optimizer state
    in memory beside it)."""
    init = lambda r: state_lib.init_params(self.model, r, self.image_shape)
    return self._init_sharded(init, self.state_shardings.params, rng)

  def _init_sharded(self, init: Callable, shardings: Any, rng: Optional[jax.Array]) -> Any:
    rng = jax.random.PRNGKey(self.config.get('seed', 0)) if rng is None else rng
    with self.rules_context():
      return jax.jit(init, out_shardings=shardings)(rng)

  def jit_train_step(self) -> Callable:
    """The update, jitted with the state's shardings and donated (updated in place)."""
    config = self.config
    step = step_lib.make_train_step(
        self.model, self.tx, self.schedule, num_classes=self.num_classes,
        loss=config.get('loss', 'softmax_xent'),
        label_smoothing=config.get('label_smoothing', 0.0),
        accum_steps=config.get('accum_steps', 1), seed=config.get('seed', 0),
        polyak_decay=config.get('polyak_decay', 0.0))
    jitted = jax.jit(step, in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
                     out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                     donate_argnums=0)
    return self._in_context(jitted)

  def jit_eval_step(self) -> Callable:
    """Summed loss and correct counts of a padded batch, replicated on every device."""
    step = step_lib.make_eval_step(self.model, num_classes=self.num_classes,
                                   loss=self.config.get('loss', 'softmax_xent'))
    jitted = jax.jit(step, in_shardings=(self.state_shardings.params,
                                         sharding.batch_sharding(self.mesh)),
                     out_shardings=sharding.replicated(self.mesh))
    return self._in_context(jitted)

  def _in_context(self, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args):
      with self.rules_context():
        return fn(*args)
    wrapped.lower = lambda *args: self._lower(fn, *args)
    return wrapped

  def _lower(self, fn, *args):
    with self.rules_context():
      return fn.lower(*args)


FEWSHOT_KEYS = ('datasets', 'every', 'shots', 'seeds', 'l2_reg', 'batch')
# Every top-level key something reads (every configs/ file builds in tests/test_configs.py): a
# config file's misspelt key is an error, as a --config flag's is.
CONFIG_KEYS = frozenset((
    'model', 'model_overrides', 'num_classes', 'channels', 'dtype', 'dataset', 'data_dir',
    'train_split', 'eval_split', 'image_size', 'pp', 'batch', 'batch_eval', 'accum_steps',
    'total_steps', 'optimizer', 'optimizer_moments_dtype', 'momentum', 'b1', 'b2', 'base_lr',
    'warmup_steps', 'decay_type', 'lr_end_fraction', 'weight_decay', 'grad_norm_clip',
    'label_smoothing', 'loss', 'polyak_decay', 'mesh', 'seed', 'eval_every', 'progress_every',
    'checkpoint_every', 'keep_checkpoints', 'profile_steps', 'profile_skip_steps', 'fewshot',
    'init', 'keep_pre_logits'))


def _check_keys(config: ml_collections.ConfigDict) -> None:
  unknown = sorted(set(config) - CONFIG_KEYS)
  if unknown:
    named = [f'{key} (here: {KEYS_ELSEWHERE[key]})' if key in KEYS_ELSEWHERE else key
             for key in unknown]
    raise ConfigError(f'config has keys nothing reads: {", ".join(named)}: rename them (README, '
                      '"Training", lists the keys) or drop them')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Values nothing else checks before compiling: a ConfigError naming the key and the fix."""
  missing = [key for key in REQUIRED_KEYS if key not in config]
  if missing:
    raise ConfigError(f'config lacks {missing}: start from configs/default.py')
  _check_keys(config)
  for key in ('total_steps', 'batch', 'batch_eval', 'image_size', 'progress_every',
              'checkpoint_every', 'accum_steps'):
    if config.get(key, 1) <= 0:
      raise ConfigError(f'config.{key}={config[key]} must be positive')
  if config.get('keep_checkpoints', 3) < 0:
    raise ConfigError(f'config.keep_checkpoints={config.keep_checkpoints} must be positive '
                      '(or 0: keep them all)')
  for key, zero_means in (('eval_every', 'no eval'), ('warmup_steps', 'no warmup'),
                          ('profile_steps', 'no profile'),
                          ('profile_skip_steps', 'the step after compiling')):
    if (config.get(key) or 0) < 0:
      raise ConfigError(f'config.{key}={config[key]} must be positive (or 0: {zero_means})')
  fewshot = config.get('fewshot')
  unknown = sorted(set(fewshot or {}) - set(FEWSHOT_KEYS))
  if unknown:  # A misspelt shots or seeds ran the defaults.
    raise ConfigError(f'config.fewshot has unknown keys {unknown}: its keys are '
                      f'{", ".join(FEWSHOT_KEYS)}')
  if fewshot and fewshot.get('every', 0) <= 0:
    raise ConfigError(f'config.fewshot.every={fewshot.get("every")} must be positive: the probe '
                      'runs every that many steps')
  if not 0 <= config.get('polyak_decay', 0.0) < 1:
    raise ConfigError(f'config.polyak_decay={config.polyak_decay} must be in [0, 1): the weight '
                      'of the old average at each step (the paper: 0.9999; 0: no averaging)')
  _check_recordable(config)
  if not 0 <= config.get('label_smoothing', 0.0) < 1:
    raise ConfigError(f'config.label_smoothing={config.label_smoothing} must be in [0, 1): the '
                      'probability spread over the other classes (0.1 is usual; 0: none)')
  loss = config.get('loss', 'softmax_xent')
  if loss not in step_lib.LOSSES:
    raise ConfigError(f'config.loss={loss!r} is not one of {step_lib.LOSSES}')


def _check_recordable(config: ml_collections.ConfigDict) -> None:
  """Every value plain enough for config.json and each checkpoint's meta: a numpy scalar wrote
  "unserializable object" into config.json, then failed every save (reported at the next)."""
  for key, value in traverse_util.flatten_dict(config.to_dict(), sep='.').items():
    try:
      json.dumps(value)
    except (TypeError, ValueError):
      kind = f'{type(value).__module__}.{type(value).__qualname__}'
      raise ConfigError(f'config.{key}={value!r} is a {kind}, which a checkpoint cannot record: '
                        'use a plain int, float, str, bool, list or tuple') from None


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                eval_too: bool = True) -> None:
  """The global batch (and batch_eval, unless not `eval_too`) must split evenly over
  data-parallel devices, processes and micro-batches."""
  dp = sharding.data_parallel_size(mesh)
  if dp % jax.process_count():
    raise ConfigError(
        f'config.mesh={config.get("mesh", "data:-1")!r} splits the batch {dp} ways over '
        f'{jax.process_count()} processes that each feed their own slice: give data x fsdp a '
        f'multiple of {jax.process_count()}')
  accum = config.get('accum_steps', 1)
  batches = [('batch', config.batch, dp * accum)]  # dp splits over processes.
  if eval_too:
    batches.append(('batch_eval', config.get('batch_eval', config.batch), dp))
  for name, size, parts in batches:
    if size % parts:
      raise ConfigError(
          f'config.{name}={size} is not divisible by {parts} (data-parallel devices {dp}'
          f'{f" x accum_steps {accum}" if name == "batch" and accum > 1 else ""}, '
          f'processes {jax.process_count()}): use a multiple of {parts}')


def _dataset_num_classes(config: ml_collections.ConfigDict) -> int:
  # Imported here: TensorFlow loads only when a dataset is read, so the bench and the planner
  # run on accelerator hosts without it (and start ~3 s sooner).
  from vit_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.get_info(config.dataset, config.get('train_split', 'train'),
                                 config.get('data_dir')).num_classes


def build(config: ml_collections.ConfigDict, *, num_classes: Optional[int] = None,
          devices: Optional[Sequence[jax.Device]] = None) -> Experiment:
  """Validates the config and builds the run's pieces; nothing is allocated or compiled."""
  check_config(config)
  mesh = sharding.make_mesh(config.get('mesh', 'data:-1'), devices)
  check_batch(config, mesh)
  if num_classes is None:
    num_classes = config.get('num_classes') or _dataset_num_classes(config)
  if not config.model:  # A fine-tuning config's None means the checkpoint's.
    raise ConfigError('config.model is not set: pass --config.model=<name>, e.g. ViT-B_16')
  overrides = models.given_overrides(config.get('model_overrides'))
  overrides.setdefault('dtype', config.get('dtype', 'float32'))
  model = models.create(config.model, num_classes=num_classes, **overrides)
  schedule = optimizers.learning_rate_schedule(config)
  tx = optimizers.make_optimizer(config, schedule)
  image_shape = (config.image_size, config.image_size, config.get('channels', 3))
  shapes = jax.eval_shape(functools.partial(
      state_lib.init_state, model, tx, image_shape=image_shape,
      averaged=bool(config.get('polyak_decay'))), jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(shapes, mesh)
  unsplit = sharding.unsplit_note(shapes.params, mesh)
  if unsplit:
    logging.warning('params %s', unsplit)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return Experiment(config=config, mesh=mesh, model=model, num_classes=num_classes,
                    schedule=schedule, tx=tx, abstract_state=abstract, state_shardings=shardings)
