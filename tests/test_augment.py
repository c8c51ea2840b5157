"""Augmentation: mixup's labels and images, RandAugment's ops against hand-computed pixels, and
the eval central crop."""
import numpy as np
import pytest
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


def _op(name: str, image: np.ndarray, level: float) -> np.ndarray:
  return randaug.OPS[name](tf.constant(image, tf.float32), level).numpy()


RAMP = np.arange(256, dtype=np.float32).reshape(16, 16, 1)  # Every 8-bit value once.


@pytest.mark.parametrize('level,bits', [(1.0, 4), (-1.0, 4), (0.5, 6), (0.0, 8)])
def test_randaug_posterize_keeps_the_top_bits(level, bits):
  # 8 - round(4 |level|) bits survive. Catches a shift that ignores the level (or its sign),
  # rounds instead of truncating, or keeps the low bits.
  out = _op('posterize', RAMP, level)
  np.testing.assert_array_equal(out, np.arange(256).reshape(RAMP.shape) & -2**(8 - bits))
  assert np.all(out % 2**(8 - bits) == 0) and len(np.unique(out)) == 2**bits


@pytest.mark.parametrize('level,expected', [
    (1.0, [255, 128, 127, 55, 0]),  # Threshold 0: every pixel inverted.
    (-0.5, [0, 127, 127, 55, 0]),  # Threshold 128: 128 and up inverted.
    (0.25, [0, 127, 128, 55, 0]),  # Threshold 192.
    (0.0, [0, 127, 128, 200, 255]),  # Threshold 256: none.
])
def test_randaug_solarize_inverts_pixels_from_the_threshold_up(level, expected):
  # Catches inverting below the threshold, a threshold that ignores the level, or 256 - v.
  out = _op('solarize', RAMP, level).ravel()
  np.testing.assert_array_equal(out[[0, 127, 128, 200, 255]], expected)


@pytest.mark.parametrize('level,turns', [(3.0, 1), (-3.0, -1)])
def test_randaug_rotate_turns_about_the_centre(level, turns):
  # Level 3 is 90 degrees (the pipeline's levels stop at 1, 30 degrees), where the result is
  # exact: catches a rotation about a corner, a centre off by a pixel, or a wrong angle scale.
  square = np.arange(25, dtype=np.float32).reshape(5, 5, 1)
  np.testing.assert_allclose(_op('rotate', square, level), np.rot90(square, turns), atol=1e-3)
  out = _op('rotate', square, 1.0)
  assert out[2, 2, 0] == 12 and not np.allclose(out, square)  # 30 degrees: the centre stays.


@pytest.mark.parametrize('axis', [0, 1])
@pytest.mark.parametrize('level', [1.0, -1.0])
def test_randaug_translate_shifts_by_45_percent_and_fills_gray(axis, level):
  # 20 px along the axis, level +-1: content moves 9 px against (or with) it, 128 fills the
  # rest. Catches the wrong axis, the shift sized by the other side, or another fill value.
  image = np.arange(240, dtype=np.float32).reshape(12, 20, 1)  # Rows x 20 columns.
  along_y = lambda x: x.transpose(1, 0, 2) if axis else x  # Translate_y on the transpose.
  out = along_y(_op('translate_' + 'xy'[axis], along_y(image), level))
  if level > 0:
    expected = np.concatenate([image[:, 9:], np.full((12, 9, 1), 128, np.float32)], 1)
  else:
    expected = np.concatenate([np.full((12, 9, 1), 128, np.float32), image[:, :11]], 1)
  np.testing.assert_allclose(out, expected, atol=1e-3)


def test_randaug_autocontrast_stretches_each_channel_to_the_full_range():
  # Catches stretching with the global min/max instead of each channel's, or no stretch.
  image = np.stack([np.linspace(50, 100, 6), np.linspace(0, 51, 6), np.full(6, 7.)], -1)
  out = _op('autocontrast', image.reshape(2, 3, 3), 0.7).reshape(6, 3)
  np.testing.assert_allclose(out[:, 0], [0, 51, 102, 153, 204, 255], atol=1e-3)
  np.testing.assert_allclose(out[:, 1], [0, 51, 102, 153, 204, 255], atol=1e-3)
  np.testing.assert_array_equal(out[:, 2], 7)  # A flat channel is left as it is.


