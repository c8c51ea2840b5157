"""Params as `.npz` files in the released layout ('/'-joined keys, unrolled blocks, float32).

This is the format of the released ViT checkpoints, so those load here and ours load in their code;
big_vision's ViT checkpoints load too.
Every failure a user can cause (wrong path, broken file, other architecture) is a one-line
ConfigError that names the fix.
"""
import contextlib
import io
import os
import re
import uuid
import zipfile
import zlib
from typing import Any

import flax
import flax.linen as nn
import numpy as np
import tensorflow as tf

from vit_jax.errors import ConfigError, summary
from vit_jax.models import scan_layout

Params = dict[str, Any]

# Older files nest the params under a prefix, next to optimizer state that we do not load.
_PREFIXES = ('opt/target/', 'params/')
# The released hybrids (R50+ViT-B_16, AugReg's R26/R50) were saved by flax.nn, whose GroupNorm
# kept its scale and bias as (1, 1, 1, C); linen's are (C,), which the released loader squeezes.
_LEGACY_GROUPNORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')
POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
# big_vision's ViT (vit.py) has the same layers as the released one, some under other names.
# Where its versions kept the position embeddings: now, and before 2022 (its loader reads both).
_BIG_VISION_POSEMBS = ('pos_embedding', 'Transformer/pos_embedding')
# None of its names below is one of ours, so a block that has one is big_vision's.
_BIG_VISION_NAMES = {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
                     'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}
_BIG_VISION_BLOCK = re.compile(
    rf'^(Transformer/encoderblock(?:_\d+)?/)({"|".join(_BIG_VISION_NAMES)})/')
# Where the user names a .npz's architecture: the readers' flag, or the fine-tune config's key.
MODEL_FLAGS = 'the model (--model; --config.model and model_overrides when fine-tuning)'
_SHOWN = 5  # Keys listed per kind of mismatch: enough to recognise the problem, still one line.


def _flat(params: Params) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(nn.meta.unbox(params), sep='/')


def save_npz(params: Params, path: str) -> None:
  """Writes `params` (scanned or not, boxed or not) as an unrolled float32 `.npz`, atomically.

  The file is written next to `path` and renamed over it, so a crash leaves the old file or none.
  """
  params = scan_layout.scanned_to_unrolled(flax.core.unfreeze(nn.meta.unbox(params)))
  flat = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
  if '://' in path:  # An object store (gs://) shows an object only once it is whole.
    buffer = io.BytesIO()  # zipfile needs tell(), which object-store writers may lack.
    np.savez(buffer, **flat)
    with tf.io.gfile.GFile(path, 'wb') as f:
      f.write(buffer.getvalue())
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Not tempfile.mkstemp: its 0600 mode would outlive the rename; this gets the umask's.
  tmp = f'{path}.{uuid.uuid4().hex}.tmp'
  try:
    with open(tmp, 'xb') as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_npz(path: str) -> Params:
  """Reads a `.npz` of params into a nested dict of numpy arrays, exactly as stored.

  Keys under `opt/target/` or `params/` (older files) are unprefixed; other entries, such as the
  optimizer state saved next to them, are ignored.
  """
  flat, is_zip = None, False
  try:
    with contextlib.ExitStack() as stack:
      # Object stores (gs://, where the released checkpoints live) through tf.io.gfile.
      source = stack.enter_context(tf.io.gfile.GFile(path, 'rb')) if '://' in path else path
      data = np.load(source, allow_pickle=False)
      if isinstance(data, np.lib.npyio.NpzFile):
        is_zip = True
        with data:
          flat = {k: data[k] for k in data.files}
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError,
          tf.errors.NotFoundError) as e:
    raise ConfigError(f'checkpoint {path} does not exist ({summary(e)}): check the '
                      'checkpoint path in the config/flags') from e
  except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError,
          tf.errors.OpError) as e:
    # numpy takes what is neither a zip (.npz) nor a .npy for a pickle, and suggests
    # allow_pickle=True: not a fix for a broken file, and unsafe.
    cause = summary(e)
    if 'allow_pickle' in str(e):
      cause = ('ValueError: an entry holds pickled Python objects, not an array' if is_zip else
               'ValueError: neither a zip archive (.npz) nor a .npy array')
    raise ConfigError(f'checkpoint {path} is not a readable .npz file ({cause}): it is '
                      'corrupt or truncated; re-download or re-save it') from e
  if flat is None:
    raise ConfigError(f'checkpoint {path} is a single .npy array, not an .npz of params: '
                      'point the checkpoint path at a params .npz file')
  for prefix in _PREFIXES:
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      break
  if not flat:
    raise ConfigError(f'checkpoint {path} contains no arrays: point the checkpoint path at a '
                      'params .npz file')
  not_arrays = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
  if not_arrays:  # numpy hands a member that is not a .npy file back as raw bytes.
    raise ConfigError(f'checkpoint {path} is not a readable .npz file ({not_arrays[0]} is not an '
                      'array): it is corrupt or truncated; re-download or re-save it')
  not_floats = [k for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating)]
  if not_floats:  # An integer array was a TypeError from jax.grad at the first fine-tune step.
    raise ConfigError(f'checkpoint {path} holds {not_floats[0]} as {flat[not_floats[0]].dtype}, '
                      'not floating point: params are floats; re-save it with float32 arrays')
  damaged = non_finite_keys(flat)
  if damaged:  # Else NaN predictions, or a fine-tune that "diverged" at its first step.
    raise ConfigError(f'checkpoint {path} holds NaN or infinite values in {len(damaged)} of its '
                      f'arrays (e.g. {damaged[0]}): it is damaged; re-download or re-save it')
  flat = {k: v.reshape(v.shape[-1:]) if _LEGACY_GROUPNORM.search(k) else v
          for k, v in flat.items()}
  if any(_BIG_VISION_BLOCK.search(k) for k in flat) or set(_BIG_VISION_POSEMBS) & set(flat):
    flat = _from_big_vision(flat)
  if not {'embedding', 'Transformer'} <= {k.split('/')[0] for k in flat}:
    raise ConfigError(f'checkpoint {path} holds no ViT params (no embedding/ and Transformer/ '
                      f'keys; it has {_listed(list(flat))}): point the checkpoint path at the '
                      '.npz of a ViT')
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def non_finite_keys(params: Params) -> list[str]:
  """The '/'-joined keys of the arrays (nested or flat) holding a NaN or an infinity: training
  saves none."""
  return [k for k, v in _flat(params).items() if not np.isfinite(v).all()]


