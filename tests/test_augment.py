"""Augmentation: mixup's labels and images, RandAugment's ops against hand-computed pixels, and
the eval central crops."""
import math

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import skimage.data
import tensorflow as tf

from data_setup import PLAIN, train_stream
from vit_jax.data import preprocess
from vit_jax.data import randaug


def test_mixup_makes_soft_labels(prepared_data_dir):
  batch = next(train_stream(prepared_data_dir, pp={'train': {'mixup': 0.5}}))
  assert batch['label'].shape == (64, 10) and batch['label'].dtype == np.float32
  np.testing.assert_allclose(batch['label'].sum(1), 1, rtol=1e-6)


def test_mixup_mixes_each_example_with_the_one_before_it(prepared_data_dir):
  """Against the same stream without mixup: row i is lam * example i + (1 - lam) * example i-1
  (the batch rolled by one), image and one-hot label alike, lam drawn anew each step. Catches
  lam stuck at 1 (or 0), images left unmixed, labels paired with another partner than the
  images (or the roll reversed: lam here is far from 1/2), and one lam for every step."""
  mixed = train_stream(prepared_data_dir, pp={'train': {**PLAIN['train'], 'mixup': 0.5}})
  plain = train_stream(prepared_data_dir, pp=PLAIN)
  onehot = np.eye(10, dtype=np.float32)
  lams = []
  for _ in range(3):
    m, p = next(mixed), next(plain)
    labels, partners = p['label'], np.roll(p['label'], 1)
    i = np.flatnonzero(labels != partners)[0]  # Own and partner's labels differ.
    lam = m['label'][i, labels[i]]
    assert 0.01 < lam < 0.99 and abs(lam - 0.5) > 0.1, lam
    np.testing.assert_allclose(m['label'][i, partners[i]], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(m['label'], lam * onehot[labels] + (1 - lam) * onehot[partners],
                               atol=1e-6)
    np.testing.assert_allclose(
        m['image'], lam * p['image'] + (1 - lam) * np.roll(p['image'], 1, axis=0), atol=1e-6)
    lams.append(float(lam))
  assert len(set(lams)) == 3, lams


def test_mixup_weight_is_one_per_global_batch_and_favours_the_example(prepared_data_dir):
  """Two processes' slices of the same steps mix at the same weight, >= 1/2 on the example
  itself (big_vision draws one weight per global batch and sorts it). Catches a weight seeded
  by the process, or a small alpha swapping examples for their neighbours."""
  weights = []
  for index in (0, 1):
    stream = train_stream(prepared_data_dir, pp={'train': {**PLAIN['train'], 'mixup': 1.0}},
                          process_index=index, process_count=2)
    # A row's largest soft label is the example's weight where its partner's class differs.
    weights.append([next(stream)['label'].max(axis=1).min() for _ in range(4)])
  assert weights[0] == weights[1], weights
  assert min(weights[0]) >= 0.5 and len(set(weights[0])) == 4, weights


def _op(name: str, image: np.ndarray, magnitude: float, sign: float = 1.0,
        seed=(0, 0)) -> np.ndarray:
  out = randaug.OPS[name](tf.constant(image, tf.uint8), magnitude / randaug.MAX_LEVEL,
                          tf.constant(sign), tf.constant(seed, tf.int64))
  assert out.dtype == tf.uint8
  return out.numpy()


RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)  # Every 8-bit value once.
PHOTO = np.asarray(PIL.Image.fromarray(skimage.data.chelsea()).resize((40, 32)))  # 32 x 40 RGB.


@pytest.mark.parametrize('magnitude,bits', [(10, 4), (5, 2), (2.4, 1), (20, 8), (30, 8)])
def test_randaug_posterize_is_pils_with_the_references_bits(magnitude, bits):
  # int(4 m / 10) bits, as the reference maps the level: catches rounding instead of truncating,
  # or PIL's posterize disagreeing (it keeps the top bits).
  np.testing.assert_array_equal(_op('posterize', PHOTO, magnitude),
                                np.asarray(PIL.ImageOps.posterize(PIL.Image.fromarray(PHOTO),
                                                                  bits)))


