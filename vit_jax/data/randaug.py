"""RandAugment (Cubuk et al. 2019), stateless, on float32 images in 0..255.

Each of `num_layers` layers applies one op drawn uniformly from `OPS` at the
fixed `magnitude` (0..10), with a random sign for the symmetric ops. This is a
compact subset of the paper's 14 ops: `equalize` and `sharpness` are left out.
"""
import math

import tensorflow as tf

MAX_MAGNITUDE = 10.0
_FILL = 128.0  # Gray, as in the reference implementation.


def _blend(degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _gray(image):
  return tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def _transform(image, matrix):
  """Maps each output pixel (x, y, 1) through 3x3 `matrix` (8 entries) to the input."""
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(matrix)[None], tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=_FILL,
      interpolation='BILINEAR', fill_mode='CONSTANT')[0]


def _rotate(image, level):
  angle = level * math.radians(30)
  h, w = (tf.cast(d, tf.float32) - 1 for d in (tf.shape(image)[0], tf.shape(image)[1]))
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _transform(image, [cos, -sin, (w - (cos * w - sin * h)) / 2,
                            sin, cos, (h - (sin * w + cos * h)) / 2, 0., 0.])


def _translate(image, level, axis):
  shift = level * 0.45 * tf.cast(tf.shape(image)[1 - axis], tf.float32)
  dx, dy = (shift, 0.) if axis == 0 else (0., shift)
  return _transform(image, [1., 0., dx, 0., 1., dy, 0., 0.])


def _shear(image, level, axis):
  s = level * 0.3
  if axis == 0:
    return _transform(image, [1., s, 0., 0., 1., 0., 0., 0.])
  return _transform(image, [1., 0., 0., s, 1., 0., 0., 0.])


def _autocontrast(image, level):
  del level
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.where(hi > lo, scaled, image)


def _solarize(image, level):
  threshold = 256.0 - abs(level) * 256.0
  return tf.where(image < threshold, image, 255.0 - image)


def _posterize(image, level):
  shift = 2.0 ** tf.round(abs(level) * 4.0)
  return tf.floor(image / shift) * shift


OPS = {
    'identity': lambda image, level: image,
    'autocontrast': _autocontrast,
    'rotate': _rotate,
    'shear_x': lambda image, level: _shear(image, level, 0),
    'shear_y': lambda image, level: _shear(image, level, 1),
    'translate_x': lambda image, level: _translate(image, level, 0),
    'translate_y': lambda image, level: _translate(image, level, 1),
    'brightness': lambda image, l: _blend(tf.zeros_like(image), image, 1 + 0.9 * l),
    'color': lambda image, l: _blend(_gray(image), image, 1 + 0.9 * l),
    'contrast': lambda image, l: _blend(
        tf.reduce_mean(_gray(image)), image, 1 + 0.9 * l),
    'solarize': _solarize,
    'posterize': _posterize,
}


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: float) -> tf.Tensor:
  """Applies `num_layers` random ops of strength `magnitude` (0..10)."""
  ops = list(OPS.values())
  image = tf.cast(image, tf.float32)
  shape = image.shape
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 2))
    index = tf.random.stateless_uniform([], op_seed, 0, len(ops), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    level = sign * magnitude / MAX_MAGNITUDE
    image = tf.switch_case(
        index, [lambda op=op: op(image, level) for op in ops])
    image.set_shape(shape)  # The affine ops lose the static shape.
  return image