def _from_big_vision(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision's ViT layout in ours: the same model, its sub-layers numbered from 0, and its
  position embeddings at the top, added before the class token is prepended. A zero row for the
  class token gives that here exactly (the class token plus zero)."""
  flat = {_BIG_VISION_BLOCK.sub(lambda m: m[1] + _BIG_VISION_NAMES[m[2]] + '/', k): v
          for k, v in flat.items()}
  posemb = next((flat.pop(k) for k in _BIG_VISION_POSEMBS if k in flat), None)
  if posemb is not None:
    flat[POSEMB_KEY] = with_class_token_row(posemb) if 'cls' in flat else posemb
  return flat


def with_class_token_row(posemb: np.ndarray) -> np.ndarray:
  """Position embeddings of the patches only (added before the class token is prepended, as
  big_vision's and timm's no_embed_class models do) get a zero row for the class token, which
  gives the same model here; those with that row already stay as they are."""
  tokens = posemb.shape[1]
  if int(np.sqrt(tokens)) ** 2 != tokens:
    return posemb
  return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)


def visible_architecture(params: Params) -> dict[str, Any]:
  """The model options a released-layout param tree shows, where they differ from the defaults.

  A .npz holds no config, but its keys tell the pre-logits layer and its width (ImageNet-21k's
  released checkpoints have one), the pooling (no `cls`: gap, or map with a `MAPHead_0`) and
  learned versus fixed (sincos2d) position embeddings, and a non-square patch (which no model
  name gives), so naming the model is enough.
  """
  options = {}
  patch = params.get('embedding', {}).get('kernel', np.zeros((0, 0))).shape[:2]
  if 'conv_root' not in params and patch[0] != patch[1]:  # A hybrid's embeds a feature map.
    options['patch_size'] = tuple(int(n) for n in patch)
  if 'pre_logits' in params:
    options['representation_size'] = int(params['pre_logits']['kernel'].shape[-1])
  if 'cls' not in params:
    options['classifier'] = 'map' if 'MAPHead_0' in params else 'gap'
  if 'posembed_input' not in params.get('Transformer', {}):
    options['posemb'] = 'sincos2d'
  return options


def _hint(shape_keys: list[str], what: str) -> str:
  if shape_keys and all(k.startswith(('head/', 'pre_logits/')) or k == POSEMB_KEY
                        for k in shape_keys):
    return (f'only the head / position embeddings differ: to fine-tune {what} at another class '
            'count or resolution, load it with vit_jax.checkpoints.transfer.transfer_params '
            '(the fine-tune path), which replaces the head and resizes the position embeddings')
  return f'{MODEL_FLAGS} must name the architecture {what} was trained with'


def _listed(keys: list[str]) -> str:
  more = f' (+{len(keys) - _SHOWN} more)' if len(keys) > _SHOWN else ''
  return f'{", ".join(sorted(keys)[:_SHOWN])}{more}'


def _mismatch_error(missing: list[str], unexpected: list[str],
                   shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                   what: str) -> ConfigError:
  """One line listing the first few missing, unexpected and mis-shaped keys, and the fix.

  `shapes` maps a key to (its shape in `what`, the shape the model wants).
  """
  parts = [f'{label}: [{_listed(keys)}]'
           for label, keys in (('missing', missing), ('unexpected', unexpected)) if keys]
  if shapes:
    parts.append('shape mismatch (checkpoint vs model): '
                 + _listed([f'{k} {got} vs {want}' for k, (got, want) in shapes.items()]))
  hint = _hint([] if missing or unexpected else list(shapes), what)
  return ConfigError(f'{what} does not fit the model: {"; ".join(parts)}; {hint}')


def to_layout_of(params: Params, reference: Params, what: str) -> Params:
  """`params` converted to the scanned or unrolled layout of `reference`."""
  scanned = scan_layout.is_scanned(reference)
  if 'Transformer' not in params or scan_layout.is_scanned(params) == scanned:
    return params
  try:
    return scan_layout.to_layout(params, scanned)
  except (KeyError, ValueError, TypeError) as e:
    raise ConfigError(f'{what}: its encoder blocks do not convert to the '
                      f'{"scanned" if scanned else "unrolled"} layout ({summary(e)}): '
                      f'{MODEL_FLAGS} must name the checkpoint\'s architecture') from e


def match_params(loaded: Params, expected_shapes: Params, *, what: str) -> Params:
  """Checks `loaded` against the model's (abstract or real) params; returns it in their layout.

  `expected_shapes` may be boxed (as from `jax.eval_shape(model.init, ...)`) and may be the full
  variables dict. Values are neither cast nor rounded (only restacked for the layout), so loading
  is bit-exact.
  """
  expected = nn.meta.unbox(expected_shapes)
  if set(expected) == {'params'}:
    expected = expected['params']
  loaded = to_layout_of(flax.core.unfreeze(loaded), expected, what)
  flat_loaded, flat_expected = _flat(loaded), _flat(expected)
  missing = [k for k in flat_expected if k not in flat_loaded]
  unexpected = [k for k in flat_loaded if k not in flat_expected]
  shapes = {k: (tuple(flat_loaded[k].shape), tuple(v.shape)) for k, v in flat_expected.items()
            if k in flat_loaded and tuple(flat_loaded[k].shape) != tuple(v.shape)}
  if missing or unexpected or shapes:
    raise _mismatch_error(missing, unexpected, shapes, what)
  return loaded
