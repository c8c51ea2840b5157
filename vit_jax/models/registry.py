"""Named ViT variants under the released names (`ViT-B_16`, `R50+ViT-B_16`, ...)."""
import dataclasses
import difflib
import re
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from vit_jax.errors import ConfigError
from vit_jax.models import resnet
from vit_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from vit_jax.models.vit import REMAT_POLICIES, VisionTransformer

# hidden_size, mlp_dim, num_heads, num_layers (the paper's Table 1, plus Ti and S from DeiT/AugReg,
# plus small widths sized for CPU work).
SIZES = {
    'Ti': (192, 768, 3, 12),
    'S': (384, 1536, 6, 12),
    'B': (768, 3072, 12, 12),
    'L': (1024, 4096, 16, 24),
    'H': (1280, 5120, 16, 32),
    # CPU-sized: a few minutes of training on a laptop.
    'Mu': (64, 256, 2, 4),
    'Pico': (128, 512, 4, 6),
}
# Options that change how the model is computed, not what: configs list them in
# `model_overrides` so that `--config.model_overrides.scan=True` can set them (config_flags only
# sets keys a config already has).
COMPUTE_OPTIONS = {'scan': False, 'remat': 'none', 'attention_impl': 'auto'}
RELEASED = ('ViT-Ti_16', 'ViT-S_16', 'ViT-S_32', 'ViT-B_8', 'ViT-B_16', 'ViT-B_32', 'ViT-L_16',
            'ViT-L_32', 'ViT-H_14', 'R50+ViT-B_16', 'R50+ViT-L_32', 'R26+ViT-S_32',
            'R26+ViT-B_32')
CPU_SIZED = ('ViT-Mu_4', 'ViT-Pico_4', 'ViT-Ti_4', 'ViT-Ti_7', 'R14+ViT-Mu_8', 'R8+ViT-Mu_8')
# Hybrid stems: per total stride, (units per stage, width factor), as the released configs build
# them. Hybrid names give the effective patch on the image, and the stem takes the largest stride
# that divides it: R50+ViT-B_16 is BiT-R50 with its fourth stage dropped and the third extended
# from 6 to 9 units (the paper's, /16, 1x1 patches), R50+ViT-L_32 the whole ResNet-50 (/32),
# R26+ViT-S_32 a (2, 2, 2, 2) ResNet-26 (AugReg's). R14 (a two-stage (2, 2) stem) and R8 (one unit
# per stage at half width), both /8, are for small images on CPU.
STEMS = {'R50': {16: ((3, 4, 9), 1.0), 32: ((3, 4, 6, 3), 1.0)},
         'R26': {32: ((2, 2, 2, 2), 1.0)},
         'R14': {8: ((2, 2), 1.0)},
         'R8': {8: ((1, 1), 0.5)}}
