"""Mean attention distance (the paper's Figure 7 right, Figure 11): how far in the image each head
looks, the ViT analogue of a CNN's receptive field size.

Choice, made explicit: only patch tokens take part (prefix/class tokens have no position), and each
query's weights over the patch keys are renormalised to sum to one before weighting distances. So
the number is "the expected pixel distance to what the head attends to *in the image*", and a head
that parks most of its attention on the class token is not mistaken for a local one. The paper says
only "the distance between the query pixel and all other pixels, weighted by the attention weight";
`renormalize=False` gives the other reading (raw weights, the class-token share contributing 0),
which is what some re-implementations report and is never larger.
"""
import numpy as np

from vit_jax.errors import ConfigError


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> np.ndarray:
  """Euclidean pixel distance between all pairs of patch centres, [gh*gw, gh*gw], row-major."""
  gh, gw = grid
  ph, pw = patch_size
  rows, cols = np.meshgrid(np.arange(gh) * ph, np.arange(gw) * pw, indexing='ij')
  centres = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.float64)
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(attn: np.ndarray, grid: tuple[int, int], patch_size: tuple[int, int],
                            num_prefix_tokens: int, *, renormalize: bool = True) -> np.ndarray:
  """Attention-weighted query-to-key pixel distance per layer and head, [L, H].

  `attn` is [L, B, H, T, T] with T = num_prefix_tokens + gh * gw; `patch_size` is the patch's
  extent on the image in pixels (for hybrids, the stem's stride times the model's patch). The
  distance is averaged over patch queries and images (see the module docstring for the weights).
  """
  attn = np.asarray(attn)
  attn = attn.astype(np.promote_types(attn.dtype, np.float32), copy=False)  # float32 stays.
  num_patches = grid[0] * grid[1]
  if attn.shape[-1] != num_prefix_tokens + num_patches:
    raise ConfigError(f'attention over {attn.shape[-1]} tokens does not match '
                      f'{num_prefix_tokens} prefix token(s) + a {grid[0]}x{grid[1]} grid: '
                      'check the grid and classifier')
  weights = attn[..., num_prefix_tokens:, num_prefix_tokens:]  # A view: no copy of the weights.
  distances = patch_distances(grid, patch_size).astype(weights.dtype)
  per_query = np.einsum('lbhqk,qk->lbhq', weights, distances)
  if renormalize:  # Dividing the weighted sum by the weights' sum is weighting by w / sum(w).
    # A query with all its weight on prefix tokens (float32 underflow) gets distance 0, not NaN.
    total = weights.sum(axis=-1)
    per_query = per_query / np.maximum(total, np.finfo(total.dtype).tiny)
  return per_query.mean(axis=(1, 3), dtype=np.float64)
