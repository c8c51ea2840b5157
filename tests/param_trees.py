"""Parameter-tree comparisons shared by the checkpoint and fine-tuning tests."""
import flax
import numpy as np


def flat(params) -> dict:
  """{'a/b/kernel': array} of a nested parameter dict."""
  return flax.traverse_util.flatten_dict(params, sep='/')


def assert_bit_identical(a, b) -> None:
  """Same keys, and every array the same dtype, shape and bytes."""
  flat_a, flat_b = flat(a), flat(b)
  assert set(flat_a) == set(flat_b)
  for key, x in flat_a.items():
    x, y = np.asarray(x), np.asarray(flat_b[key])
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key
