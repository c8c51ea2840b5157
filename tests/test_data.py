"""Data room: offline prepare, the deterministic train stream, exact eval, global batches."""
import collections
import gzip
import hashlib
import itertools
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from jax.sharding import Mesh
from PIL import Image

from data_setup import PLAIN, pp_dict, train_stream
from vit_jax import datasets
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline as ip
from vit_jax.data import pp_options
from vit_jax.data import prepare
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


def _image_folder(root, splits: dict[str, int]) -> str:
  """ROOT/<split>/{cat,dog}/ with `splits[split]` small PNG and JPEG images per label."""
  rng = np.random.default_rng(0)
  for split, n in splits.items():
    for label in ('cat', 'dog'):
      os.makedirs(root / split / label)
      for i in range(n):
        image = rng.integers(0, 255, (20 + i, 30, 3), np.uint8)
        encode = tf.io.encode_jpeg if i % 2 else tf.io.encode_png
        tf.io.write_file(str(root / split / label / f'{i}.{"jpg" if i % 2 else "png"}'),
                         encode(image))
  return str(root)


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


def test_image_folder_becomes_a_tfds_dataset(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare('pets', data_dir, source=_image_folder(tmp_path / 'src', {'train': 3, 'val': 2}))
  assert ip.get_info('pets', 'val', data_dir) == ip.DatasetInfo(2, 4, ['cat', 'dog'],
                                                                (None, None, 3))
  assert len(tfds.load('pets', split='train', data_dir=data_dir)) == 6
  batch = next(ip.make_train_iterator(  # Inception crop of JPEG and PNG bytes.
      dataset='pets', split='train', data_dir=data_dir, global_batch=4,
      image_size=16, channels=3, pp=pp_dict(), seed=0))
  assert batch['image'].shape == (4, 16, 16, 3)


def _decoded_rows(images) -> collections.Counter:
  """Multiset of the md5s of uint8 images."""
  return collections.Counter(hashlib.md5(np.asarray(image).tobytes()).hexdigest()
                             for image in images)


def test_image_folder_takes_every_format_tf_decodes_and_nested_folders(tmp_path, caplog):
  """GIF, BMP and WebP files and a label's subfolders are taken (TFDS's ImageFolder dropped them),
  as the pixels training decodes, which TFDS's own decoder reads too; other files are named."""
  source = _image_folder(tmp_path / 'src', {'train': 2})
  rng = np.random.default_rng(1)
  extra = {'cat/c.gif': 'GIF', 'cat/c.bmp': 'BMP', 'dog/d.webp': 'WEBP',
           'dog/puppies/p.jpg': 'JPEG'}
  for path, image_format in extra.items():
    os.makedirs(os.path.dirname(f'{source}/train/{path}'), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (9, 13, 3), np.uint8)).save(
        f'{source}/train/{path}', image_format)
  (tmp_path / 'src' / 'train' / 'dog' / 'README.txt').write_text('not an image')
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare('pets', data_dir, source=source)
  assert ip.get_info('pets', 'train', data_dir).num_examples == 4 + len(extra)
  files = [os.path.join(folder, name) for folder, _, names in os.walk(f'{source}/train')
           for name in names if not name.endswith('.txt')]
  originals = [tf.io.decode_image(tf.io.read_file(f), 3, expand_animations=False) for f in files]
  stored = tfds.as_numpy(tfds.load('pets', split='train', data_dir=data_dir))  # TFDS's decoder.
  assert _decoded_rows(ex['image'] for ex in stored) == _decoded_rows(originals)
  assert f"left out 1 files of {source} that are not .jpg/.jpeg/.png/.gif/.bmp/.webp images, " \
         f"e.g. {source}/train/dog/README.txt" in caplog.text


@pytest.mark.parametrize('mistake,message', [
    (lambda train: shutil.rmtree(train / 'dog'),
     "has the one label 'cat': a classifier needs two or more"),
    (lambda train: (train / 'bird').mkdir(),
     'train/bird holds no images: add some, or delete the folder'),
    (lambda train: shutil.copy(train / 'cat' / '0.png', train / 'loose.png'),
     'train/loose.png is not in a label folder: move it to .*/<split>/<label>/'),
])
def test_image_folder_refuses_what_it_would_lose_or_cannot_train_on(tmp_path, mistake, message):
  source = _image_folder(tmp_path / 'src', {'train': 2})
  mistake(tmp_path / 'src' / 'train')
  with pytest.raises(ConfigError, match=message):
    prepare.prepare('pets', str(tmp_path / 'tfds'), source=source)
  assert not (tmp_path / 'tfds').exists()


def test_a_name_prepared_from_one_folder_refuses_another(tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  first = _image_folder(tmp_path / 'first', {'train': 1})
  prepare.prepare('pets', data_dir, source=first)
  (tmp_path / 'first' / 'train' / 'cat' / 'added.png').write_bytes(
      (tmp_path / 'first' / 'train' / 'cat' / '0.png').read_bytes())
  monkeypatch.chdir(tmp_path)
  prepare.prepare('pets', data_dir, source='first')  # The same folder: kept as prepared.
  assert ip.get_info('pets', 'train', data_dir).num_examples == 2
  second = _image_folder(tmp_path / 'second', {'train': 2})
  with pytest.raises(ConfigError, match=rf'pets in {data_dir} was prepared from {first}, not '
                     rf'{second}: pick another name, or delete {data_dir}/pets to replace it'):
    prepare.prepare('pets', data_dir, source=second)
  assert ip.get_info('pets', 'train', data_dir).num_examples == 2


def test_a_misspelt_name_gets_the_close_one(prepared_data_dir, tmp_path):
  with pytest.raises(ConfigError, match="'fashion_mnst'.*: did you mean 'fashion_mnist'?"):
    ip.get_info('fashion_mnst', 'train', prepared_data_dir)
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare('holiday_photos', data_dir, source=_image_folder(tmp_path / 'src', {'train': 1}))
  with pytest.raises(ConfigError, match="did you mean 'holiday_photos'?"):
    ip.get_info('holiday_photo', 'train', data_dir)
  with pytest.raises(ConfigError, match=r'\(not in the TFDS catalogue .*\): for an image folder'):
    ip.get_info('my_birds', 'train', data_dir)  # Nothing close: how to prepare an image folder.


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
])
def test_mistakes_are_config_errors(prepared_data_dir, call, message):
  with pytest.raises(ConfigError) as e:
    call(prepared_data_dir)
  assert message in str(e.value)


