"""`vit_jax.infer` and `vit_jax.evaluation.classify`: real photos and odd image modes, a model
trained here on Fashion-MNIST, the eval pipeline's decoding and preprocessing, a hybrid `.npz`'s
image size, the output formats, one compile."""
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds

import param_trees

from vit_jax import models
from vit_jax.checkpoints import npz
from vit_jax.data import input_pipeline
from vit_jax.data import pp_options
from vit_jax.data import prepare
from vit_jax.data import preprocess
from vit_jax.errors import ConfigError
from vit_jax.evaluation import classify
from vit_jax.training import experiment
from vit_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
           'Bag', 'Ankle boot']
HYBRID = 'R8+ViT-Mu_8'  # The embedded default: its /8 stem pads 25-32 px alike to a 4x4 grid.
CLI_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS='')


@pytest.fixture(scope='module')
def workdir(prepared_data_dir, tmp_path_factory) -> str:
  """ViT-Mu_4 trained for 100 steps on Fashion-MNIST: ~52% on test[:1000], far from converged
  (40 steps gave 33%, too close to this file's 40% floor to be a stable fixture)."""
  config = ml_collections.ConfigDict(dict(
      model='ViT-Mu_4', dataset='fashion_mnist', data_dir=prepared_data_dir, image_size=28,
      channels=1, pp={'train': {'crop': 'resize'}},
      batch=64, total_steps=100, optimizer='adamw', base_lr=3e-3, weight_decay=0.0,
      warmup_steps=5, grad_norm_clip=1.0, eval_every=0, progress_every=100, seed=0))
  path = str(tmp_path_factory.mktemp('infer') / 'workdir')
  # One device: 8 simulated ones only slow a model this small down.
  loop.train_and_evaluate(config, path, exp=experiment.build(config, devices=jax.devices()[:1]))
  return path


@pytest.fixture(scope='module')
def hybrid_npz(tmp_path_factory):
  """(model, params, .npz path) of an untrained R8+ViT-Mu_8 for grey 28 px images with a random
  head (a fresh head is zero: every image would score the same), in the released layout."""
  model = models.create(HYBRID, num_classes=10)
  params = param_trees.compiled_init(model, (1, 28, 28, 1))['params']
  head = np.random.default_rng(0).normal(size=params['head']['kernel'].shape).astype(np.float32)
  params = {**params, 'head': {**params['head'], 'kernel': head}}
  path = str(tmp_path_factory.mktemp('hybrid') / 'hybrid.npz')
  npz.save_npz(params, path)
  return model, params, path


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> dict[str, str]:
  """scikit-image's bundled photos in the modes users have: JPEG, grey, RGBA, palette, 16-bit."""
  root = tmp_path_factory.mktemp('photos')
  coffee = skimage.data.coffee()
  images = {
      'astronaut.jpg': Image.fromarray(skimage.data.astronaut()),
      'camera.png': Image.fromarray(skimage.data.camera()),  # Mode L.
      'coffee_rgba.png': Image.fromarray(np.dstack([coffee, np.full(coffee.shape[:2], 128,
                                                                    np.uint8)])),
      'chelsea_palette.png': Image.fromarray(skimage.data.chelsea()).quantize(64),  # Mode P.
      'moon16.png': Image.fromarray(skimage.data.moon().astype(np.uint16) * 257),  # I;16.
  }
  paths = {}
  for name, image in images.items():
    paths[name] = str(root / name)
    image.save(paths[name])
  return paths


def _report(checkpoint: str, paths, *, model=None, labels=None, **kwargs) -> str:
  """What `vit_jax.infer` prints for `paths` (all of them readable)."""
  class_names = classify.read_labels(labels) if labels else None
  classifier = classify.Classifier.from_checkpoint(checkpoint, model, class_names=class_names)
  out = io.StringIO()
  assert classify.report(classifier, paths, out=out, source=checkpoint, **kwargs) == 0
  return out.getvalue()


def _fashion_test_images(data_dir: str, count: int):
  """(raw uint8 images, labels) of the first `count` test examples, in the eval order."""
  ds = tfds.builder('fashion_mnist', data_dir=data_dir).as_dataset(
      split=f'test[:{count}]', shuffle_files=False)
  examples = list(ds.as_numpy_iterator())
  return [ex['image'] for ex in examples], np.array([ex['label'] for ex in examples])


