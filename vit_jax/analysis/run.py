"""Runs the paper's analyses (Figures 6 and 7) on a model and a batch of images, writing
`<name>.png` and `<name>.json` per analysis and returning the numbers."""
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from vit_jax.analysis import plots
from vit_jax.analysis.attention import attention_batches, attention_rollout, num_prefix_tokens
from vit_jax.analysis.attention import rollout_map
from vit_jax.analysis.distance import mean_attention_distance
from vit_jax.analysis.filters import embedding_filter_pcs
from vit_jax.analysis.posemb_similarity import posemb_cosine_similarity
from vit_jax.errors import ConfigError, check_not_a_file
from vit_jax.models.vit import patch_on_image, sincos2d_posemb, token_grid, VisionTransformer

ANALYSES = ('rollout', 'distance', 'posemb', 'filters')
NUM_FILTER_PCS = 28  # As many as the paper's Figure 7 shows.


def rollout_applies(model: VisionTransformer) -> bool:
  """Rollout follows attention to a class token or the pooled patches; a MAP head has neither."""
  return model.classifier in ('token', 'gap')


def filters_apply(model: VisionTransformer, channels: int) -> bool:
  """The embedding's filters are pictures only on grey or RGB pixels, not on a hybrid's stem."""
  return model.resnet is None and channels in (1, 3)


def check_names(which: Sequence[str]) -> None:
  """Unknown analysis names, before a checkpoint or images are read for them."""
  unknown = sorted(set(which) - set(ANALYSES))
  if unknown:
    raise ConfigError(f'unknown analyses {unknown}: choose from {list(ANALYSES)}')


def _check(model: VisionTransformer, images: np.ndarray, which: Sequence[str]) -> None:
  """Fails before any work for what cannot run, so no analysis is left half-written."""
  check_names(which)
  if images.ndim != 4:
    raise ConfigError(f'images must be [batch, height, width, channels], got {images.shape}')
  if 'rollout' in which and not rollout_applies(model):
    raise ConfigError(f'rollout needs a "token" or "gap" model, this one is {model.classifier!r}: '
                      'leave "rollout" out')
  if 'filters' in which and not filters_apply(model, images.shape[-1]):
    lacking = ('a hybrid model, whose first layer is its ResNet stem, does' if model.resnet
               else f'{images.shape[-1]}-channel images do')
    raise ConfigError(f'"filters" shows a grey or RGB pixel embedding, which {lacking} not have: '
                      'leave "filters" out')


def _posemb(model: VisionTransformer, params: Mapping[str, Any],
            grid: tuple[int, int]) -> tuple[np.ndarray, int]:
  """The position embedding the encoder adds and its number of prefix (class) tokens."""
  if model.posemb == 'sincos2d':  # Fixed, added before the class token is prepended.
    return np.asarray(sincos2d_posemb(*grid, model.hidden_size)), 0
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  return np.asarray(posemb), num_prefix_tokens(model.classifier)


def _attention_numbers(model: VisionTransformer, variables: Mapping[str, Any], images: np.ndarray,
                       which: Sequence[str], num_shown: int, num_averaged: int,
                       grid: tuple[int, int]) -> dict[str, np.ndarray]:
  """The rollout of the first `num_shown` images and the mean attention distance over the first
  `num_averaged`, from one pass of the model: each batch of attention is reduced as it comes, so
  memory holds one batch of it, not all the images' (gigabytes for ViT-L at 384 px)."""
  needed = max(num_shown if 'rollout' in which else 0, num_averaged if 'distance' in which else 0)
  patch, prefix = patch_on_image(model), num_prefix_tokens(model.classifier)
  rollouts, distance_sum, done = [], 0.0, 0
  for attn in attention_batches(model, variables, images[:needed]):
    if 'rollout' in which and done < num_shown:
      rollouts.append(attention_rollout(attn[:, :num_shown - done], classifier=model.classifier))
    if 'distance' in which and done < num_averaged:
      averaged = attn[:, :num_averaged - done]
      distance_sum += averaged.shape[1] * mean_attention_distance(averaged, grid, patch, prefix)
    done += attn.shape[1]
  numbers = {}
  if rollouts:
    numbers['rollout'] = np.concatenate(rollouts)
  if 'distance' in which:
    numbers['distance'] = distance_sum / num_averaged
  return numbers


