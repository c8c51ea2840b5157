"""Data room: offline prepared datasets as the catalogue's, the deterministic train stream, exact
eval, global batches (preparing image folders and catalogue datasets: test_prepare.py)."""
import collections
import gzip
import hashlib
import itertools
import os
import re
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from data_setup import PLAIN, pp_dict, train_stream
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline as ip
from vit_jax.data import pp_options
from vit_jax import errors
from vit_jax.errors import ConfigError

FASHION = '/usr/share/datasets/fashion-mnist'


def _idx(name: str) -> np.ndarray:
  with gzip.open(os.path.join(FASHION, name)) as f:
    data = np.frombuffer(f.read(), np.uint8)
  return data[8:] if 'labels' in name else data[16:].reshape(-1, 28, 28)


def _eval(data_dir, dataset='digits', split='test', batch=64, size=8, pp=None, channels=3,
          **kw):
  return ip.make_eval_iterator(
      dataset=dataset, split=split, data_dir=data_dir, global_batch=batch,
      image_size=size, channels=channels, pp=pp_dict(pp), **kw)


def _rows(batches) -> collections.Counter:
  """Multiset of (image bytes hash, label) over the real rows of `batches`."""
  rows = collections.Counter()
  for b in batches:
    mask = b.get('mask', np.ones(len(b['label']), bool))
    for image, label in zip(b['image'][mask], b['label'][mask]):
      rows[hashlib.md5(image.tobytes()).hexdigest(), int(label)] += 1
  return rows


def _same(a, b) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_prepared_datasets_match_the_catalogue(prepared_data_dir):
  builder = tfds.builder('fashion_mnist', data_dir=prepared_data_dir)
  assert builder.info.splits['train'].num_examples == 60000
  assert builder.info.splits['test'].num_examples == 10000
  assert builder.info.features['image'].shape == (28, 28, 1)
  assert builder.info.features['label'].names[:2] == ['T-shirt/top', 'Trouser']
  info = ip.get_info('digits', 'train', prepared_data_dir)
  assert info == ip.DatasetInfo(10, 1500, [str(i) for i in range(10)], (8, 8, 1))
  assert ip.get_info('digits', 'test', prepared_data_dir).num_examples == 297
  assert ip.get_info('fashion_mnist', 'train[:10%]', prepared_data_dir).num_examples == 6000


def test_a_half_prepared_dataset_is_one_error_without_tfds_warnings(tmp_path, caplog):
  """A version folder left by a failed preparation (no dataset_info.json): TFDS's warning about
  it printed above the error that says what to do."""
  os.makedirs(tmp_path / 'mnist' / '3.0.1')
  with pytest.raises(ConfigError, match="dataset 'mnist' is not prepared in"):
    ip.get_info('mnist', 'test', str(tmp_path))
  assert not [r for r in caplog.records if 'dataset_info.json' in r.getMessage()]


def test_fashion_mnist_images_and_labels_are_the_idx_files(prepared_data_dir):
  raw = collections.defaultdict(set)
  for image, label in zip(_idx('t10k-images-idx3-ubyte.gz'), _idx('t10k-labels-idx1-ubyte.gz')):
    raw[image.tobytes()].add(int(label))
  ds = tfds.load('fashion_mnist', split='test', data_dir=prepared_data_dir, download=False)
  seen = 0
  for ex in tfds.as_numpy(ds.batch(1000)):
    for image, label in zip(ex['image'][..., 0], ex['label']):
      assert int(label) in raw[image.tobytes()]
      seen += 1
  assert seen == 10000
  labels = tfds.load('fashion_mnist', split='train', data_dir=prepared_data_dir,
                     decoders={'image': tfds.decode.SkipDecoding()})
  counts = np.bincount(np.concatenate(
      [b['label'] for b in tfds.as_numpy(labels.batch(10000))]), minlength=10)
  np.testing.assert_array_equal(counts, np.bincount(_idx('train-labels-idx1-ubyte.gz')))


@pytest.mark.parametrize('split_a,split_b,shared', [
    ('train[:90%]', 'train[90%:]', 0), ('train', 'test', 0), ('train', 'train[1400:]', 100),
    ('train[:10]+train[-10:]', 'train[5:15]+train[1495:]', 10)])
def test_shared_examples_of_two_splits(prepared_data_dir, split_a, split_b, shared):
  assert ip.shared_examples('digits', split_a, split_b, prepared_data_dir) == shared