@pytest.mark.parametrize('mode,ext', [('1', 'png'), ('L', 'png'), ('LA', 'png'), ('I;16', 'png'),
                                      ('RGB', 'png'), ('RGBA', 'png'), ('P', 'png'),
                                      ('L', 'jpg'), ('RGB', 'jpg')])
def test_loaded_pixels_are_what_tf_decodes(tmp_path, mode, ext):
  # JPEG: TF's default DCT is not PIL's, so a PIL decode is off by a few grey levels.
  rng = np.random.default_rng(0)
  rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
  image = {
      '1': lambda: Image.fromarray(rgba[..., 0] > 127),
      'L': lambda: Image.fromarray(rgba[..., 0]),
      'LA': lambda: Image.fromarray(rgba[..., :2], 'LA'),
      'I;16': lambda: Image.fromarray(rng.integers(0, 65536, (9, 13)).astype(np.uint16)),
      'RGB': lambda: Image.fromarray(rgba[..., :3]),
      'RGBA': lambda: Image.fromarray(rgba),
      'P': lambda: Image.fromarray(rgba[..., :3]).quantize(16),
  }[mode]()
  path = str(tmp_path / f'image.{ext}')
  image.save(path)
  assert Image.open(path).mode == mode
  pixels = classify.load_image(path)
  with open(path, 'rb') as f:
    data = f.read()
  expected = tf.io.decode_image(data, channels=pixels.shape[-1], expand_animations=False)
  np.testing.assert_array_equal(pixels, expected.numpy())
  assert pixels.shape[-1] == (1 if mode in ('1', 'L', 'LA', 'I;16') else 3)


def test_a_test_image_as_png_is_preprocessed_and_classified_as_by_the_eval_pipeline(
    workdir, prepared_data_dir, tmp_path):
  classifier = classify.Classifier.from_checkpoint(workdir, batch_size=16)
  assert classifier.class_names == FASHION
  raw, labels = _fashion_test_images(prepared_data_dir, 32)
  batch, = input_pipeline.make_eval_iterator(
      dataset='fashion_mnist', split='test[:32]', data_dir=prepared_data_dir, global_batch=32,
      image_size=28, channels=1, pp=ml_collections.ConfigDict(), process_index=0,
      process_count=1)
  np.testing.assert_array_equal(batch['label'], labels)
  paths = []
  for i, image in enumerate(raw):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image[..., 0]).save(paths[-1])
    np.testing.assert_array_equal(classifier.checkpoint.preprocess(classify.load_image(paths[-1])),
                                  batch['image'][i])
  predictions = list(classifier.classify_files(paths))
  reference = classifier.logits(batch['image'])
  np.testing.assert_allclose(np.stack([p.logits for p in predictions]), reference, atol=1e-5)
  top1 = np.array([p.top_k(1)[0][0] for p in predictions])
  assert np.mean(top1 == labels) >= 0.4  # Chance is 0.1.
  # The one the model is surest of is right, under its dataset's name.
  best = max((p for p, label in zip(predictions, labels) if p.top_k(1)[0][0] == label),
             key=lambda p: p.top_k(1)[0][1])
  label = FASHION[labels[paths.index(best.path)]]
  assert _report(workdir, [best.path]).splitlines()[1].endswith(f'  {label}')


def test_top5_of_photos_of_any_size_and_mode(workdir, photos):
  lines = _report(workdir, list(photos.values())).splitlines()
  assert len(lines) == 6 * len(photos)
  for i, path in enumerate(photos.values()):
    assert lines[6 * i] == path
    rows = [line.split(None, 1) for line in lines[6 * i + 1:6 * i + 6]]
    probs = [float(p) for p, _ in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert len({name for _, name in rows}) == 5 and all(name in FASHION for _, name in rows)
    assert all(line.startswith('  0.') for line in lines[6 * i + 1:6 * i + 6])


def test_json_has_every_probability_and_logit(workdir, photos):
  paths = [photos['astronaut.jpg'], photos['moon16.png']]
  doc = json.loads(_report(workdir, paths, as_json=True))
  assert doc['labels'] == FASHION and doc['errors'] == [] and doc['checkpoint'] == workdir
  assert doc['params'] == f'workdir {workdir} (step 100)'
  assert [p['image'] for p in doc['predictions']] == paths
  for p in doc['predictions']:
    probs, logits = np.array(p['probabilities']), np.array(p['logits'])
    assert probs.shape == logits.shape == (10,)
    assert abs(probs.sum() - 1) < 1e-6
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=1e-6)
    assert [t['index'] for t in p['top5']] == list(np.argsort(-probs)[:5])
    assert [t['label'] for t in p['top5']] == [FASHION[t['index']] for t in p['top5']]
    np.testing.assert_allclose([t['probability'] for t in p['top5']], np.sort(probs)[::-1][:5])


