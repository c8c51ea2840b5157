"""One PNG per figure, plus the numbers behind it as JSON.

Figures are built on `matplotlib.figure.Figure` and saved as PNG, which renders with Agg without
touching pyplot's global backend or state (safe in notebooks, threads and headless jobs).
"""
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import einops
import matplotlib
from matplotlib.figure import Figure
import numpy as np

from vit_jax.errors import ConfigError

PathLike = str | os.PathLike


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, '__array__'):  # numpy and jax arrays and scalars
    return np.asarray(value).tolist()
  return value


def save_json(path: PathLike, data: Mapping[str, Any]) -> None:
  """Writes `data` as JSON, arrays as (nested) lists, so figures can be redrawn or compared."""
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(_jsonable(data), f)


def _unit_range(x: np.ndarray) -> np.ndarray:
  """Min-max scales to [0, 1] (a constant array becomes zeros)."""
  x = np.asarray(x, np.float64)
  span = x.max() - x.min()
  return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _show(ax, image: np.ndarray, **kwargs) -> None:
  """Shows an [h, w, 1 or 3] array in [0, 1] as grey or RGB, without axes."""
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1, **kwargs)
  else:
    ax.imshow(image, **kwargs)
  ax.set_axis_off()


def plot_rollout(path: PathLike, images: np.ndarray, maps: np.ndarray, *, ncols: int = 8) -> None:
  """Each input image above itself weighted by its rollout map (the paper's Figure 6).

  `images` [B, H, W, C] in any range (each is min-max scaled for display); `maps` [B, H, W] from
  `rollout_map`, each scaled by its maximum and multiplied into the image, as in the paper's
  notebook: what the model attends to stays bright, the rest goes dark.
  """
  images, maps = np.asarray(images), np.asarray(maps, np.float64)
  if images.shape[:3] != maps.shape:
    raise ConfigError(f'rollout maps {maps.shape} do not match images {images.shape[:3]}: '
                      'upsample them to the image size with rollout_map')
  ncols = min(len(images), ncols)
  nrows = math.ceil(len(images) / ncols)
  fig = Figure(figsize=(2 * ncols, 4.2 * nrows))
  axes = fig.subplots(2 * nrows, ncols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for i, (image, attn) in enumerate(zip(images, maps)):
    row, col = 2 * (i // ncols), i % ncols
    image = _unit_range(image)
    _show(axes[row, col], image)
    weight = np.clip(attn / max(attn.max(), np.finfo(np.float64).tiny), 0, 1)
    _show(axes[row + 1, col], image * weight[..., None])
  axes[0, 0].set_title('input', fontsize=9)
  axes[1, 0].set_title('attention rollout', fontsize=9)
  fig.savefig(path, dpi=100, bbox_inches='tight')


def plot_attention_distance(path: PathLike, distances: np.ndarray) -> None:
  """Mean attention distance of every head against depth (the paper's Figure 7 right)."""
  distances = np.asarray(distances)
  num_layers, num_heads = distances.shape
  fig = Figure(figsize=(5, 4))
  ax = fig.subplots()
  colors = matplotlib.colormaps['viridis'](np.linspace(0, 1, num_heads))
  for head in range(num_heads):
    ax.scatter(np.arange(1, num_layers + 1), distances[:, head], s=14, color=colors[head],
               label=f'Head {head + 1}')
  ax.set_xlabel('Network depth (layer)')
  ax.set_ylabel('Mean attention distance (pixels)')
  ax.set_xticks(np.arange(1, num_layers + 1))
  ax.set_ylim(bottom=0)
  if num_heads <= 16:
    ax.legend(fontsize=6, loc='lower right', ncols=2)
  fig.savefig(path, dpi=100, bbox_inches='tight')


def plot_posemb_similarity(path: PathLike, similarity: np.ndarray) -> None:
  """A grid of grids (the paper's Figure 7 centre): tile (i, j) shows the cosine similarity of
  patch (i, j)'s position embedding to every position's."""
  similarity = np.asarray(similarity)
  gh, gw = similarity.shape[:2]
  tiles = np.pad(similarity, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=np.nan)
  mosaic = einops.rearrange(tiles, 'i j k l -> (i k) (j l)')[:-1, :-1]  # NaN gaps between tiles.
  fig = Figure(figsize=(6, 6 * mosaic.shape[0] / mosaic.shape[1] + 0.5))
  ax = fig.subplots()
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
  im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation='nearest')
  ax.set_yticks(np.arange(gh) * (gh + 1) + (gh - 1) / 2, [str(i + 1) for i in range(gh)])
  ax.set_xticks(np.arange(gw) * (gw + 1) + (gw - 1) / 2, [str(j + 1) for j in range(gw)])
  ax.tick_params(length=0, labelsize=7)
  ax.set_ylabel('Input patch row')
  ax.set_xlabel('Input patch column')
  ax.set_frame_on(False)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='Cosine similarity')
  fig.savefig(path, dpi=100, bbox_inches='tight')


def plot_filter_pcs(path: PathLike, components: np.ndarray,
                    explained_variance_ratio: Optional[Sequence[float]] = None, *,
                    ncols: int = 7) -> None:
  """Principal components of the embedding filters as RGB or grey patches (the paper's Figure 7
  left), each min-max scaled to [0, 1] for display; titles give the explained variance."""
  components = np.asarray(components)
  if components.shape[-1] not in (1, 3):
    raise ConfigError(f'filter components have {components.shape[-1]} channels; only grey (1) or '
                      'RGB (3) filters can be shown: hybrid models embed ResNet features')
  ncols = min(len(components), ncols)
  nrows = math.ceil(len(components) / ncols)
  fig = Figure(figsize=(1.2 * ncols, 1.4 * nrows))
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for i, component in enumerate(components):
    ax = axes[i // ncols, i % ncols]
    _show(ax, _unit_range(component), interpolation='nearest')
    if explained_variance_ratio is not None:
      ax.set_title(f'{100 * explained_variance_ratio[i]:.1f}%', fontsize=7)
  fig.savefig(path, dpi=100, bbox_inches='tight')
