"""Per-example image ops for tf.data; every random op is stateless.

Randomness comes only from an explicit `seed` (int64 [2]) so the pipeline can
derive it from (run seed, example position) and stay a pure function of them.
Images stay in 0..255 (uint8 or float32) until `value_range` maps them to [-1, 1] (or as the
pp options' mean and std say).
"""
import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from vit_jax.data.pp_options import EVAL_CROPS
from vit_jax.errors import ConfigError


def decode(data: tf.Tensor, channels: int, jpeg_as_pil: bool = False) -> tf.Tensor:
  """Encoded PNG/JPEG/... bytes -> uint8 [H, W, channels]. `jpeg_as_pil` decodes JPEGs with the
  accurate integer DCT, as PIL does (bit for bit), where TF's default is the fast one."""
  if not jpeg_as_pil:
    return tf.io.decode_image(data, channels=channels, expand_animations=False)
  return tf.cond(tf.io.is_jpeg(data),
                 lambda: tf.io.decode_jpeg(data, channels, dct_method='INTEGER_ACCURATE'),
                 lambda: decode(data, channels))


def decodes_jpeg_as_pil(eval_pp: Mapping[str, Any]) -> bool:
  """timm's crop decodes JPEGs as timm reads them, with PIL: TF's fast DCT was up to 18 levels
  off PIL's pixels on a quality-95 photo (a mean of 1.3)."""
  return eval_pp['crop'] == 'timm'


def decode_and_inception_crop(data: tf.Tensor, seed: tf.Tensor, channels: int,
                              area_min: float) -> tf.Tensor:
  """Random crop of 'area_min'..100% of the area, aspect 3/4..4/3 (Inception).

  JPEGs decode only the crop window (the ImageNet hot path); other formats
  decode fully and then slice.
  """

  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
        area_range=(area_min, 1.0), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():
    begin, size = window(tf.io.extract_jpeg_shape(data))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.io.decode_and_crop_jpeg(data, crop, channels=channels)

  def other():
    image = decode(data, channels)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, channels])
  return image


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to [size, size], float32, not antialiased: the released code's eval and
  train resize, so its checkpoints see the pixels they were trained and scored on. An image
  already that size is passed through (resizing is the costliest op at 28 px)."""
  image = tf.cast(image, tf.float32)
  image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                  lambda: tf.image.resize(image, [size, size]))
  image.set_shape([size, size, image.shape[-1]])
  return image


def resize_small_and_central_crop(image: tf.Tensor, size: int,
                                  crop_fraction: float) -> tf.Tensor:
  """Shorter side to size/crop_fraction, then the central size x size (eval): big_vision's
  `resize_small(256)|central_crop(224)` at 224 px and 0.875, op for op (rounded sides, 'area'
  resize without antialiasing, back to the input dtype), so its ImageNet evals score the same
  pixels."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scaled = tf.cast(tf.round(shape * (size / crop_fraction / tf.reduce_min(shape))), tf.int32)
  resized = tf.image.resize(image, scaled, method='area')
  image = tf.cast(tf.clip_by_value(resized, image.dtype.min, image.dtype.max), image.dtype)
  return _central_crop(image, size, (scaled - size) // 2)


def resize_small_and_central_crop_as_timm(image: tf.Tensor, size: int,
                                          crop_fraction: float) -> tf.Tensor:
  """timm's eval transform (crop_mode 'center'), so timm's weights score the pixels timm feeds
  them: the shorter side to floor(size / crop_fraction) and the longer in proportion, truncated
  (torchvision's Resize); bicubic and antialiased as PIL resizes, width then height, each pass
  rounded to 0..255 (PIL's 8-bit passes); then the central size x size, its offsets rounded half
  to even (torchvision's CenterCrop). float32, whole numbers 0..255."""
  shape = tf.shape(image)[:2]
  scaled = shape * math.floor(size / crop_fraction) // tf.reduce_min(shape)

  def resized(pixels: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    pixels = tf.image.resize(pixels, tf.stack([height, width]), method='bicubic', antialias=True)
    return tf.round(tf.clip_by_value(pixels, 0.0, 255.0))

  image = tf.cast(image, tf.float32)  # A side already its size is not resampled, as in PIL.
  image = tf.cond(scaled[1] == shape[1], lambda: image,
                  lambda: resized(image, shape[0], scaled[1]))
  image = tf.cond(scaled[0] == shape[0], lambda: image,
                  lambda: resized(image, scaled[0], scaled[1]))
  offsets = tf.cast(tf.round((scaled - size) / 2), tf.int32)  # tf.round: half to even.
  return _central_crop(image, size, offsets)


def _central_crop(image: tf.Tensor, size: int, offsets: tf.Tensor) -> tf.Tensor:
  image = image[offsets[0]:offsets[0] + size, offsets[1]:offsets[1] + size]
  image.set_shape([size, size, image.shape[-1]])
  return image


def padded_random_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                       pad: int) -> tf.Tensor:
  """Resize to size, reflect-pad by `pad`, crop size x size back (CIFAR-style)."""
  image = tf.pad(resize(image, size), [[pad, pad], [pad, pad], [0, 0]],
                 mode='REFLECT')
  top_left = tf.random.stateless_uniform([2], seed, 0, 2 * pad + 1, tf.int32)
  return tf.slice(image, tf.concat([top_left, [0]], 0),
                  [size, size, image.shape[-1]])


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Grayscale <-> RGB so datasets of either kind feed any model."""
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return tf.image.grayscale_to_rgb(image)
  if have == 3 and channels == 1:
    return tf.image.rgb_to_grayscale(image)
  raise ConfigError(f'cannot turn {have}-channel images into {channels}: '
                    'set the model channels to 1 or 3')


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Left-right flip with probability 1/2 (cheaper than tf.image's version)."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def value_range(image: tf.Tensor, mean: Sequence[float] = (0.5,),
                std: Sequence[float] = (0.5,)) -> tf.Tensor:
  """0..255 -> float32 (pixels / 255 - mean) / std, per channel when given one per channel: [-1, 1]
  by default, as in the ViT paper (DeiT's weights expect ImageNet's mean and std)."""
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  pixels = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
  # Folded into one division and one subtraction: x / 127.5 - 1 for the defaults, bit for bit.
  return pixels / (255 * std).astype(np.float32) - (mean / std).astype(np.float32)


def eval_image(image: tf.Tensor, size: int, channels: int,
               eval_pp: Mapping[str, Any]) -> tf.Tensor:
  """Decoded pixels -> the model's eval input, float32 [size, size, channels], cropped and
  normalised as the pp.eval options `eval_pp` say: the eval split and `vit_jax.infer`'s image
  files share it, so both give the model the same input."""
  crop = eval_pp['crop']
  if crop == 'resize':
    image = resize(image, size)
  elif crop == 'resize_crop':
    image = resize_small_and_central_crop(image, size, eval_pp['crop_fraction'])
  elif crop == 'timm':
    image = resize_small_and_central_crop_as_timm(image, size, eval_pp['crop_fraction'])
  else:
    raise ConfigError(f'pp.eval.crop={crop!r}: use one of {EVAL_CROPS}')
  return value_range(to_channels(image, channels), eval_pp['mean'], eval_pp['std'])