def test_cli_top_k_reaches_the_json_and_is_clamped_to_the_class_count(workdir, photos):
  paths = [photos['astronaut.jpg'], photos['camera.png'], photos['moon16.png']]
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.infer', f'--checkpoint={workdir}',
                         '--json', '--top_k=2', *paths],
                        capture_output=True, text=True, env=CLI_ENV, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr
  doc = json.loads(proc.stdout)
  assert [p['image'] for p in doc['predictions']] == paths and doc['errors'] == []
  for p in doc['predictions']:
    # Exactly the 2 likeliest: a flag not passed on to `report` would give the default 'top5'.
    assert sorted(p) == ['image', 'logits', 'probabilities', 'top2']
    probs = np.array(p['probabilities'])
    assert [t['index'] for t in p['top2']] == list(np.argsort(-probs)[:2])
    np.testing.assert_allclose([t['probability'] for t in p['top2']], np.sort(probs)[::-1][:2])
  # Above the 10 classes (the CLI passes --top_k to `report` as is, pinned above): each class
  # once, likeliest first, summing to 1. Unclamped, the key would read 'top11'.
  for p in json.loads(_report(workdir, paths, as_json=True, top_k=11))['predictions']:
    assert sorted(p) == ['image', 'logits', 'probabilities', 'top10']
    assert sorted(t['index'] for t in p['top10']) == list(range(10))
    assert [t['label'] for t in p['top10']] == [FASHION[t['index']] for t in p['top10']]
    probs = [t['probability'] for t in p['top10']]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    np.testing.assert_allclose(probs, np.sort(p['probabilities'])[::-1])


CROP_0_9 = {'crop': 'resize_crop', 'crop_fraction': 0.9}


def test_crop_overrides_the_eval_crop_of_a_workdir_or_a_npz(workdir, photos, tmp_path):
  """big_vision evaluates ImageNet with resize_crop; a .npz cannot say so, so --crop does (and
  --crop_fraction how much it keeps)."""
  path = photos['coffee_rgba.png']  # 400 x 600: the crop drops a third of its width.
  pixels = classify.load_image(path)
  npz_path = str(tmp_path / 'mu4.npz')
  npz.save_npz(classify.load_checkpoint(workdir).params, npz_path)
  for checkpoint, model in ((workdir, None), (npz_path, 'ViT-Mu_4')):
    default = classify.Classifier.from_checkpoint(checkpoint, model)
    cropped = classify.Classifier.from_checkpoint(checkpoint, model, eval_pp=CROP_0_9)
    assert (default.checkpoint.eval_pp, cropped.checkpoint.eval_pp) == (
        pp_options.EVAL_DEFAULTS, {**pp_options.EVAL_DEFAULTS, **CROP_0_9})
    np.testing.assert_array_equal(
        cropped.checkpoint.preprocess(pixels),
        preprocess.eval_image(tf.convert_to_tensor(pixels), 28, 1,
                              cropped.checkpoint.eval_pp).numpy())
  at_default_fraction = preprocess.eval_image(
      tf.convert_to_tensor(pixels), 28, 1, {**cropped.checkpoint.eval_pp, 'crop_fraction': 0.875})
  assert np.abs(at_default_fraction.numpy() - cropped.checkpoint.preprocess(pixels)).max() > 0.1
  expected = cropped.logits(cropped.checkpoint.preprocess(pixels)[None])
  assert np.abs(expected - default.logits(default.checkpoint.preprocess(pixels)[None])).max() > 0.01
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.infer', f'--checkpoint={npz_path}',
                         '--model=ViT-Mu_4', '--crop=resize_crop', '--crop_fraction=0.9', '--json',
                         path],
                        capture_output=True, text=True, env=CLI_ENV, cwd=REPO, check=False)
  assert proc.returncode == 0, proc.stderr
  np.testing.assert_allclose([json.loads(proc.stdout)['predictions'][0]['logits']], expected,
                             atol=1e-4)  # Batches of 32 here, of 1 there: other floats.
  with pytest.raises(ConfigError, match='--crop=centre is not one of resize, resize_crop, timm'):
    classify.load_checkpoint(workdir, eval_pp={'crop': 'centre'})
  with pytest.raises(ConfigError, match=r'^--crop_fraction=1.5 is not in \(0, 1\]: pass the '):
    classify.load_checkpoint(workdir, eval_pp={'crop': 'timm', 'crop_fraction': 1.5})
  with pytest.raises(ConfigError, match=r"^--crop_fraction=0.9 keeps a central part only under "
                     r"--crop=resize_crop or timm, and workdir .* is evaluated with 'resize': add "
                     r'--crop=timm \(or resize_crop\)$'):
    classify.load_checkpoint(workdir, eval_pp={'crop_fraction': 0.9})


