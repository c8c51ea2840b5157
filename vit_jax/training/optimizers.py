"""Learning-rate schedules and optimizers from the config, all plain optax."""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax.errors import ConfigError

DECAY_TYPES = ('cosine', 'linear', 'constant')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
MOMENT_DTYPES = ('float32', 'bfloat16')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `base_lr`, then cosine / linear decay to `base_lr * lr_end_fraction` (0
  unless set) at `total_steps`, or constant."""
  decay_type = config.get('decay_type', 'cosine')
  if decay_type not in DECAY_TYPES:
    raise ConfigError(f'decay_type={decay_type!r} is not one of {DECAY_TYPES}')
  warmup, total = config.warmup_steps, config.total_steps
  if not config.base_lr > 0:
    raise ConfigError(f'base_lr={config.base_lr} must be positive: set --config.base_lr')
  if not 0 <= config.get('lr_end_fraction', 0.0) <= 1:
    raise ConfigError(f'lr_end_fraction={config.lr_end_fraction} must be in [0, 1]: the decay '
                      'ends at base_lr times it')
  if warmup >= total:
    raise ConfigError(f'warmup_steps={warmup} must be below total_steps={total}: lower '
                      '--config.warmup_steps')
  end_value = config.base_lr * config.get('lr_end_fraction', 0.0)
  decay_steps = total - warmup
  decay = {
      'cosine': lambda: optax.cosine_decay_schedule(config.base_lr, decay_steps,
                                                    alpha=end_value / config.base_lr),
      'linear': lambda: optax.linear_schedule(config.base_lr, end_value, decay_steps),
      'constant': lambda: optax.constant_schedule(config.base_lr),
  }[decay_type]()
  warmup_schedule = optax.linear_schedule(0.0, config.base_lr, warmup)
  return optax.join_schedules([warmup_schedule, decay], [warmup])


def _decay_mask(params):
  """Weight decay on dense and conv kernels only: not on biases, norms, the class token, the
  position embeddings or the MAP probe (as big_vision's and timm's recipes)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping -> the optimizer. 'adam' and 'adamw' are one: decoupled weight decay
  scaled by the learning rate, as the paper's Flax `optim.Adam(weight_decay=...)` (recipes.py),
  but on kernels only (`_decay_mask`)."""
  name = config.get('optimizer', 'adam')
  if name not in OPTIMIZERS:
    raise ConfigError(f'optimizer={name!r} is not one of {OPTIMIZERS}')
  moments = config.get('optimizer_moments_dtype') or 'float32'
  if moments not in MOMENT_DTYPES:
    raise ConfigError(f'optimizer_moments_dtype={moments!r} is not one of {MOMENT_DTYPES}')
  mu_dtype = jnp.bfloat16 if moments == 'bfloat16' else None
  weight_decay = config.get('weight_decay', 0.0)
  clip = config.get('grad_norm_clip')
  # optax takes these negative and trains away from the minimum, silently.
  for key, value, zero_means in (('weight_decay', weight_decay, 'no weight decay'),
                                 ('grad_norm_clip', clip, 'no clipping')):
    if (value or 0) < 0:
      raise ConfigError(f'{key}={value} must be positive (or 0: {zero_means}): set '
                        f'--config.{key}')
  if name == 'sgd':
    opt = optax.sgd(schedule, momentum=config.get('momentum', 0.9),
                    accumulator_dtype=mu_dtype)
    if weight_decay:
      opt = optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), opt)
  else:
    opt = optax.adamw(schedule, b1=config.get('b1', 0.9), b2=config.get('b2', 0.999),
                      mu_dtype=mu_dtype, weight_decay=weight_decay, mask=_decay_mask)
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
