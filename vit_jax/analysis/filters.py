"""Principal components of the patch-embedding filters (the paper's Figure 7 left): the linear
embedding's filters resemble plausible basis functions for each patch's fine structure."""
import numpy as np
from sklearn import decomposition

from vit_jax.errors import ConfigError


def embedding_filter_pcs(kernel: np.ndarray, num_components: int) -> tuple[np.ndarray, np.ndarray]:
  """The top principal components of the D filters of a [ph, pw, C, D] embedding kernel.

  Each filter is one sample of ph*pw*C features. Returns (components [k, ph, pw, C], each
  unit-norm, and the fraction of the filters' variance each explains, [k]). A component's sign
  is arbitrary; scikit-learn makes its largest-magnitude entry positive, which keeps plots
  stable across runs.
  """
  ph, pw, channels, num_filters = kernel.shape
  samples = np.asarray(kernel, np.float64).reshape(ph * pw * channels, num_filters).T
  rank = min(samples.shape)
  if not 1 <= num_components <= rank:
    raise ConfigError(f'num_components must be in [1, {rank}] for a {ph}x{pw}x{channels} kernel '
                      f'with {num_filters} filters, got {num_components}')
  pca = decomposition.PCA(num_components, svd_solver='full').fit(samples)
  return (pca.components_.reshape(num_components, ph, pw, channels),
          pca.explained_variance_ratio_)