def test_the_forward_pass_compiles_once_for_any_number_of_batches(workdir, photos):
  classifier = classify.Classifier.from_checkpoint(workdir, batch_size=2)
  paths = list(photos.values())  # 5 files: batches of 2, 2 and 1 padded to 2.
  small = [p.logits for p in classifier.classify_files(paths)]
  assert classifier.num_compiles == 1
  list(classifier.classify_files(paths[:1]))
  assert classifier.num_compiles == 1
  whole = classify.Classifier.from_checkpoint(workdir, batch_size=8)
  np.testing.assert_allclose(small, [p.logits for p in whole.classify_files(paths)], atol=1e-5)


def test_results_come_in_the_order_of_the_files(workdir, photos, tmp_path):
  # An unreadable file's error between two predictions of the same batch, not before them.
  notes = tmp_path / 'notes.txt'
  notes.write_text('not an image')
  classifier = classify.Classifier.from_checkpoint(workdir, batch_size=4)
  paths = [photos['camera.png'], str(notes), photos['astronaut.jpg']]
  results = list(classifier.classify_files(paths))
  assert [type(r).__name__ for r in results] == ['Prediction', 'ImageError', 'Prediction']
  assert [r.path for r in results] == paths


def test_npz_takes_labels_from_a_file_or_prints_indices(workdir, photos, tmp_path):
  path = str(tmp_path / 'mu4.npz')
  npz.save_npz(classify.load_checkpoint(workdir).params, path)
  image = [photos['camera.png']]
  plain = _report(path, image, model='ViT-Mu_4')
  labels = tmp_path / 'labels.txt'
  labels.write_text(''.join(f'class_{i}\n' for i in range(10)))
  named = _report(path, image, model='ViT-Mu_4', labels=str(labels))
  indices = [line.split()[1] for line in plain.splitlines()[1:]]
  names = [line.split()[1] for line in named.splitlines()[1:]]
  assert names == [f'class_{i}' for i in indices]
  labels.write_text('just\ntwo\n')
  with pytest.raises(ConfigError, match='2 class names for a model with 10 classes'):
    _report(path, image, model='ViT-Mu_4', labels=str(labels))
  labels.write_bytes('chaussure\nbo\xeete\n'.encode('latin-1'))  # A traceback.
  with pytest.raises(ConfigError, match=f'^labels file {labels} is not UTF-8 text: pass a text'):
    _report(path, image, model='ViT-Mu_4', labels=str(labels))
  with pytest.raises(ConfigError, match='name the model'):
    _report(path, image)
  # A workdir names its own architecture: another --model is a mistake, the same one is fine.
  with pytest.raises(ConfigError,
                     match=r'holds a ViT-Mu_4, not ViT-B_16: drop the model name \(--model'):
    _report(workdir, image, model='ViT-B_16')
  assert _report(workdir, image, model='ViT-Mu_4') == _report(workdir, image)


def test_a_workdirs_dataset_names_its_classes_only_when_they_fit_the_head(
    workdir, tmp_path, caplog):
  pretrained = classify.load_checkpoint(workdir).pretrained
  assert classify.known_class_names(pretrained) == FASHION
  head = pretrained.params['head']
  narrow = dict(pretrained.params, head={k: v[..., :5] for k, v in head.items()})
  with caplog.at_level(logging.WARNING):
    names = classify.known_class_names(dataclasses.replace(pretrained, params=narrow))
  assert names is None
  assert 'fashion_mnist has 10 classes but the head 5; using class indices' in caplog.text
  unprepared = dict(pretrained.config, data_dir=str(tmp_path))
  assert classify.known_class_names(dataclasses.replace(pretrained, config=unprepared)) is None
  assert classify.known_class_names(dataclasses.replace(pretrained, config=None)) is None