def test_randaug_ops_at_level_zero_change_nothing_but_autocontrast():
  # Magnitude 0 is no strength: catches e.g. a blend factor or rotation offset not neutral at 0.
  # Autocontrast takes no level (as in the reference RandAugment), so it still stretches.
  image = np.random.default_rng(0).integers(30, 200, (9, 7, 3)).astype(np.float32)
  for name in randaug.OPS:
    if name != 'autocontrast':
      np.testing.assert_allclose(_op(name, image, 0.0), image, atol=1e-3, err_msg=name)
  out = _op('autocontrast', image, 0.0)
  assert out.min() == 0 and out.max() == 255


def test_randaug_changes_the_batch_only_with_magnitude(prepared_data_dir):
  """Same seed and order as the plain batch: at (2, 10) nearly every image differs, at (2, 0)
  only images not spanning 0..255 may (autocontrast). Catches RandAugment never applied; the
  (2, 0) control shows that the (2, 10) differences are the ops', not another crop path's."""
  plain = next(train_stream(prepared_data_dir, pp=PLAIN))
  strong, none = (next(train_stream(prepared_data_dir, pp={'train': {**PLAIN['train'],
                                                               'randaug': (2, m)}}))
                  for m in (10, 0))
  assert np.array_equal(strong['label'], plain['label'])
  changed = ~np.all(strong['image'] == plain['image'], axis=(1, 2, 3))
  assert changed.mean() > 0.8, changed.mean()
  assert -1 <= strong['image'].min() and strong['image'].max() <= 1
  lo, hi = plain['image'].min(axis=(1, 2, 3)), plain['image'].max(axis=(1, 2, 3))
  full_range = (lo == -1) & (hi == 1)
  unchanged = np.all(none['image'] == plain['image'], axis=(1, 2, 3))
  assert full_range.mean() > 0.9 and np.all(unchanged[full_range])


@pytest.mark.parametrize('shape,window', [
    ((32, 24), np.s_[5:26, 1:22]),  # Tall: 11 rows spare, 3 columns.
    ((24, 32), np.s_[1:22, 5:26]),  # Wide.
])
def test_central_crop_keeps_the_centre(shape, window):
  # size 21 / crop_fraction 0.875 = 24 = the shorter side: no resampling, so the output is the
  # input's central 21 x 21 exactly (floor of the margin / 2 on top and left). Catches an
  # off-centre (corner) crop, swapped height and width, or scaling the longer side to 24.
  image = np.random.default_rng(0).integers(0, 256, shape + (3,)).astype(np.float32)
  out = preprocess.resize_small_and_central_crop(tf.constant(image), 21).numpy()
  assert out.shape == (21, 21, 3)
  np.testing.assert_allclose(out, image[window], atol=1e-3)


def test_resize_is_the_released_codes_plain_bilinear():
  """Shrinking without antialiasing, as the released pipeline (so its checkpoints score as
  published); an image already at the size passes through untouched."""
  image = np.zeros((16, 16, 1), np.float32)
  image[:, ::3] = 255  # Thin stripes, which antialiasing would blur.
  out = preprocess.resize(tf.constant(image), 6).numpy()
  np.testing.assert_array_equal(out, tf.image.resize(image, [6, 6]).numpy())
  assert np.abs(out - tf.image.resize(image, [6, 6], antialias=True).numpy()).max() > 10
  np.testing.assert_array_equal(preprocess.resize(tf.constant(image), 16).numpy(), image)


def test_central_crop_resizes_the_shorter_side_first():
  # 40 x 30, size 8: the shorter side goes to ceil(8 / 0.875) = 10, the longer to
  # ceil(40 * 9.14 / 30) = 13 (aspect kept), then rows 2:10 and columns 1:9. Catches a crop of
  # the unresized image, a resize straight to 8 x 8, or a stretched aspect.
  image = np.zeros((40, 30, 1), np.float32)
  image[:, 15:] = 200  # Right half bright: a vertical edge a centre crop keeps in the middle.
  image[:5] = 100  # A top band the crop leaves out.
  out = preprocess.resize_small_and_central_crop(tf.constant(image), 8).numpy()
  expected = tf.image.resize(image, [13, 10]).numpy()[2:10, 1:9]
  assert out.shape == (8, 8, 1)
  np.testing.assert_allclose(out, expected, atol=1e-3)
  np.testing.assert_allclose(out[:, :3], 0, atol=1e-3)  # Left of the edge, below the band.
  np.testing.assert_allclose(out[:, 5:], 200, atol=1e-3)