def test_randaug_posterize_at_magnitude_0_keeps_the_top_bit():
  # 0 bits is a shift by 8, which TensorFlow clamps to 7 in the reference: 0 or 128, not black.
  np.testing.assert_array_equal(_op('posterize', RAMP, 0), RAMP & 128)


@pytest.mark.parametrize('magnitude,threshold', [(0, 0), (5, 128), (7.5, 192), (10, 256)])
def test_randaug_solarize_is_pils_at_threshold_magnitude_times_25_6(magnitude, threshold):
  # The threshold rises with the magnitude (weaker), as in the reference.
  expected = np.where(RAMP < threshold, RAMP, 255 - RAMP)
  np.testing.assert_array_equal(_op('solarize', RAMP, magnitude), expected)
  if threshold <= 255:
    np.testing.assert_array_equal(
        expected[..., 0], np.asarray(PIL.ImageOps.solarize(PIL.Image.fromarray(RAMP[..., 0]),
                                                           threshold)))


def test_randaug_solarize_add_brightens_the_dark_half_by_11_per_magnitude():
  ramp = RAMP.astype(np.int32)
  expected = np.where(ramp < 128, np.minimum(ramp + 110, 255), ramp)
  np.testing.assert_array_equal(_op('solarize_add', RAMP, 10), expected)
  np.testing.assert_array_equal(_op('solarize_add', RAMP, 20),
                                np.where(ramp < 128, np.minimum(ramp + 220, 255), ramp))