def test_cli_reports_each_unreadable_file_in_one_line_and_classifies_the_rest(
    workdir, photos, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('not an image')
  truncated = tmp_path / 'truncated.jpg'
  with open(photos['astronaut.jpg'], 'rb') as f:
    truncated.write_bytes(f.read()[:2000])
  good = [photos['astronaut.jpg'], photos['coffee_rgba.png']]
  args = [good[0], str(notes), str(truncated), str(tmp_path), good[1]]
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.infer', f'--checkpoint={workdir}',
                         '--top_k=11', *args],
                        capture_output=True, text=True, env=CLI_ENV, cwd=REPO, check=False)
  assert proc.returncode == 1, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 3, proc.stderr
  assert errors[0].startswith(f'error: {notes}: not a readable image')
  assert '0x' not in errors[0]  # PIL's message named its in-memory buffer by address.
  assert errors[1].startswith(f'error: {truncated}: not a readable image')
  assert errors[2] == (f'error: {tmp_path}: not a readable image (a folder: pass the images in '
                       f'it, e.g. {tmp_path}/*.jpg)')  # Was "Is a directory".
  assert [line for line in proc.stdout.splitlines() if not line.startswith(' ')] == good
  # --top_k=11, above the 10 classes, lists each class once per image (5 lines if ignored).
  lines = proc.stdout.splitlines()
  assert len(lines) == 11 * len(good)
  for i in range(len(good)):
    rows = [line.split(None, 1) for line in lines[11 * i + 1:11 * i + 11]]
    assert sorted(name for _, name in rows) == sorted(FASHION)
    probs = [float(p) for p, _ in rows]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3  # 4 decimals.


def test_top_k_below_one_is_a_config_error(workdir, photos):
  # A negative k slipped through min() into argsort[:k] and printed all classes but the last.
  with pytest.raises(ConfigError, match=r'top_k=-1: print at least one class'):
    _report(workdir, list(photos.values())[:1], top_k=-1)



@pytest.mark.parametrize('name,image', [
    ('palette.bmp', lambda: Image.fromarray(skimage.data.chelsea()).quantize(16)),  # TF: indices.
    ('grey.gif', lambda: Image.fromarray(skimage.data.camera())),  # TF: GIFs in colour only.
    ('grey.tif', lambda: Image.fromarray(skimage.data.camera())),  # TF: no TIFF decoder.
])
def test_what_tf_misreads_or_cannot_read_is_decoded_by_pil(tmp_path, name, image):
  path = str(tmp_path / name)
  image().save(path)
  expected = np.asarray(Image.open(path).convert('RGB' if name.endswith('bmp') else 'L'))
  np.testing.assert_array_equal(classify.load_image(path), expected.reshape(
      *expected.shape[:2], -1))


def test_a_16_bit_grey_tiff_keeps_its_high_byte(tmp_path):
  # As TF decodes a 16-bit PNG of the same pixels (its low byte would be noise).
  path = str(tmp_path / 'grey16.tif')
  Image.fromarray(np.array([[0, 256, 65535]], np.uint16)).save(path)
  np.testing.assert_array_equal(classify.load_image(path), [[[0], [1], [255]]])


