"""Dataset preparation: image folders as TFDS datasets, TFDS's catalogue builders, the
offline sources' errors and the `vit_jax.datasets` command line (the pipeline: test_data.py)."""
import collections
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from data_setup import pp_dict
from vit_jax import datasets
from vit_jax.data import input_pipeline as ip
from vit_jax.data import prepare
from vit_jax.errors import ConfigError

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
    # Prepared, then no split string could name it: a traceback in training.
    (lambda train: shutil.copytree(train, train.parent / 'val.v2'),
     r"val\.v2: a split folder's name must be letters, digits, _ and -"),
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
  # A file above it was NotADirectoryError's traceback from inside TFDS.
  with pytest.raises(ConfigError, match=r'data_dir .*tfds/sub is inside .*tfds, which is a file'):
    prepare.prepare('digits', str(tmp_path / 'tfds' / 'sub'))


def test_image_folder_name_must_be_snake_case(tmp_path):
  with pytest.raises(ConfigError, match="'My-Data' must be lowercase snake_case"):
    prepare.prepare('My-Data', str(tmp_path / 'tfds'), source=str(tmp_path))


def test_image_folder_skips_hidden_folders(tmp_path):
  """Jupyter's .ipynb_checkpoints at the root and a tool's .cache in a split are neither splits
  nor labels (each was refused, or taken as a third class)."""
  source = _image_folder(tmp_path / 'src', {'train': 2, 'val': 1})
  png = (tmp_path / 'src' / 'train' / 'cat' / '0.png').read_bytes()
  for hidden in ('.ipynb_checkpoints/x/a.png', 'train/.cache/b.png'):
    (tmp_path / 'src' / hidden).parent.mkdir(parents=True)
    (tmp_path / 'src' / hidden).write_bytes(png)
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare('pets', data_dir, source=source)
  assert sorted(tfds.builder('pets', data_dir=data_dir).info.splits) == ['train', 'val']
  assert ip.get_info('pets', 'train', data_dir) == ip.DatasetInfo(2, 4, ['cat', 'dog'],
                                                                  (None, None, 3))
  assert ip.get_info('pets', 'val', data_dir) == ip.DatasetInfo(2, 2, ['cat', 'dog'],
                                                                (None, None, 3))


@pytest.mark.parametrize('name,message', [
    ('digits', r'^digits ships with scikit-learn: drop --source$'),
    # Else stored under a name whose TFDS builder would be the one loaded back.
    ('cifar10', r"^'cifar10' is a TFDS catalogue name: pick another name for the image folder "),
])
def test_a_source_is_refused_for_a_dataset_with_its_own_builder(tmp_path, name, message):
  source = _image_folder(tmp_path / 'src', {'train': 1})
  with pytest.raises(ConfigError, match=message):
    prepare.prepare(name, str(tmp_path / 'tfds'), source=source)
  assert not (tmp_path / 'tfds').exists()


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


def test_cli_extra_arguments_get_the_usage():
  """`prepare a b` was a ValueError traceback from unpacking the arguments."""
  with pytest.raises(ConfigError, match=r'^usage: python -m vit_jax\.datasets prepare NAME'):
    datasets.main(['datasets', 'prepare', 'a', 'b'])


def test_cli_info_describes_the_train_split_by_default(prepared_data_dir):
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.datasets', 'info', 'fashion_mnist',
       f'--data_dir={prepared_data_dir}'], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1].startswith(
      'fashion_mnist[train]: DatasetInfo(num_classes=10, num_examples=60000, ')