_TIMM_SIZES = {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L', 'huge': 'H'}
_NAME = re.compile(r'^(?:(?P<stem>R\d+)\+)?ViT-(?P<size>[A-Za-z]+)_(?P<patch>\d+)$')
_CHOICES = {'classifier': ('token', 'gap', 'map'), 'posemb': ('learn', 'sincos2d'),
            'remat': tuple(REMAT_POLICIES), 'attention_impl': ATTENTION_IMPLEMENTATIONS}
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def names() -> list[str]:
  """The released variants first, then the CPU-sized ones."""
  return list(RELEASED + CPU_SIZED)


def released_name(name: str) -> Optional[str]:
  """The released name of a big_vision variant ('S/16') or of a timm model of the same
  architecture (vit_small_patch16_224, deit_small_patch16_224.fb_in1k); not of timm's variants
  (vit_base_patch16_gap_224, *_rope_*), whose head counts or layers differ."""
  big_vision = re.match(r'^(?:ViT-)?([A-Za-z]+)/(\d+)$', name)
  timm = re.match(rf'^(?:vit|deit)_({"|".join(_TIMM_SIZES)})_patch(\d+)_\d+(?:\.\w+)?$', name)
  if big_vision:
    return f'ViT-{big_vision[1]}_{big_vision[2]}'
  return f'ViT-{_TIMM_SIZES[timm[1]]}_{timm[2]}' if timm else None


def _parse(name: str) -> dict[str, Any]:
  match = _NAME.match(name)
  if not match or match['size'] not in SIZES or (match['stem'] and match['stem'] not in STEMS):
    released = released_name(name)
    parsed = _NAME.match(released or '')
    close = ([released] if parsed and parsed['size'] in SIZES
             else difflib.get_close_matches(name, names(), n=1))
    hint = f'did you mean {close[0]!r}? ' if close else ''
    raise ConfigError(f'unknown model {name!r}: {hint}known: {", ".join(names())} '
                      f'(any ViT-<{"|".join(SIZES)}>_<patch> also works)')
  if not int(match['patch']):
    raise ConfigError(f'{name}: the patch size must be positive (e.g. ViT-Mu_4)')
  hidden, mlp, heads, layers = SIZES[match['size']]
  kwargs = dict(hidden_size=hidden, mlp_dim=mlp, num_heads=heads, num_layers=layers,
                patch_size=int(match['patch']))
  if match['stem']:
    # The name gives the effective patch on the image; the stem already downsampled part of it.
    strides = STEMS[match['stem']]
    fitting = [s for s in strides if kwargs['patch_size'] % s == 0]
    if not fitting:
      raise ConfigError(f'{name}: the {match["stem"]} stem downsamples by '
                        f'{" or ".join(map(str, strides))}, so the patch size must be a multiple '
                        'of that')
    stages, width_factor = strides[max(fitting)]
    kwargs.update(resnet=dict(num_layers=stages, width_factor=width_factor),
                  patch_size=kwargs['patch_size'] // resnet.total_stride(stages))
  return kwargs


def _model_kwargs(name: str, num_classes: int, **overrides) -> dict[str, Any]:
  """The resolved keyword arguments of `VisionTransformer` for a name plus overrides."""
  kwargs = _parse(name)
  kwargs.update(num_classes=num_classes, **overrides)
  fields = {f.name for f in dataclasses.fields(VisionTransformer)} - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f'unknown model option(s) {unknown} for {name}: known are {sorted(fields)}')
  for key, choices in _CHOICES.items():
    if key in kwargs and kwargs[key] not in choices:
      raise ConfigError(f'model option {key}={kwargs[key]!r} is not one of {choices}')
  if kwargs['hidden_size'] % kwargs['num_heads']:
    raise ConfigError(f'hidden_size {kwargs["hidden_size"]} is not divisible by num_heads '
                      f'{kwargs["num_heads"]}: change one so that it is')
  return kwargs


def given_overrides(overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """Model overrides less those left None: unset, as a fine-tune config leaves them for the
  checkpoint's, so the model's own default where none is given (such a config run by
  vit_jax.main, and the workdirs it writes)."""
  return {k: v for k, v in (overrides or {}).items() if v is not None}


def create(name: str, num_classes: int = 1000, **overrides: Any) -> VisionTransformer:
  """The flax module for a named variant; `overrides` replace any field (dtype may be a string)."""
  kwargs = _model_kwargs(name, num_classes, **overrides)
  patch = kwargs['patch_size']
  kwargs['patch_size'] = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
  stem = kwargs.get('resnet')
  if isinstance(stem, dict) or hasattr(stem, 'to_dict'):
    stem = dict(stem)
    kwargs['resnet'] = resnet.ResNetConfig(
        num_layers=tuple(stem.get('num_layers', (3, 4, 9))),
        width_factor=stem.get('width_factor', 1.0))
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = _dtype(kwargs['dtype'])
  return VisionTransformer(**kwargs)


def _dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ConfigError(f'unknown dtype {name!r}: use one of {list(_DTYPES)}')
  return _DTYPES[name]