def analyze(model: VisionTransformer, variables: Mapping[str, Any], images: np.ndarray, *,
            out_dir: str | os.PathLike, which: Sequence[str] = ANALYSES,
            num_shown: Optional[int] = None, num_averaged: Optional[int] = None,
            about: Optional[Mapping[str, Any]] = None) -> dict[str, dict[str, Any]]:
  """Runs the chosen analyses; writes `<name>.png` and `<name>.json` into `out_dir`.

  `images` are [B, H, W, C], preprocessed as the model expects (plots rescale them for display).
  The rollout shows the first `num_shown` and the distance averages over the first
  `num_averaged` (default and at most: all of them). Distances are in pixels: a token spans
  `patch_on_image(model)` (for hybrids the name's patch, e.g. 16 for R50+ViT-B_16). Returns
  {name: numbers}, the same numbers as the JSON files, as arrays:
    rollout: per-patch rollout maps [num_shown, gh, gw] (`attention_rollout`);
    distance: mean attention distance in pixels [layers, heads];
    posemb: cosine similarity of position embeddings [gh, gw, gh, gw];
    filters: the first 28 (at most) principal components of the embedding filters
      [k, ph, pw, C] and their explained variance ratios [k].
  `about` (what the numbers come from: checkpoint, params, images) is written into each JSON.
  """
  images = np.asarray(images)
  _check(model, images, which)
  counts = [len(images) if n is None else n for n in (num_shown, num_averaged)]
  if min(counts) <= 0:
    raise ConfigError(f'num_shown={num_shown} and num_averaged={num_averaged} must be positive')
  num_shown, num_averaged = (min(n, len(images)) for n in counts)
  check_not_a_file(out_dir, 'out_dir')
  grid, patch = token_grid(model, *images.shape[1:3]), patch_on_image(model)  # Or a ConfigError.
  params = nn.meta.unbox(variables)['params']
  os.makedirs(out_dir, exist_ok=True)
  path = lambda name, ext: os.path.join(out_dir, f'{name}.{ext}')
  attention_numbers = _attention_numbers(model, variables, images, which, num_shown,
                                         num_averaged, grid)
  results = {}
  if 'rollout' in which:
    rollout, shown = attention_numbers['rollout'], images[:num_shown]
    plots.plot_rollout(path('rollout', 'png'), shown, rollout_map(rollout, grid, shown.shape[1:3]))
    results['rollout'] = dict(rollout=rollout.reshape(-1, *grid), grid=grid,
                              classifier=model.classifier)
  if 'distance' in which:
    distances = attention_numbers['distance']
    plots.plot_attention_distance(path('distance', 'png'), distances)
    results['distance'] = dict(mean_attention_distance=distances, grid=grid, patch_size=patch,
                               num_images=num_averaged, renormalized=True)
  if 'posemb' in which:
    posemb, posemb_prefix = _posemb(model, params, grid)
    similarity = posemb_cosine_similarity(posemb, grid, posemb_prefix)
    plots.plot_posemb_similarity(path('posemb', 'png'), similarity)
    results['posemb'] = dict(cosine_similarity=similarity, grid=grid, posemb=model.posemb)
  if 'filters' in which:
    kernel = np.asarray(params['embedding']['kernel'])
    num = min(NUM_FILTER_PCS, kernel.shape[-1], int(np.prod(kernel.shape[:3])))
    components, ratio = embedding_filter_pcs(kernel, num)
    plots.plot_filter_pcs(path('filters', 'png'), components, ratio)
    results['filters'] = dict(components=components, explained_variance_ratio=ratio)
  for name, numbers in results.items():
    assert not numbers.keys() & (about or {}).keys(), 'about would hide numbers'
    plots.save_json(path(name, 'json'), numbers | dict(about or {}))
  return results
