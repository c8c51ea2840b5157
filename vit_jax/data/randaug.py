"""RandAugment (Cubuk et al. 2019) as AugReg ("How to train your ViT?", Steiner et al. 2021)
trains with it: big_vision's 16 ops with its levels and constants, stateless.

Each of `num_layers` layers applies one op drawn uniformly from `OPS` at `magnitude`; AugReg's
light / medium / strong settings are (2, 10), (2, 15) and (2, 20), and magnitude 0 is no
identity there either (contrast-like ops blend at 0.1, posterize keeps one bit, solarize
inverts everything). The reference's quirks stay, so that its recipes carry over: the ops
compute on uint8 (float results are clipped and truncated), posterize at 0 bits keeps the top
bit (TensorFlow clamps the shift to 7), contrast blends towards a gray of (pixel count / 256)
rather than the mean, solarize weakens as the magnitude grows, and the affine ops sample the
nearest pixel and fill with gray 128. Its pixel constants (translate 100, cutout 40) were set
for 224 px images; here they scale with the image, so small images keep the proportions.
"""
import math

import tensorflow as tf

MAX_LEVEL = 10.0  # The magnitude at which the constants below apply in full.
_GRAY = 128
_REFERENCE_SIZE = 224.0
_TRANSLATE_PIXELS = 100.0
_CUTOUT_HALF_SIZE = 40.0


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: float) -> tf.Tensor:
  """From `degenerate` (factor 0) to `image` (1), extrapolating beyond 1."""
  degenerate = tf.cast(degenerate, tf.float32)
  return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def _enhance_factor(level: float) -> float:
  return level * 1.8 + 0.1


def _gray(image: tf.Tensor) -> tf.Tensor:
  return tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def _per_channel(channel_fn, image: tf.Tensor) -> tf.Tensor:
  return tf.stack([channel_fn(image[..., c]) for c in range(image.shape[-1])], -1)


def _scaled_pixels(image: tf.Tensor, axis: int, pixels_at_224: float) -> tf.Tensor:
  return pixels_at_224 * tf.cast(tf.shape(image)[axis], tf.float32) / _REFERENCE_SIZE


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
  """Output pixel (x, y) <- input pixel `matrix` @ (x, y, 1), nearest, gray outside."""
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(matrix)[None], tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=float(_GRAY),
      interpolation='NEAREST', fill_mode='CONSTANT')[0]


def _autocontrast(image, level, sign, seed):
  del level, sign, seed

  def channel(values):
    lo = tf.cast(tf.reduce_min(values), tf.float32)
    hi = tf.cast(tf.reduce_max(values), tf.float32)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = _to_uint8(tf.cast(values, tf.float32) * scale - lo * scale)
    return tf.where(hi > lo, stretched, values)

  return _per_channel(channel, image)