def test_unprepared_data_dir_says_where_and_how(tmp_path):
  with pytest.raises(ConfigError) as e:
    ip.get_info('cifar10', 'train', str(tmp_path))
  assert str(tmp_path) in str(e.value)
  assert f'python -m vit_jax.datasets prepare cifar10 --data_dir={tmp_path}' in str(e.value)
  with pytest.raises(ConfigError) as e:
    ip.get_info('fashion_mnist', 'train', str(tmp_path))
  assert 'python -m vit_jax.datasets prepare fashion_mnist' in str(e.value)


def test_missing_debian_package_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'none'))
  with pytest.raises(ConfigError, match='apt-get install dataset-fashion-mnist'):
    prepare.prepare('fashion_mnist', str(tmp_path))


def test_prepared_fashion_mnist_needs_no_source_files(prepared_data_dir, monkeypatch):
  monkeypatch.setattr(prepare, 'DEBIAN_FASHION_MNIST', '/nonexistent')
  assert prepare.prepare('fashion_mnist', prepared_data_dir) == prepared_data_dir


def test_a_file_that_is_not_an_image_is_named_before_anything_is_stored(tmp_path):
  source = _image_folder(tmp_path / 'src', {'train': 2})
  bad = tmp_path / 'src' / 'train' / 'dog' / 'notes.jpg'
  for file in (bad, tmp_path / 'src' / 'train' / 'dog' / 'z.png'):  # The first is named.
    file.write_text('not an image')
  with pytest.raises(ConfigError, match=rf'{bad} is not a readable image \(Unknown image file '
                     r'format\. One of JPEG.*\): remove or replace it'):
    prepare.prepare('pets', str(tmp_path / 'tfds'), source=source)
  assert not (tmp_path / 'tfds').exists()


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / 'tfds').write_text('kept')
  with pytest.raises(ConfigError, match=r'data_dir .*tfds is a file: pass a directory'):
    prepare.prepare('digits', str(tmp_path / 'tfds'))


def test_image_folder_name_must_be_snake_case(tmp_path):
  with pytest.raises(ConfigError, match="'My-Data' must be lowercase snake_case"):
    prepare.prepare('My-Data', str(tmp_path / 'tfds'), source=str(tmp_path))


def test_cli_prepare_describes_the_folders_own_splits(tmp_path):
  source = _image_folder(tmp_path / 'src', {'training': 1, 'val': 1})
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'prepare', 'pets', f'--source={source}',
       f'--data_dir={tmp_path / "tfds"}'], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert 'pets[training]: DatasetInfo(num_classes=2, num_examples=2' in result.stdout
  assert 'pets[val]: DatasetInfo(num_classes=2, num_examples=2' in result.stdout
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'info', 'pets', '--split=val',
       f'--data_dir={tmp_path / "tfds"}'], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1].startswith(
      "pets[val]: DatasetInfo(num_classes=2, num_examples=2, class_names=['cat', 'dog']")


def test_cli_prints_one_line_errors(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'prepare', 'my_photos',
       f'--data_dir={tmp_path}'], capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: cannot prepare 'my_photos'")
  # A catalogue dataset is its TFDS builder's to prepare (`tfds build` needs apache_beam).
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'prepare', 'imagenet2012',
       f'--manual_dir={tmp_path / "none"}', f'--data_dir={tmp_path}'], capture_output=True,
      text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: preparing imagenet2012 failed (AssertionError: Manual directory {tmp_path}/none '
      'does not exist or is empty. Create it and download/extract dataset artifacts in there '
      'using instructions): its builder downloads its files (or reads those downloaded by hand '
      'from --manual_dir): run this where they are available, or copy a prepared imagenet2012 '
      f'folder into {tmp_path}')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'prepare', 'cifar10:9.9.9',
       f'--data_dir={tmp_path}'], capture_output=True, text=True, check=False)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: cifar10:9.9.9 is not a version or config TFDS has (')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'info', 'cifar10', f'--data_dir={tmp_path}'],
      capture_output=True, text=True, check=False)
  *before, error = result.stderr.strip().splitlines()
  assert error.startswith("error: dataset 'cifar10' is not prepared")
  # TFDS's Python log lines are gone (TF's C++ start-up lines cannot be silenced).
  assert not [line for line in before if 'dataset_info.json' in line or '.py:' in line], before


def test_cli_usage_names_every_flag():
  with pytest.raises(ConfigError) as e:
    datasets.main(['datasets', 'info'])
  names = [flag.name for flag in flags.FLAGS.get_flags_for_module(datasets)]
  assert sorted(names) == ['data_dir', 'manual_dir', 'source', 'split']
  assert all(f'[--{name}=' in str(e.value) for name in names), str(e.value)
