"""Parameter trees shared by the checkpoint, fine-tuning and reader tests: fresh ones, and
comparisons."""
import flax
import jax
import jax.numpy as jnp
import numpy as np


def compiled_init(model: flax.linen.Module, shape: tuple[int, ...]) -> dict:
  """The model's fresh variables (seed 0) for inputs of `shape`, unboxed. Compiled: a hybrid's
  stem initialised op by op takes ~16 s on 2 cores."""
  return flax.linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros(shape)))


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


# big_vision's names of the released layout's block sub-layers (its vit.py numbers them from 0).
_BIG_VISION_NAMES = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
                     'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}


def big_vision_npz(params, path: str, scanned: bool = False) -> None:
  """Writes released-layout `params` as big_vision's ViT saves the same model: sub-layers renamed,
  blocks stacked under `encoderblock` if `scanned`, keys under `params/`, and the position
  embeddings at the top for the patches only, the class token's row folded into `cls` (big_vision
  adds them before prepending it; its own loader converts old files so)."""
  rest = flat(params)
  out, blocks = {}, {}
  posemb = rest.pop('Transformer/posembed_input/pos_embedding', None)
  if posemb is not None:
    num_prefix = int('cls' in rest)
    out['pos_embedding'] = posemb[:, num_prefix:]
    if num_prefix:
      rest['cls'] = rest['cls'] + posemb[:, :1]
  for key, value in rest.items():
    parts = key.split('/')
    if parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      name = '/'.join([_BIG_VISION_NAMES.get(parts[2], parts[2])] + parts[3:])
      blocks.setdefault(int(parts[1].split('_')[1]), {})[name] = value
    else:
      out[key] = value
  layers = [blocks[i] for i in sorted(blocks)]
  if scanned:
    out.update({f'Transformer/encoderblock/{k}': np.stack([b[k] for b in layers])
                for k in layers[0]})
  else:
    out.update({f'Transformer/encoderblock_{i}/{k}': v for i, b in enumerate(layers)
                for k, v in b.items()})
  np.savez(path, **{f'params/{k}': np.asarray(v) for k, v in out.items()})