def test_jpeg_files_are_preprocessed_as_the_eval_pipeline_preprocesses_them(tmp_path):
  """The same JPEG bytes, stored in a prepared image folder and given to infer as a file, give
  the same model input at 224 px with big_vision's and timm's central crops and at 32 px resized.
  A PIL decode moved 92% of the 224 px values, by up to 0.11; timm's crop decodes as PIL."""
  root = tmp_path / 'folder'
  for name in ('astronaut', 'camera', 'coffee'):  # RGB, grey, RGB.
    (root / 'test' / name).mkdir(parents=True)
    Image.fromarray(getattr(skimage.data, name)()).save(root / 'test' / name / f'{name}.jpg')
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare('jpeg_photos', data_dir, source=str(root))
  stored = tfds.builder('jpeg_photos', data_dir=data_dir).as_dataset(
      split='test', shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  files = []
  for i, example in enumerate(stored.as_numpy_iterator()):
    assert example['image'][:2] == b'\xff\xd8'  # Stored as the JPEG it was.
    files.append(str(tmp_path / f'stored_{i}.jpg'))
    with open(files[-1], 'wb') as f:
      f.write(example['image'])
  for size, channels, crop in ((224, 3, 'resize_crop'), (32, 3, 'resize'), (224, 3, 'timm')):
    eval_pp = pp_options.eval_options({'crop': crop})
    batch, = input_pipeline.make_eval_iterator(
        dataset='jpeg_photos', split='test', data_dir=data_dir, global_batch=3, image_size=size,
        channels=channels, pp=ml_collections.ConfigDict({'eval': eval_pp}),
        process_index=0, process_count=1)
    jpeg_as_pil = crop == 'timm'
    for path, expected in zip(files, batch['image']):
      pixels = classify.load_image(path, jpeg_as_pil)
      if jpeg_as_pil:  # timm reads its images with PIL: the same pixels, in both paths.
        with Image.open(path) as image:
          pil = np.asarray(image.convert('RGB' if pixels.shape[-1] == 3 else 'L'))
        np.testing.assert_array_equal(pixels, pil.reshape(pixels.shape))
      np.testing.assert_array_equal(
          preprocess.eval_image(tf.constant(pixels), size, channels, eval_pp).numpy(), expected)


def test_a_hybrid_npz_runs_at_the_image_size_given_else_at_the_largest_its_grid_fits(
    hybrid_npz, prepared_data_dir, tmp_path, caplog):
  model, params, path = hybrid_npz
  # ceil(size / 8) = 4 tokens a side for 25 to 32 px: the grid alone cannot tell them apart.
  assert [models.token_grid(model, s, s) for s in (24, 25, 32, 33)] == [(3, 3), (4, 4), (4, 4),
                                                                       (5, 5)]
  raw, _ = _fashion_test_images(prepared_data_dir, 8)
  paths = []
  for i, image in enumerate(raw):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image[..., 0]).save(paths[-1])
  batch, = input_pipeline.make_eval_iterator(
      dataset='fashion_mnist', split='test[:8]', data_dir=prepared_data_dir, global_batch=8,
      image_size=28, channels=1, pp=ml_collections.ConfigDict(), process_index=0,
      process_count=1)
  forward = jax.jit(lambda params, images: model.apply({'params': params}, images, train=False))
  at_28 = np.asarray(forward(params, batch['image']))
  given = classify.Classifier.from_checkpoint(path, HYBRID, image_size=28, batch_size=8)
  # The same pixels through the same compiled pass (one batch of 8): the same logits, exactly.
  np.testing.assert_array_equal([p.logits for p in given.classify_files(paths)], at_28)
  with caplog.at_level(logging.WARNING):
    guessed = classify.Classifier.from_checkpoint(path, HYBRID, batch_size=8)
  assert guessed.checkpoint.image_size == 32
  assert 'hybrid.npz: 25-32 px' in caplog.text and 'guessing 32' in caplog.text
  assert '--image_size' in caplog.text
  guessed_logits = np.stack([p.logits for p in guessed.classify_files(paths)])
  assert np.abs(guessed_logits - at_28).max() > 0.1  # What the wrong size costs.
  with pytest.raises(ConfigError,
                     match=r'image size 24 does not give .*: pass an --image_size from 25 to 32'):
    classify.load_checkpoint(path, HYBRID, image_size=24)
  # The flag reaches the model; without it, one line on stderr says what was guessed.
  for flag, expected in (('--image_size=28', at_28), ('--top_k=5', guessed_logits)):
    proc = subprocess.run([sys.executable, '-m', 'vit_jax.infer', f'--checkpoint={path}',
                           f'--model={HYBRID}', '--json', flag, *paths[:2]],
                          capture_output=True, text=True, env=CLI_ENV, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    logits = [p['logits'] for p in json.loads(proc.stdout)['predictions']]
    np.testing.assert_allclose(logits, expected[:2], atol=1e-4)  # Batches of 32: other floats.
    assert ('guessing 32, the largest: pass --image_size' in proc.stderr) == (flag == '--top_k=5')