def _equalize(image, level, sign, seed):
  """PIL's ImageOps.equalize, per channel."""
  del level, sign, seed

  def channel(values):
    values = tf.cast(values, tf.int32)
    histogram = tf.math.bincount(values, minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(histogram, exclusive=True) + step // 2) // tf.maximum(step, 1)
    equalized = tf.gather(tf.clip_by_value(lut, 0, 255), values)
    return tf.cast(tf.where(step > 0, equalized, values), tf.uint8)

  return _per_channel(channel, image)


def _invert(image, level, sign, seed):
  del level, sign, seed
  return 255 - image


def _rotate(image, level, sign, seed):
  del seed
  angle = sign * level * math.radians(30)
  h, w = (tf.cast(d, tf.float32) - 1 for d in (tf.shape(image)[0], tf.shape(image)[1]))
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _transform(image, [cos, -sin, (w - (cos * w - sin * h)) / 2,
                            sin, cos, (h - (sin * w + cos * h)) / 2, 0., 0.])


def _posterize(image, level, sign, seed):
  del sign, seed
  shift = min(max(8 - int(level * 4), 0), 7)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _solarize(image, level, sign, seed):
  del sign, seed
  return tf.where(tf.cast(image, tf.int32) < int(level * 256), image, 255 - image)


def _solarize_add(image, level, sign, seed):
  del sign, seed
  brighter = _to_uint8(tf.cast(image, tf.float32) + int(level * 110))
  return tf.where(image < _GRAY, brighter, image)


def _color(image, level, sign, seed):
  del sign, seed
  return _blend(_gray(image), image, _enhance_factor(level))


def _contrast(image, level, sign, seed):
  del sign, seed
  pixels = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
  return _blend(_to_uint8(pixels / 256.0), image, _enhance_factor(level))


def _brightness(image, level, sign, seed):
  del sign, seed
  return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def _sharpness(image, level, sign, seed):
  """Blends with PIL's SMOOTH filter's output (the border pixels kept as they are)."""
  del sign, seed
  smooth = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(smooth[:, :, None, None], [1, 1, image.shape[-1], 1])
  inner = _to_uint8(tf.nn.depthwise_conv2d(
      tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID')[0])
  border = [[1, 1], [1, 1], [0, 0]]
  is_inner = tf.pad(tf.ones_like(inner, tf.bool), border, constant_values=False)
  return _blend(tf.where(is_inner, tf.pad(inner, border), image), image,
                _enhance_factor(level))


def _shear(image, level, sign, axis):
  shear = sign * level * 0.3
  if axis == 0:
    return _transform(image, [1., shear, 0., 0., 1., 0., 0., 0.])
  return _transform(image, [1., 0., 0., shear, 1., 0., 0., 0.])


def _translate(image, level, sign, axis):
  shift = sign * level * _scaled_pixels(image, 1 - axis, _TRANSLATE_PIXELS)
  dx, dy = (shift, 0.) if axis == 0 else (0., shift)
  return _transform(image, [1., 0., dx, 0., 1., dy, 0., 0.])


def _cutout(image, level, sign, seed):
  """A gray square of side 2 * half-size at a uniform random centre, clipped to the image."""
  del sign
  half = tf.cast(level * _scaled_pixels(image, 0, _CUTOUT_HALF_SIZE), tf.int32)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  centre = tf.cast(tf.random.stateless_uniform([2], seed) * tf.cast(
      tf.stack([height, width]), tf.float32), tf.int32)
  rows, cols = tf.range(height), tf.range(width)
  in_rows = (rows >= centre[0] - half) & (rows < centre[0] + half)
  in_cols = (cols >= centre[1] - half) & (cols < centre[1] + half)
  inside = in_rows[:, None, None] & in_cols[None, :, None]
  return tf.where(inside, tf.constant(_GRAY, tf.uint8), image)


# Each op: (uint8 image, level = magnitude / MAX_LEVEL, sign +-1 for the symmetric ops, seed).
OPS = {
    'autocontrast': _autocontrast,
    'equalize': _equalize,
    'invert': _invert,
    'rotate': _rotate,
    'posterize': _posterize,
    'solarize': _solarize,
    'color': _color,
    'contrast': _contrast,
    'brightness': _brightness,
    'sharpness': _sharpness,
    'shear_x': lambda image, level, sign, seed: _shear(image, level, sign, 0),
    'shear_y': lambda image, level, sign, seed: _shear(image, level, sign, 1),
    'translate_x': lambda image, level, sign, seed: _translate(image, level, sign, 0),
    'translate_y': lambda image, level, sign, seed: _translate(image, level, sign, 1),
    'cutout': _cutout,
    'solarize_add': _solarize_add,
}


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: float) -> tf.Tensor:
  """`num_layers` random ops at `magnitude` on an image in 0..255; float32 0..255 out."""
  ops = list(OPS.values())
  level = magnitude / MAX_LEVEL
  shape = image.shape
  image = _to_uint8(image)  # As the reference's crop hands it over: truncated to uint8.
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, sign_seed, own_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 3))
    index = tf.random.stateless_uniform([], op_seed, 0, len(ops), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    image = tf.switch_case(
        index, [lambda op=op: op(image, level, sign, own_seed) for op in ops])
    image.set_shape(shape)  # The affine ops lose the static shape.
  return tf.cast(image, tf.float32)
