"""The `pp` options of a config (pp.train, pp.eval) over their defaults, checked before the
pipeline is built: a bad value would otherwise fail inside tf.data or numpy, as a raw error at
the first batch.

The keys (every one optional; an unknown key is a ConfigError):
  pp.train.crop: 'inception' (default; area inception_area_min..1, aspect
      3/4..4/3) | 'resize' | 'random_crop' (resize, reflect-pad by
      random_crop_pad pixels, random crop back: for tiny images like 28px).
  pp.train.inception_area_min: 0.05.
  pp.train.random_crop_pad: 4.
  pp.train.flip: True (random horizontal flip).
  pp.train.mixup: 0.0 (beta alpha; 0 = off). When > 0, each batch is mixed with
      itself rolled by one, at one weight per global batch (the larger one on the example
      itself, as big_vision mixes), and 'label' becomes float32 [B, num_classes] soft
      labels instead of int32 [B].
  pp.train.randaug: None, or (num_layers, magnitude >= 0): AugReg's (2, 10), (2, 15) or
      (2, 20) (`vit_jax.data.randaug`: big_vision's 16 ops).
  pp.train.shuffle_buffer: 50_000 encoded examples (capped at the slice size); splits that
      fit it or `input_pipeline.IN_MEMORY_BYTES` are permuted exactly in memory instead.
  pp.train.mean, pp.train.std: as pp.eval's, and the same (a ConfigError otherwise); fine-tuning
      sets both to its checkpoint's.
  pp.eval.crop: 'resize' (default, the released fine-tuning code's) | 'resize_crop' (shorter
      side to image_size / crop_fraction, then central crop: big_vision's ImageNet eval) |
      'timm' (timm's eval: shorter side to floor(image_size / crop_fraction), bicubic, central
      crop; the crop of timm's weights, its crop_pct their crop_fraction).
  pp.eval.crop_fraction: 0.875 (resize_crop and timm: the central fraction of the resized image
      kept, in (0, 1]).
  pp.eval.mean, pp.eval.std: (0.5,), (0.5,): inputs are (pixels / 255 - mean) / std, one value
      for every channel or one per channel; the released ViTs' [-1, 1] by default, ImageNet's
      (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225) for DeiT's weights (timm's config.json
      says so).
"""
import numbers
from typing import Any

import ml_collections

from vit_jax.errors import ConfigError

NORMALISATION = dict(mean=(0.5,), std=(0.5,))  # [-1, 1], the released ViTs' inputs.
TRAIN_DEFAULTS = dict(crop='inception', inception_area_min=0.05, random_crop_pad=4,
                      flip=True, mixup=0.0, randaug=None, shuffle_buffer=50_000, **NORMALISATION)
EVAL_DEFAULTS = dict(crop='resize', crop_fraction=0.875, **NORMALISATION)
EVAL_CROPS = ('resize', 'resize_crop', 'timm')


def _options(part: Any, defaults: dict, where: str) -> dict:
  """`part` (a ConfigDict, dict or None) over `defaults`; typos are errors."""
  part = part or {}
  if not isinstance(part, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f'{where}={part!r}: {where} holds options, e.g. '
                      f'{where}.crop={defaults["crop"]!r}')
  unknown = set(part.keys()) - set(defaults)
  if unknown:
    raise ConfigError(f'unknown {where} keys {sorted(unknown)}: valid keys are '
                      f'{sorted(defaults)}')
  return {k: part.get(k, v) for k, v in defaults.items()}


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value) -> bool:
  return _is_number(value) and isinstance(value, numbers.Integral) and value >= 0


def config_dict(train: dict, eval_crop: str) -> ml_collections.ConfigDict:
  """`config.pp` with every key, the given ones over the defaults, so that any can be set on
  the command line (--config.pp.train.mixup=0.2, --config.pp.train.randaug='(2, 15)')."""
  train = {**TRAIN_DEFAULTS, **train}
  if train['randaug'] is None:
    train['randaug'] = ml_collections.config_dict.placeholder(tuple)
  return ml_collections.ConfigDict({'train': train, 'eval': {**EVAL_DEFAULTS, 'crop': eval_crop}})


def defaults_by_key() -> dict[str, Any]:
  """Each option's default by its dotted config key ('pp.eval.crop_fraction': 0.875)."""
  return {f'pp.{part}.{key}': value
          for part, defaults in (('train', TRAIN_DEFAULTS), ('eval', EVAL_DEFAULTS))
          for key, value in defaults.items()}