def test_randaug_equalize_and_autocontrast_are_pils():
  image = PIL.Image.fromarray((PHOTO // 2 + 40).astype(np.uint8))  # A narrower range.
  np.testing.assert_array_equal(_op('equalize', np.asarray(image), 7),
                                np.asarray(PIL.ImageOps.equalize(image)))
  # PIL computes autocontrast's scale in float64, the reference in float32: a level apart where
  # a product lands just under an integer.
  stretched = _op('autocontrast', np.asarray(image), 7).astype(int)
  assert np.abs(stretched - np.asarray(PIL.ImageOps.autocontrast(image))).max() == 1
  assert stretched.min() == 0 and stretched.max() == 255
  flat = np.full((4, 4, 3), 9, np.uint8)
  for name in ('equalize', 'autocontrast'):  # Nothing to spread: unchanged.
    np.testing.assert_array_equal(_op(name, flat, 10), flat)


@pytest.mark.parametrize('magnitude', [0, 5, 10, 20])
@pytest.mark.parametrize('name,enhance', [('color', 'Color'), ('brightness', 'Brightness'),
                                          ('sharpness', 'Sharpness')])
def test_randaug_enhance_ops_are_pils_at_factor_magnitude_times_0_18_plus_0_1(
    name, enhance, magnitude):
  # The reference's factor, 0.1 at magnitude 0 (not the identity), 1 (the identity) at 5. PIL
  # rounds where the reference truncates, the result and the blurred or gray image it blends
  # from: one level each, the latter's scaled by |1 - factor|.
  factor = magnitude / 10 * 1.8 + 0.1
  expected = np.asarray(getattr(PIL.ImageEnhance, enhance)(
      PIL.Image.fromarray(PHOTO)).enhance(factor)).astype(int)
  out = _op(name, PHOTO, magnitude).astype(int)
  assert np.abs(out - expected).max() <= 1 + abs(1 - factor), np.abs(out - expected).max()
  assert (np.abs(out - PHOTO.astype(int)).mean() > 1) == (magnitude != 5)


def test_randaug_contrast_blends_towards_the_references_pixel_count_gray():
  # The reference's gray is (pixel count / 256) clipped to 255, not the image mean: 5 here.
  factor = 0.55
  expected = np.clip(5 + factor * (PHOTO.astype(np.float32) - 5), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(_op('contrast', PHOTO, 2.5), expected)


def test_randaug_invert_and_cutout():
  np.testing.assert_array_equal(_op('invert', RAMP, 3), 255 - RAMP)
  image = np.zeros((224, 224, 3), np.uint8)
  gray = np.all(_op('cutout', image, 10, seed=(3, 4)) == 128, axis=-1)
  rows, cols = np.flatnonzero(gray.any(1)), np.flatnonzero(gray.any(0))
  # A square of side 80 at 224 px (40 each side of the centre), cut where it leaves the image.
  assert len(rows) <= 80 and len(cols) <= 80 and gray.sum() == len(rows) * len(cols)
  assert len(rows) == 80 or rows[0] == 0 or rows[-1] == 223
  small = np.all(_op('cutout', np.zeros((28, 28, 1), np.uint8), 10, seed=(3, 4)) == 128, -1)
  assert 0 < small.sum() <= 10 * 10  # Scaled with the image: side 2 * int(40 * 28 / 224).


@pytest.mark.parametrize('sign,turns', [(1.0, 1), (-1.0, -1)])
def test_randaug_rotate_turns_about_the_centre_30_degrees_per_10(sign, turns):
  # Magnitude 30 is 90 degrees, where nearest sampling is exact: catches a rotation about a
  # corner, a centre off by a pixel, or another angle scale.
  square = np.arange(25, dtype=np.uint8).reshape(5, 5, 1)
  np.testing.assert_array_equal(_op('rotate', square, 30, sign), np.rot90(square, turns))
  out = _op('rotate', square, 10)
  assert out[2, 2, 0] == 12 and not np.array_equal(out, square)


@pytest.mark.parametrize('axis', [0, 1])
@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_randaug_translate_moves_100_pixels_at_224_scaled_and_fills_gray(axis, sign):
  # 112 px along the axis at magnitude 2: 20 px at 224, so 10 here. Catches the wrong axis, a
  # shift sized by the other side or not scaled, or another fill value.
  image = np.arange(112 * 12, dtype=np.int32).reshape(12, 112, 1).astype(np.uint8)
  along_y = lambda x: x.transpose(1, 0, 2) if axis else x  # Translate_y on the transpose.
  out = along_y(_op('translate_' + 'xy'[axis], along_y(image), 2, sign))
  gray = np.full((12, 10, 1), 128, np.uint8)
  expected = (np.concatenate([image[:, 10:], gray], 1) if sign > 0
              else np.concatenate([gray, image[:, :-10]], 1))
  np.testing.assert_array_equal(out, expected)


def test_randaug_shear_moves_row_y_by_0_03_y_per_magnitude():
  # At magnitude 100/3 the shear is 1: row y moves y pixels (nearest, exact), gray comes in.
  image = np.tile(np.arange(1, 21, dtype=np.uint8), (6, 1))[..., None]
  out = _op('shear_x', image, 100 / 3)
  for y in range(6):
    np.testing.assert_array_equal(out[y, :20 - y, 0], image[y, y:, 0])
    assert np.all(out[y, 20 - y:] == 128)
  np.testing.assert_array_equal(
      _op('shear_y', image.transpose(1, 0, 2), 100 / 3).transpose(1, 0, 2), out)


def test_randaug_changes_the_batch_with_layers_even_at_magnitude_0(prepared_data_dir):
  """Same seed and order as the plain batch: with two layers nearly every image differs at
  magnitude 10 and most at 0 (AugReg's "not nothing"), with no layer none does. Catches
  RandAugment never applied; the no-layer control shows that the differences are the ops', not
  another crop path's or the uint8 hand-over's."""
  plain = next(train_stream(prepared_data_dir, pp=PLAIN))
  for layers, magnitude in ((2, 10), (2, 0), (0, 10)):
    out = next(train_stream(prepared_data_dir, pp={'train': {**PLAIN['train'],
                                                             'randaug': (layers, magnitude)}}))
    assert np.array_equal(out['label'], plain['label'])
    assert -1 <= out['image'].min() and out['image'].max() <= 1
    changed = ~np.all(out['image'] == plain['image'], axis=(1, 2, 3))
    # Some ops leave an 8 px digit as it is (solarize at 10, the affine ones at 0, ...).
    assert changed.mean() > (0.8 if magnitude else 0.5) if layers else not changed.any(), (
        layers, magnitude, changed.mean())


@pytest.mark.parametrize('shape,window', [
    ((32, 24), np.s_[5:26, 1:22]),  # Tall: 11 rows spare, 3 columns.
    ((24, 32), np.s_[1:22, 5:26]),  # Wide.
])
def test_central_crop_keeps_the_centre(shape, window):
  # size 21 / crop_fraction 0.875 = 24 = the shorter side: no resampling, so the output is the
  # input's central 21 x 21 exactly (floor of the margin / 2 on top and left), still uint8 as
  # big_vision's resize_small returns it. Catches an off-centre (corner) crop, swapped height and
  # width, scaling the longer side to 24, or float pixels (big_vision truncates to uint8).
  image = np.random.default_rng(0).integers(0, 256, shape + (3,)).astype(np.uint8)
  out = preprocess.resize_small_and_central_crop(tf.constant(image), 21, 0.875).numpy()
  assert out.shape == (21, 21, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, image[window])


def test_resize_is_the_released_codes_plain_bilinear():
  """Shrinking without antialiasing, as the released pipeline (so its checkpoints score as
  published); an image already at the size passes through untouched."""
  image = np.zeros((16, 16, 1), np.float32)
  image[:, ::3] = 255  # Thin stripes, which antialiasing would blur.
  out = preprocess.resize(tf.constant(image), 6).numpy()
  np.testing.assert_array_equal(out, tf.image.resize(image, [6, 6]).numpy())
  assert np.abs(out - tf.image.resize(image, [6, 6], antialias=True).numpy()).max() > 10
  np.testing.assert_array_equal(preprocess.resize(tf.constant(image), 16).numpy(), image)


def test_central_crop_averages_areas_as_big_vision_resize_small():
  # 96 x 72, size 21: the shorter side goes to 21 / 0.875 = 24, a third, so 'area' makes each
  # output pixel the mean of a 3 x 3 block (bilinear would take the block's centre pixel), then
  # rows 5:26 and columns 1:22 of the 32 x 24. Catches bilinear, a crop of the unresized image or
  # a stretched aspect.
  image = np.random.default_rng(0).uniform(0, 255, (96, 72, 1)).astype(np.float32)
  out = preprocess.resize_small_and_central_crop(tf.constant(image), 21, 0.875).numpy()
  block_means = image.reshape(32, 3, 24, 3, 1).mean(axis=(1, 3))
  assert out.shape == (21, 21, 1)
  np.testing.assert_allclose(out, block_means[5:26, 1:22], atol=1e-3)


def test_central_crop_rounds_the_longer_side_as_big_vision_resize_small():
  # ImageNet's 375 x 500 at 224: resize_small(256) gives 256 x round(341.33) = 341 (ceil: 342),
  # then central_crop(224) starts at row 16 and column (341 - 224) // 2 = 58. On a ramp (pixel =
  # its row, or column) an output pixel is the mean coordinate of the input box it covers:
  # (i + offset + 1/2) * input / scaled - 1/2; TF's area resize comes within 0.09 of it, and 342
  # columns would be 1.2 off at the left edge.
  rows, cols = np.meshgrid(np.arange(375), np.arange(500), indexing='ij')
  ramp = np.stack([rows, cols], axis=-1).astype(np.float32)
  out = preprocess.resize_small_and_central_crop(tf.constant(ramp), 224, 0.875).numpy()
  i = np.arange(224)
  np.testing.assert_allclose(out[..., 0], np.broadcast_to(
      ((i + 16 + 0.5) * 375 / 256 - 0.5)[:, None], (224, 224)), atol=0.1)
  np.testing.assert_allclose(out[..., 1], np.broadcast_to(
      (i + 58 + 0.5) * 500 / 341 - 0.5, (224, 224)), atol=0.1)


def _timm_eval_with_pil(pixels: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
  """timm's 'center' eval crop, as torchvision performs it on a PIL image: the shorter side to
  floor(size / crop_fraction), the longer int() of its proportion, PIL's bicubic (skipped when
  the size is unchanged), then the crop at round((side - size) / 2), Python's half to even."""
  image = PIL.Image.fromarray(pixels)
  width, height = image.size
  shorter = math.floor(size / crop_fraction)
  if width <= height:
    scaled = (shorter, int(shorter * height / width))
  else:
    scaled = (int(shorter * width / height), shorter)
  if scaled != image.size:
    image = image.resize(scaled, PIL.Image.BICUBIC)
  left, top = (round((side - size) / 2) for side in scaled)
  return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


@pytest.mark.parametrize('crop_fraction', [0.9, 0.945, 1.0])
def test_timm_crop_is_pils_bicubic_and_torchvisions_central_crop(crop_fraction):
  """The pixels timm evaluates its weights on, on real photos: square, wide, tall and grey. At
  224 px, 0.9 (augreg's crop_pct) resizes shorter sides to 248, 0.945 to 237 (13 px to spare:
  an offset of 6.5, rounded to 6), 1.0 to 224 (the square ones then pass unresampled). PIL
  resamples width, then height, rounding to 8 bits in between, which TF's resize does not: one
  pass in float32 was up to 15 levels off PIL where PIL clips an overshoot. Catches bilinear,
  no antialiasing, 0.875 for every fraction, a rounded longer side, an offset one pixel off."""
  photos = {'astronaut': skimage.data.astronaut(), 'coffee': skimage.data.coffee(),
            'tall rocket': skimage.data.rocket().transpose(1, 0, 2),
            'grey camera': skimage.data.camera()[..., None]}
  for name, pixels in photos.items():
    out = preprocess.resize_small_and_central_crop_as_timm(
        tf.constant(pixels), 224, crop_fraction).numpy()
    expected = _timm_eval_with_pil(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels,
                                   224, crop_fraction).reshape(224, 224, -1)
    assert out.shape == expected.shape and out.dtype == np.float32, name
    np.testing.assert_array_equal(out, np.round(out))  # 8-bit values, as PIL's.
    differences = np.abs(out - expected)
    assert differences.max() <= 2 and differences.mean() < 0.05, (name, differences.max(),
                                                                   differences.mean())


def test_value_range_normalises_each_channel_by_its_mean_and_std():
  """DeiT's ImageNet mean and std per channel, as timm's Normalize; the defaults are the released
  x / 127.5 - 1, bit for bit."""
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.float32)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  np.testing.assert_allclose(preprocess.value_range(tf.constant(pixels), mean, std).numpy(),
                             (pixels / 255 - np.array(mean)) / np.array(std), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(preprocess.value_range(tf.constant(pixels)).numpy(),
                                pixels / np.float32(127.5) - np.float32(1))


def test_value_range_maps_0_and_255_to_minus_one_and_one():
  np.testing.assert_array_equal(preprocess.value_range(tf.constant([0, 127.5, 255])), [-1, 0, 1])


def test_padded_random_crop_shifts_by_every_offset_up_to_the_pad():
  # Coordinate-coded 8x8 image; pad 2 reflects 2 pixels each side: the crop's top-left lands
  # anywhere in {0..4}^2 of the padded 12x12, each shift as likely.
  image = tf.constant(np.arange(64, dtype=np.uint8).reshape(8, 8, 1) + 100)
  padded = np.pad(image.numpy()[..., 0], 2, mode='reflect')
  offsets = set()
  for seed in range(300):
    crop = preprocess.padded_random_crop(image, tf.constant([seed, 0], tf.int64), 8, 2).numpy()
    found = [(top, left) for top in range(5) for left in range(5)
             if np.array_equal(padded[top:top + 8, left:left + 8], crop[..., 0])]
    assert len(found) == 1
    offsets |= set(found)
  assert offsets == {(top, left) for top in range(5) for left in range(5)}
