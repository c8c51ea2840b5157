"""The paper's transfer to a downstream task: pre-trained body, fresh zero head, resized posemb.

Dosovitskiy et al. (Sec. 3.2): the pre-trained prediction head (and, by default, the pre-logits
layer) is removed and replaced by a zero-initialised linear layer of the new class count; the
learned position embeddings are 2D-interpolated when fine-tuning at another resolution.
"""
import logging
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import numpy as np

from vit_jax.checkpoints import npz
from vit_jax.checkpoints import posemb as posemb_lib
from vit_jax.errors import ConfigError

Params = dict[str, Any]

# The layers whose values come from the new model's init (the head's bias; the pre-logits
# unless kept); every other param comes from the checkpoint.
NEW_LAYERS = ('head', 'pre_logits')
_HEAD, _PRE_LOGITS = (f'{layer}/' for layer in NEW_LAYERS)  # Their flattened keys' prefixes.


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape)


def _resize_posemb(old: np.ndarray, new_shape: tuple[int, ...], num_prefix: int,
                   new_grid: Optional[tuple[int, int]],
                   old_grid: Optional[tuple[int, int]]) -> np.ndarray:
  num_patches = new_shape[1] - num_prefix
  if new_grid is None:
    new_grid = posemb_lib.square_grid(num_patches, 'the new model\'s position embedding')
  if new_grid[0] * new_grid[1] != num_patches:
    raise ConfigError(f'new_grid {new_grid} does not give the new model\'s {num_patches} patches: '
                      'pass the fine-tuning image size divided by the patch size')
  return posemb_lib.resize_posemb(old, new_grid, old_grid, num_prefix)


def transfer_params(pretrained: Params, init: Params, *,
                    new_grid: Optional[tuple[int, int]] = None,
                    old_grid: Optional[tuple[int, int]] = None,
                    keep_pre_logits: bool = False,
                    log: Callable[[str], Any] = logging.info,
                    what: str = 'the pre-trained checkpoint') -> Params:
  """Params for the new model: `pretrained` everywhere except the head, pre-logits and posemb.

  Args:
    pretrained: the pre-trained params (scanned or unrolled, e.g. from `npz.load_npz`).
    init: freshly initialised params of the new model (boxed or not); gives the target layout,
      shapes, the head's bias and, unless kept, the pre-logits layer. Outside `NEW_LAYERS` only
      shapes are read, so those leaves may be abstract (`jax.eval_shape`).
    new_grid: the new model's patch grid (h, w); None means square.
    old_grid: the pre-training patch grid; None means square.
    keep_pre_logits: keep the pre-trained pre-logits layer (the new model must have one).
    log: called with one line for every key that is not copied unchanged.
    what: names the checkpoint in errors (e.g. its path).

  Returns:
    The new model's params in `init`'s layout; copied values are the pre-trained arrays as-is.
  """
  init = flax.core.unfreeze(nn.meta.unbox(init))
  pretrained = npz.to_layout_of(flax.core.unfreeze(nn.meta.unbox(pretrained)), init, what)
  src = flax.traverse_util.flatten_dict(pretrained, sep='/')
  dst = flax.traverse_util.flatten_dict(init, sep='/')
  out = dict(src)

  for key in [k for k in src if k.startswith(_HEAD)]:
    del out[key]
    if key not in dst:
      log(f'transfer: dropped {key} {_shape(src[key])} (the new model has no head)')
  for key in [k for k in dst if k.startswith(_HEAD)]:
    was = f'pre-trained {_shape(src[key])}' if key in src else 'absent in pre-training'
    if key == _HEAD + 'kernel':
      out[key] = np.zeros(dst[key].shape, dst[key].dtype)
      log(f'transfer: {key} set to zeros {_shape(dst[key])} ({was})')
    else:
      out[key] = dst[key]
      log(f'transfer: {key} from init {_shape(dst[key])} ({was})')

  src_pre = [k for k in src if k.startswith(_PRE_LOGITS)]
  dst_pre = [k for k in dst if k.startswith(_PRE_LOGITS)]
  if keep_pre_logits and not src_pre:
    raise ConfigError('keep_pre_logits: the checkpoint has no pre-logits layer to keep: drop '
                      'keep_pre_logits')
  if keep_pre_logits and not dst_pre:
    raise ConfigError(
        'keep_pre_logits needs a pre-logits layer in the new model too: set its '
        f'representation_size to the checkpoint\'s ({src[_PRE_LOGITS + "kernel"].shape[-1]}), or '
        'do not keep the pre-logits')
  if not keep_pre_logits:
    for key in src_pre:
      del out[key]
      log(f'transfer: dropped {key} {_shape(src[key])}')
    for key in dst_pre:
      out[key] = dst[key]
      was = 'pre-trained one dropped' if key in src else 'absent in pre-training'
      log(f'transfer: {key} from init {_shape(dst[key])} ({was})')

  key = npz.POSEMB_KEY
  regridded = old_grid is not None and new_grid is not None and tuple(old_grid) != tuple(new_grid)
  if key in src and key in dst and (_shape(src[key]) != _shape(dst[key]) or regridded):
    old, new = _shape(src[key]), _shape(dst[key])
    num_prefix = int('cls' in dst)
    if num_prefix != int('cls' in src):
      raise ConfigError(
          f'the checkpoint {"has" if "cls" in src else "has no"} class token but the new model '
          f'{"has" if num_prefix else "has none"}: set the model\'s classifier to the '
          'checkpoint\'s (token vs gap/map)')
    if old[2] == new[2]:  # Otherwise the width differs: reported below as an architecture error.
      out[key] = _resize_posemb(np.asarray(src[key]), new, num_prefix, new_grid, old_grid)
      log(f'transfer: resized {key} {old} -> {new}')

  return npz.match_params(flax.traverse_util.unflatten_dict(out, sep='/'), init, what=what)
