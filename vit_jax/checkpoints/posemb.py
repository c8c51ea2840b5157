"""Resizing learned position embeddings to another patch grid (fine-tuning at a new resolution)."""
import math
from typing import Optional

import numpy as np
import scipy.ndimage

from vit_jax.errors import ConfigError


def square_grid(num_tokens: int, what: str) -> tuple[int, int]:
  """The (n, n) grid of `num_tokens` patches; a ConfigError when it is not a square."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ConfigError(f'{what} has {num_tokens} patch tokens, not a square grid: pass its grid '
                      '(height, width) in patches explicitly')
  return side, side


def resize_posemb(posemb: np.ndarray, new_grid: tuple[int, int],
                  old_grid: Optional[tuple[int, int]] = None,
                  num_prefix_tokens: int = 1) -> np.ndarray:
  """Bilinearly resizes the grid part of a (1, prefix + h*w, D) posemb to `new_grid`.

  Prefix (class) token rows are kept as they are. The interpolation is the released
  vision_transformer code's, `scipy.ndimage.zoom(order=1)` (corners aligned, no antialiasing):
  `jax.image.resize` centres pixels differently and would not reproduce its fine-tuning results.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[1] < num_prefix_tokens:
    raise ConfigError(f'position embeddings of shape {posemb.shape} are not (1, tokens, dim) with '
                      f'{num_prefix_tokens} prefix token(s): check the checkpoint and the '
                      'model\'s classifier')
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  if old_grid is None:
    old_grid = square_grid(len(grid), 'the old position embedding')
  (gh, gw), (nh, nw) = old_grid, new_grid
  if gh * gw != len(grid):
    raise ConfigError(f'old grid {gh}x{gw} does not match the {len(grid)} patch tokens of the '
                      'position embedding: pass the grid it was trained at')
  # scipy has no bfloat16/float16 kernels; float32 is also what the released files hold.
  grid = grid.reshape(gh, gw, -1).astype(np.float64 if grid.dtype == np.float64 else np.float32)
  resized = scipy.ndimage.zoom(grid, (nh / gh, nw / gw, 1), order=1)
  resized = resized.reshape(1, nh * nw, -1).astype(posemb.dtype)
  return np.concatenate([prefix, resized], axis=1)
