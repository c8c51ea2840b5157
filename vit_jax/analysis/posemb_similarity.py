"""Position-embedding similarity (the paper's Figure 7 centre): whether the learned 1D embeddings
discover the 2D image topology (nearby patches, same row or column, look alike)."""
import numpy as np

from vit_jax.errors import ConfigError


def posemb_cosine_similarity(posemb: np.ndarray, grid: tuple[int, int],
                             num_prefix_tokens: int) -> np.ndarray:
  """Cosine similarity of each patch position's embedding to every other, [gh, gw, gh, gw].

  `posemb` is (1, prefix + gh*gw, D) or (prefix + gh*gw, D), patches in row-major order;
  the prefix (class token) embeddings have no grid position and are dropped. Entry [i, j, k, l]
  compares position (i, j) with (k, l): the diagonal is 1 and the array is symmetric.
  """
  gh, gw = grid
  posemb = np.asarray(posemb, np.float64)
  posemb = posemb.reshape(-1, posemb.shape[-1])[num_prefix_tokens:]
  if len(posemb) != gh * gw:
    raise ConfigError(f'{len(posemb)} patch position embeddings (after {num_prefix_tokens} prefix '
                      f'token(s)) do not fill a {gh}x{gw} grid: pass the grid the model was '
                      'trained with')
  unit = posemb / np.linalg.norm(posemb, axis=-1, keepdims=True)
  return (unit @ unit.T).reshape(gh, gw, gh, gw)