def train_options(part: Any) -> dict:
  """pp.train over its defaults, checked."""
  opts = _options(part, TRAIN_DEFAULTS, 'pp.train')
  if opts['crop'] not in ('inception', 'resize', 'random_crop'):
    raise ConfigError(f'pp.train.crop={opts["crop"]!r}: use inception, resize '
                      'or random_crop')
  if not isinstance(opts['flip'], bool):
    raise ConfigError(f'pp.train.flip={opts["flip"]!r}: use True or False')
  if not _is_number(opts['mixup']) or opts['mixup'] < 0:
    raise ConfigError(f'pp.train.mixup={opts["mixup"]!r}: use a beta alpha >= 0 (0 is off)')
  area_min = opts['inception_area_min']
  if not _is_number(area_min) or not 0 < area_min <= 1:
    raise ConfigError(f'pp.train.inception_area_min={area_min!r}: use a fraction of the image '
                      'area in (0, 1], e.g. 0.05')
  if not _is_count(opts['random_crop_pad']):
    raise ConfigError(f'pp.train.random_crop_pad={opts["random_crop_pad"]!r}: use pixels >= 0')
  if not _is_count(opts['shuffle_buffer']) or not opts['shuffle_buffer']:
    raise ConfigError(f'pp.train.shuffle_buffer={opts["shuffle_buffer"]!r}: use a positive '
                      'number of examples')
  layers_and_magnitude = opts['randaug']
  if layers_and_magnitude is not None:
    if (not isinstance(layers_and_magnitude, (tuple, list)) or len(layers_and_magnitude) != 2
        or not _is_count(layers_and_magnitude[0]) or not _is_number(layers_and_magnitude[1])
        or layers_and_magnitude[1] < 0):
      raise ConfigError(f'pp.train.randaug={layers_and_magnitude!r}: use None or (num_layers '
                        '>= 0, magnitude >= 0), e.g. (2, 10)')
    opts['randaug'] = (int(layers_and_magnitude[0]), float(layers_and_magnitude[1]))
  return _with_normalisation(opts, 'pp.train')


def check_channels(channels: int) -> None:
  """Called before any tf.data map: raised inside one, the error arrives as a staging
  traceback."""
  if channels not in (1, 3):
    raise ConfigError(f'channels={channels!r}: set the model channels to 1 (grayscale) '
                      'or 3 (RGB)')


def eval_options(part: Any) -> dict:
  """pp.eval over its defaults, checked."""
  opts = _options(part, EVAL_DEFAULTS, 'pp.eval')
  if opts['crop'] not in EVAL_CROPS:
    raise ConfigError(f'pp.eval.crop={opts["crop"]!r}: use one of {EVAL_CROPS}')
  if not _is_number(opts['crop_fraction']) or not 0 < opts['crop_fraction'] <= 1:
    raise ConfigError(f'pp.eval.crop_fraction={opts["crop_fraction"]!r}: use the fraction of the '
                      'resized image kept, in (0, 1], e.g. 0.875')
  return _with_normalisation(opts, 'pp.eval')


def _with_normalisation(opts: dict, where: str) -> dict:
  """`opts` with its mean and std checked, as tuples of floats."""
  for key in NORMALISATION:
    values = opts[key] if isinstance(opts[key], (tuple, list)) else (opts[key],)
    if (not values or not all(_is_number(v) for v in values)
        or (key == 'std' and min(values) <= 0)):
      raise ConfigError(f'{where}.{key}={opts[key]!r}: use one value for every channel or one per '
                        f'channel, fractions of 255{" above 0" if key == "std" else ""}, e.g. '
                        '(0.5,)')
    values = tuple(float(v) for v in values)
    # One value when all are the same: timm's configs give 3 for grey models too.
    opts[key] = values[:1] if len(set(values)) == 1 else values
  return opts


def check_normalisation(opts: dict, channels: int, where: str) -> None:
  """The mean and std of pp.train or pp.eval (`where`) against the model's channels; called
  before any tf.data map, where a 3-value mean would turn grey images into 3 channels."""
  for key in NORMALISATION:
    if len(opts[key]) not in (1, channels):
      raise ConfigError(f'{where}.{key}={opts[key]} has {len(opts[key])} values for '
                        f'{channels}-channel inputs: give one, or one per channel')


def check_same_normalisation(config: Any) -> None:
  """A model evaluated on other inputs than it trains on scores as if broken."""
  train, evaluation = from_config(config, 'train'), from_config(config, 'eval')
  for key in NORMALISATION:
    if train[key] != evaluation[key]:
      raise ConfigError(f'pp.train.{key}={train[key]} but pp.eval.{key}={evaluation[key]}: the '
                        f'model would be evaluated on other inputs than it trains on; set both '
                        'alike')


def from_config(config: Any, part: str) -> dict:
  """`config.pp.<part>` ('train' or 'eval') over its defaults, checked, for the readers of one
  option outside the pipeline (the planner's label shape, few-shot's and inference's crop)."""
  pp = config.get('pp') or {}
  if not isinstance(pp, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f'pp={pp!r}: pp holds the train and eval options, e.g. '
                      'pp.eval.crop=\'resize\'')
  return {'train': train_options, 'eval': eval_options}[part](pp.get(part))