def test_each_process_draws_its_own_augmentation():
  # The same local position on two processes is two different examples: the same crop and flip
  # for both would correlate the global batch's augmentations.
  photo = tf.io.encode_png(tf.constant(np.random.default_rng(0).integers(
      0, 255, (32, 32, 3), np.uint8)))
  opts = pp_options.train_options(pp_dict({'crop': 'inception', 'flip': True}))
  images = [ip._train_example_fn(opts, 16, 3, 3, seed=0, index=index, count=2)(  # pylint: disable=protected-access
      tf.constant(5, tf.int64), {'image': photo, 'label': 0})['image'].numpy()
            for index in (0, 1, 0)]
  assert not np.array_equal(images[0], images[1])
  np.testing.assert_array_equal(images[0], images[2])


def test_digits_are_sklearns_last_297_for_test(prepared_data_dir):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  expected = collections.Counter(
      (np.round(im * 255 / 16).astype(np.uint8).tobytes(), int(y))
      for im, y in zip(digits.images[1500:], digits.target[1500:]))
  ds = tfds.load('digits', split='test', data_dir=prepared_data_dir)
  got = collections.Counter((ex['image'][..., 0].tobytes(), int(ex['label']))
                            for ex in tfds.as_numpy(ds))
  assert got == expected


def test_train_batches_shape_range_and_labels(prepared_data_dir):
  batch = next(train_stream(prepared_data_dir, 'fashion_mnist', batch=32, size=28))
  assert batch['image'].shape == (32, 28, 28, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
  assert set(batch['label']) <= set(range(10)) and len(set(batch['label'])) > 3
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # Gray->RGB.


@pytest.mark.parametrize('pp', [
    {}, {'train': {'crop': 'random_crop'}},
    {'train': {'randaug': (2, 10), 'mixup': 0.2}}])
def test_stream_is_a_function_of_seed_and_step(prepared_data_dir, pp):
  first = [next(it) for it in [train_stream(prepared_data_dir, pp=pp)] for _ in range(3)]
  again = [next(it) for it in [train_stream(prepared_data_dir, pp=pp)] for _ in range(3)]
  other = next(train_stream(prepared_data_dir, pp=pp, seed=1))
  assert all(_same(a, b) for a, b in zip(first, again))
  assert not np.array_equal(first[0]['image'], other['image'])
  assert not np.array_equal(first[0]['image'], first[1]['image'])
  assert first[0]['image'].min() >= -1 and first[0]['image'].max() <= 1


@pytest.fixture(params=['in_memory', 'shuffle_buffer'])
def epoch_source(request, monkeypatch) -> dict:
  """Both ways an epoch is drawn: a permutation held in memory, or a tf.data shuffle buffer (the
  way of splits too large for memory) of 500 examples; returns the pp.train options for it."""
  if request.param == 'in_memory':
    return {}
  monkeypatch.setattr(ip, 'IN_MEMORY_BYTES', 0)
  return {'shuffle_buffer': 500}


@pytest.mark.parametrize('crop', [{'randaug': (1, 5)}, {'crop': 'resize'}])  # Example-/batch-wise.
@pytest.mark.parametrize('start_step', [5, 23, 48])  # 23 and 48 straddle epochs.
def test_resume_yields_the_uninterrupted_stream(prepared_data_dir, start_step, epoch_source,
                                                crop):
  pp = {'train': {**crop, **epoch_source}}
  full = train_stream(prepared_data_dir, batch=64, pp=pp)
  for _ in range(start_step):
    next(full)
  resumed = train_stream(prepared_data_dir, batch=64, start_step=start_step, pp=pp)
  for _ in range(3):
    assert _same(next(full), next(resumed))


@pytest.mark.parametrize('crop', [{'randaug': (1, 5)}, {'crop': 'resize'}])  # Example-/batch-wise.
def test_train_images_are_normalised_by_pp_trains_mean_and_std(prepared_data_dir, crop):
  """ImageNet's mean and std per channel (DeiT's fine-tunes) against the default [-1, 1] of the
  same examples: (x / 255 - mean) / std for x = (default + 1) * 127.5."""
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  default = next(train_stream(prepared_data_dir, pp={'train': crop}))
  imagenet = next(train_stream(prepared_data_dir, pp={'train': {**crop, 'mean': mean,
                                                                'std': std}}))
  np.testing.assert_array_equal(imagenet['label'], default['label'])
  pixels = (default['image'] + 1) * 127.5
  np.testing.assert_allclose(imagenet['image'], (pixels / 255 - np.array(mean)) / np.array(std),
                             rtol=0, atol=1e-4)


@pytest.mark.parametrize('crop', [{'randaug': (1, 5)}, {'crop': 'resize'}])  # Example-/batch-wise.
def test_a_second_process_resumes_its_own_slice_of_the_stream(prepared_data_dir, crop):
  # Process 1 of 2 reads 750 examples, 50 a step: resumed at step 7 its next batches cross its
  # epoch at step 15 as the uninterrupted stream's do (a global offset skipped twice as many).
  kw = dict(batch=100, pp={'train': crop}, process_index=1, process_count=2)
  full = train_stream(prepared_data_dir, **kw)
  for _ in range(13):
    next(full)
  resumed = train_stream(prepared_data_dir, start_step=13, **kw)
  for _ in range(3):
    assert _same(next(full), next(resumed))


def test_one_epoch_sees_every_example_once(prepared_data_dir, epoch_source):
  # 1500 examples, batch 60: 25 steps are exactly one epoch; the next epoch is another order.
  it = train_stream(prepared_data_dir, batch=60, pp={'train': {**PLAIN['train'], **epoch_source}})
  epochs = [[next(it) for _ in range(25)] for _ in range(2)]
  assert _rows(epochs[0]) == _rows(epochs[1]) == _rows(_eval(prepared_data_dir, split='train'))
  assert not np.array_equal(epochs[0][0]['label'], epochs[1][0]['label'])


@pytest.mark.parametrize('size', [8, 12])  # Digits are 8 px: as they are, and enlarged.
def test_batchwise_path_matches_the_examplewise_one_up_to_flips(prepared_data_dir, monkeypatch,
                                                                size):
  """Decoded in-memory splits with crop='resize' are preprocessed a batch at a time; the
  example-wise path (forced by a zero byte budget: the split stays in memory, same order)
  gives the same images, each either as is or mirrored, flipped about half the time."""
  pp = {'train': {'crop': 'resize'}}
  batchwise = [next(it) for it in [train_stream(prepared_data_dir, size=size, pp=pp)]
               for _ in range(8)]
  monkeypatch.setattr(ip, 'IN_MEMORY_BYTES', 0)
  examplewise = [next(it) for it in [train_stream(prepared_data_dir, size=size, pp=pp)]
                 for _ in range(8)]
  images, reference = (np.concatenate([b['image'] for b in run]) for run in
                       (batchwise, examplewise))
  assert all(np.array_equal(a['label'], b['label']) for a, b in zip(batchwise, examplewise))
  mirrored = reference[:, :, ::-1]
  same = np.all(images == reference, axis=(1, 2, 3))
  flipped = np.all(images == mirrored, axis=(1, 2, 3))
  assert np.all(same | flipped)
  asymmetric = ~np.all(reference == mirrored, axis=(1, 2, 3))
  assert 0.35 < flipped[asymmetric].mean() < 0.65, flipped[asymmetric].mean()
  unflipped = {'train': {'crop': 'resize', 'flip': False}}
  plain = next(train_stream(prepared_data_dir, size=size, pp=unflipped))
  monkeypatch.setattr(ip, 'IN_MEMORY_BYTES', 2**31)
  assert _same(plain, next(train_stream(prepared_data_dir, size=size, pp=unflipped)))


def test_no_pipeline_runs_tf_datas_autotuner(prepared_data_dir, monkeypatch):
  """Its thread could hold an iterator's delete for up to a minute (`ip.numpy_iterator`): every
  iterator handed out, batch- and example-wise, train and eval, runs without it."""
  autotuned = []
  as_numpy_iterator = tf.data.Dataset.as_numpy_iterator

  def recording(ds):
    autotuned.append(ds.options().autotune.enabled)
    return as_numpy_iterator(ds)

  monkeypatch.setattr(tf.data.Dataset, 'as_numpy_iterator', recording)
  # Loads, decodes, batches.
  next(train_stream(prepared_data_dir, pp={'train': {'crop': 'resize'}}))
  next(train_stream(prepared_data_dir))
  next(iter(_eval(prepared_data_dir)))
  assert autotuned == [False] * 6, autotuned  # Load, decode, batches; load, batches; eval.


def test_process_slices_are_disjoint_and_cover_the_split(prepared_data_dir):
  # 1500 / 2 processes = 750 each; local batch 50: 15 steps are one epoch.
  per_process = [
      _rows([next(it) for it in [train_stream(prepared_data_dir, batch=100, pp=PLAIN,
                                        process_index=p, process_count=2)]
             for _ in range(15)]) for p in range(2)]
  assert sum(per_process[0].values()) == sum(per_process[1].values()) == 750
  assert per_process[0] + per_process[1] == _rows(_eval(prepared_data_dir, split='train'))


@pytest.mark.parametrize('count', [1, 2, 3])
def test_eval_covers_the_split_once_on_any_process_count(prepared_data_dir, count):
  runs = [list(_eval(prepared_data_dir, batch=12 * count, process_index=p,
                     process_count=count)) for p in range(count)]
  assert len({len(r) for r in runs}) == 1  # Same number of batches everywhere.
  assert all(b['image'].shape == (12, 8, 8, 3) for r in runs for b in r)
  merged = sum((_rows(r) for r in runs), collections.Counter())
  assert sum(merged.values()) == 297
  full = tfds.load('digits', split='test', data_dir=prepared_data_dir)
  assert sorted(label for _, label in merged.elements()) == sorted(
      int(ex['label']) for ex in tfds.as_numpy(full))


@pytest.mark.parametrize('split', [
    'train[:3]+test[:3]',  # Each piece's remainder goes to process 0: it holds 4 of the 6.
    'test[:1]',  # Process 1's slice is empty.
])
def test_eval_of_uneven_process_slices_ends_together(prepared_data_dir, split):
  runs = [list(itertools.islice(_eval(prepared_data_dir, split=split, batch=2, process_index=p,
                                      process_count=2), 20)) for p in range(2)]
  assert len(runs[0]) == len(runs[1]) < 20
  assert _rows(runs[0]) + _rows(runs[1]) == _rows(_eval(prepared_data_dir, split=split, batch=2))


def test_an_evenly_divided_split_has_no_batch_of_padding_alone(prepared_data_dir):
  assert len(_eval(prepared_data_dir, batch=99)) == 3  # 297 = 3 x 99
  assert len(_eval(prepared_data_dir, batch=100)) == 3
  assert len(_eval(prepared_data_dir, split='test[:1]', batch=2, process_index=0,
                   process_count=2)) == 1


def test_eval_fashion_test_is_exact_and_reiterable(prepared_data_dir):
  batches = _eval(prepared_data_dir, 'fashion_mnist', batch=512, size=28,
                  pp={'eval': {'crop': 'resize_crop'}})
  first = list(batches)
  assert len(first) == len(batches) == 20
  assert sum(int(b['mask'].sum()) for b in first) == 10000
  labels = np.concatenate([b['label'][b['mask']] for b in first])
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(_idx('t10k-labels-idx1-ubyte.gz')))
  assert not first[-1]['mask'][-1] and first[-1]['image'][-1].max() == 0
  assert all(_same(a, b) for a, b in zip(first, batches))



def test_a_damaged_dataset_file_is_one_line_naming_the_fix(prepared_data_dir, tmp_path, capsys):
  """A TFRecord cut short (a copy interrupted, a full disk): TensorFlow's DataLossError
  traceback at the first evaluation that read it."""
  shutil.copytree(os.path.join(prepared_data_dir, 'digits'), tmp_path / 'digits')
  record = next((tmp_path / 'digits').glob('*/digits-test.tfrecord-*'))
  os.truncate(record, record.stat().st_size // 2)
  with pytest.raises(SystemExit) as exit_:
    errors.cli_main(lambda: list(_eval(str(tmp_path))))()
  assert exit_.value.code == 2
  assert re.match(r'error: a dataset file is damaged \(truncated record at \d+.*\): prepare the '
                  r'dataset again \(delete its folder', capsys.readouterr().err)


def test_to_global_and_prefetch_shard_the_batch():
  mesh = Mesh(np.array(jax.devices()).reshape(-1, 1), ('data', 'fsdp'))
  n = 2 * len(jax.devices())
  batches = [{'image': np.full((n, 4, 4, 3), i, np.float32), 'label': np.arange(n) + i}
             for i in range(3)]
  out = list(global_batch.prefetch_to_mesh(iter(batches), mesh, size=2))
  assert len(out) == 3
  for i, b in enumerate(out):
    assert b['image'].shape == (n, 4, 4, 3) and b['image'].sharding.spec[0] == ('data', 'fsdp')
    np.testing.assert_array_equal(np.asarray(b['label']), np.arange(n) + i)


@pytest.mark.parametrize('call,message', [
    (lambda d: ip.get_info('no_such_dataset', 'train', d), 'unknown dataset'),
    (lambda d: ip.get_info('digits', 'validation', d), "no split 'validation'"),
    (lambda d: train_stream(d, batch=63, process_count=2), 'multiple of the process count 2'),
    (lambda d: train_stream(d, pp={'train': {'flips': False}}), "unknown pp.train keys ['flips']"),
    (lambda d: _eval(d, pp={'eval': {'crop': 'inception'}}), 'pp.eval.crop'),
    (lambda d: ip.get_info('digits', 'train[5:3]', d), "split 'train[5:3]' of digits holds no"),
    # Was "has no split 'test[:300]'", TFDS's reason lost.
    (lambda d: ip.get_info('digits', 'test[:300]', d), "split 'test[:300]' of digits cannot be "
     'read (Requested slice [:300] incompatible with 297 examples.): slice within the examples '
     'its splits hold (test 297, train 1500)'),
    (lambda d: list(_eval(d, split='train[3:3]')), 'holds no examples'),
    (lambda d: ip.get_info('digits:9.9.9', 'train', d), "digits versions ['1.0.0']"),
    (lambda d: _eval(d, channels=2), 'channels=2: set the model channels to 1'),
    (lambda d: next(train_stream(d, channels=2)), 'channels=2: set the model channels to 1'),
    (lambda d: next(train_stream(d, pp={'train': 'resize'})), "pp.train='resize': pp.train holds"),
    (lambda d: next(train_stream(d, pp={'train': {'randaug': 2}})), 'pp.train.randaug=2'),
    (lambda d: next(train_stream(d, pp={'train': {'randaug': (2, 'x')}})), 'pp.train.randaug='),
    (lambda d: next(train_stream(d, pp={'train': {'randaug': (-1, 5)}})), 'pp.train.randaug='),
    (lambda d: next(train_stream(d, pp={'train': {'mixup': -1}})), 'pp.train.mixup=-1'),
    (lambda d: next(train_stream(d, pp={'train': {'inception_area_min': 2}})),
     'pp.train.inception_area_min=2'),
    (lambda d: next(train_stream(d, pp={'train': {'shuffle_buffer': 0}})),
     'pp.train.shuffle_buffer=0'),
    (lambda d: next(train_stream(d, pp={'train': {'random_crop_pad': -1}})),
     'pp.train.random_crop_pad=-1'),
    # Reflect-padding 8 px images by 8 failed at the first batch inside tf.data (MirrorPad).
    (lambda d: next(train_stream(d, pp={'train': {'crop': 'random_crop', 'random_crop_pad': 8}})),
     'pp.train.random_crop_pad=8 reflects at most image_size - 1 = 7 pixels'),
    # Strings and booleans were taken as numbers or truth values ('false' flipped).
    (lambda d: next(train_stream(d, pp={'train': {'flip': 'false'}})),
     "pp.train.flip='false': use True or False"),
    (lambda d: next(train_stream(d, pp={'train': {'mixup': True}})), 'pp.train.mixup=True'),
    (lambda d: next(train_stream(d, pp={'train': {'randaug': (True, 10)}})),
     'pp.train.randaug=(True, 10)'),
    (lambda d: pp_options.from_config({'pp': 'resize'}, 'eval'), "pp='resize': pp holds"),
    (lambda d: pp_options.from_config({'pp': {'eval': {'crop': 'x'}}}, 'eval'), 'pp.eval.crop'),
    # A fraction over 1 would crop outside the resized image (torchvision pads there).
    (lambda d: _eval(d, pp={'eval': {'crop': 'timm', 'crop_fraction': 1.2}}),
     'pp.eval.crop_fraction=1.2: use the fraction of the resized image kept, in (0, 1]'),
    (lambda d: _eval(d, pp={'eval': {'crop_fraction': '0.9'}}), "pp.eval.crop_fraction='0.9'"),
    (lambda d: _eval(d, pp={'eval': {'std': (0.2, 0.0, 0.2)}}),
     'pp.eval.std=(0.2, 0.0, 0.2): use one value for every channel or one per channel, fractions '
     'of 255 above 0'),
    (lambda d: _eval(d, pp={'eval': {'mean': 'imagenet'}}), "pp.eval.mean='imagenet'"),
    (lambda d: next(train_stream(d, pp={'train': {'std': -1}})), 'pp.train.std=-1: use one value'),
    (lambda d: next(train_stream(d, pp={'train': {'mean': (0.4, 0.5)}})),
     'pp.train.mean=(0.4, 0.5) has 2 values for 3-channel inputs'),
    # Broadcast, a mean per channel of RGB made the grey images 3-channel.
    (lambda d: _eval(d, pp={'eval': {'mean': (0.4, 0.5, 0.6)}}, channels=1),
     'pp.eval.mean=(0.4, 0.5, 0.6) has 3 values for 1-channel inputs'),
])
def test_mistakes_are_config_errors(prepared_data_dir, call, message):
  with pytest.raises(ConfigError) as e:
    call(prepared_data_dir)
  assert message in str(e.value)
