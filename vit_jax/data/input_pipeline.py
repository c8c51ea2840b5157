"""Train and eval input pipelines over prepared TFDS datasets (tf.data -> numpy).

Training follows the ViT paper code: the shuffle buffer holds *encoded* images
(decoded after shuffling), then inception crop, resize, random flip, values to
[-1, 1]; optionally RandAugment and mixup. Grayscale is expanded to RGB (or RGB
reduced to gray) to match the model's `channels`.

The train stream is a pure function of (seed, position): the per-epoch file
order and shuffle buffer are seeded by (seed, epoch, process), every random op
is stateless and seeded by (seed, example position), and mixup by (seed, step).
In-memory splits of one image shape with crop='resize' and no RandAugment are
decoded once and preprocessed a batch at a time, their flips seeded by (seed,
step): per-example ops cost ~100 CPU-us per 28 px image, which the train step
sharing the two cores felt as ~14% of its rate.
`make_train_iterator(start_step=k)` skips to position k * local_batch (before
decoding) and yields exactly what an uninterrupted iterator yields from step k.
Batches run across epoch boundaries, so no example is dropped.

Each process reads only its slice of the split (`tfds.split_for_jax_process`)
and yields global_batch // process_count examples per step.

The `pp` options (augmentation, crops) and their defaults: `vit_jax.data.pp_options`.

Every pipeline runs without tf.data's autotune thread (`numpy_iterator`), one map call per
core (the most that autotuner's CPU budget would allow). Measured rates, and why splits are held
in memory or batched: docs/performance.md ("Input pipeline").
"""
import dataclasses
import re
from typing import Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import host_devices
from vit_jax.data import catalog
from vit_jax.data import pp_options
from vit_jax.data import preprocess
from vit_jax.data import randaug
from vit_jax.errors import ConfigError, first_line

_RAW = {'image': tfds.decode.SkipDecoding()}
IN_MEMORY_BYTES = 2 * 2**30  # Splits up to this size (encoded) are held in memory for training.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_examples: int  # Of the requested split.
  class_names: list[str] | None
  image_shape: tuple  # Raw (H, W, C); H, W are None for mixed-size datasets.


def get_info(dataset: str, split: str, data_dir: str | None) -> DatasetInfo:
  """What the model and the step counts need to know about a prepared split."""
  builder = catalog.load_builder(dataset, data_dir)
  return _info(builder, dataset, split)


def _info(builder: tfds.core.DatasetBuilder, dataset: str,
          split: str) -> DatasetInfo:
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ConfigError(f'{dataset} has features {list(features)}: need an '
                      '"image" and a "label" (image classification)')
  label = features['label']
  return DatasetInfo(
      num_classes=label.num_classes,
      num_examples=_num_examples(builder, dataset, split),
      class_names=list(label.names) if label.names else None,
      image_shape=tuple(features['image'].shape))


def _num_examples(builder: tfds.core.DatasetBuilder, dataset: str, split: str) -> int:
  """Examples in the requested `split`; a missing split or an empty slice is a ConfigError."""
  try:
    count = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    splits = builder.info.splits
    if set(re.findall(r'(?:^|\+)\s*([\w-]+)', split)) <= set(splits):  # A slice out of range.
      sizes = ', '.join(f'{name} {splits[name].num_examples}' for name in sorted(splits))
      raise ConfigError(f'split {split!r} of {dataset} cannot be read ({first_line(e)}): slice '
                        f'within the examples its splits hold ({sizes}), or in percent like '
                        'train[:90%]') from e
    raise ConfigError(
        f'{dataset} has no split {split!r}: use one of '
        f'{sorted(splits)} (or a slice like train[:90%])') from e
  if count <= 0:
    raise ConfigError(f'split {split!r} of {dataset} holds no examples: use a slice that '
                      'starts before it ends, like train[:90%]')
  return count


def shared_examples(dataset: str, split_a: str, split_b: str, data_dir: str | None) -> int:
  """How many examples both splits read (each a TFDS split string, slices and '+' allowed)."""
  splits = catalog.load_builder(dataset, data_dir).info.splits

  def ranges(split: str) -> list[tuple[str, int, int]]:
    read = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
    return [(r.splitname, r.from_ or 0, splits[r.splitname].num_examples if r.to is None
             else r.to) for r in read]

  return sum(max(0, min(end_a, end_b) - max(start_a, start_b))
             for name_a, start_a, end_a in ranges(split_a)
             for name_b, start_b, end_b in ranges(split_b) if name_a == name_b)


def _slice_size(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
                process_count: int) -> int:
  """Examples of `split` that process `process_index` reads (0 when its slice is empty)."""
  sliced = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  return builder.info.splits[sliced].num_examples


def _process_slice(split: str, global_batch: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int, int, str]:
  """(process_index, process_count, local_batch, this process's split)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch <= 0 or global_batch % count:
    raise ConfigError(f'global batch {global_batch} must be a positive multiple'
                      f' of the process count {count}')
  sliced = tfds.split_for_jax_process(
      split, process_index=index, process_count=count)
  return index, count, global_batch // count, sliced


def _bytes_per_example(builder: tfds.core.DatasetBuilder) -> float:
  examples = sum(split.num_examples for split in builder.info.splits.values())
  return builder.info.dataset_size / max(examples, 1)


def numpy_iterator(ds: tf.data.Dataset) -> Iterator:
  """`ds` as numpy, without tf.data's autotune thread.

  Deleting an autotuned iterator (TF 2.21) can wait out that thread's sleep, up to a minute:
  the cancellation wakes it before marking itself done, so it may sleep again. Seen as 40-60 s
  gaps at the end of `main` runs, and as deletes of up to 2.1 s in 7 of 30 trials of a
  3-second pipeline with the cores busy (0 of 30 without it): docs/performance.md.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def _load_encoded(ds: tf.data.Dataset) -> dict[str, np.ndarray]:
  """Every (still encoded) example of `ds` as numpy arrays, in order: one batch of them all."""
  return next(numpy_iterator(ds.batch(len(ds))))


def _decode_all(encoded: np.ndarray, channels: int) -> np.ndarray:
  """Every image decoded once, uint8 [N, H, W, C] (all of one shape: the feature's static one)."""
  ds = tf.data.Dataset.from_tensor_slices(encoded).map(
      lambda data: preprocess.decode(data, channels),
      num_parallel_calls=host_devices.schedulable_cores())
  return np.concatenate(list(numpy_iterator(ds.batch(4096))))


def _padding(spec, count: int) -> tf.data.Dataset:
  """`count` all-zero elements shaped like `spec` (placeholders, never real data)."""
  zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
  return tf.data.Dataset.from_tensors(zeros).repeat(count)


def _train_example_fn(opts: dict, image_size: int, channels: int,
                      raw_channels: int, seed: int, index: int, count: int):
  """(position, encoded example) -> preprocessed example, seeded by position."""

  def fn(position, example):
    example_seed = tf.stack(
        [tf.constant(seed, tf.int64), position * count + index])
    crop_seed, flip_seed, aug_seed = tf.unstack(
        tf.random.experimental.stateless_split(example_seed, 3))
    data = example['image']
    if opts['crop'] == 'inception':
      image = preprocess.resize(preprocess.decode_and_inception_crop(
          data, crop_seed, raw_channels, opts['inception_area_min']), image_size)
    elif opts['crop'] == 'resize':
      image = preprocess.resize(preprocess.decode(data, raw_channels), image_size)
    else:
      image = preprocess.padded_random_crop(
          preprocess.decode(data, raw_channels), crop_seed, image_size,
          opts['random_crop_pad'])
    image = preprocess.to_channels(image, channels)
    if opts['randaug']:
      image = randaug.randaugment(image, aug_seed, *opts['randaug'])
    if opts['flip']:
      image = preprocess.random_flip(image, flip_seed)
    return {'image': preprocess.value_range(image, opts['mean'], opts['std']),
            'label': tf.cast(example['label'], tf.int32)}

  return fn


def _train_batch_fn(opts: dict, images: np.ndarray, labels: np.ndarray, image_size: int,
                    channels: int, seed: int, index: int, count: int):
  """(step, example indices) -> the preprocessed batch, for decoded in-memory images and
  pp.train.crop='resize' without RandAugment: whole-batch ops, flips seeded by (seed, step).
  Same images as `_train_example_fn`'s up to which ones are flipped."""
  images, labels = tf.constant(images), tf.constant(labels)

  def fn(step, indices):
    batch = tf.gather(images, indices)
    if batch.shape[1:3] != (image_size, image_size):
      batch = tf.image.resize(batch, [image_size, image_size])  # As preprocess.resize().
    batch = preprocess.to_channels(tf.cast(batch, tf.float32), channels)
    if opts['flip']:
      flip = tf.random.stateless_uniform(
          tf.shape(indices), tf.stack([tf.constant(seed, tf.int64), step * count + index])) < 0.5
      batch = tf.where(flip[:, None, None, None], tf.reverse(batch, [2]), batch)
    return {'image': preprocess.value_range(batch, opts['mean'], opts['std']),
            'label': tf.cast(tf.gather(labels, indices), tf.int32)}

  return fn


def _mixup(batch: dict[str, np.ndarray], alpha: float, num_classes: int,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Mixes the batch with itself rolled by one; labels become soft. The example keeps the
  larger weight (as big_vision sorts them), so a small alpha does not swap examples."""
  lam = np.float32(rng.beta(alpha, alpha))
  lam = max(lam, 1 - lam)
  onehot = np.eye(num_classes, dtype=np.float32)[batch['label']]
  mix = lambda x: lam * x + (1 - lam) * np.roll(x, 1, axis=0)
  return {'image': mix(batch['image']), 'label': mix(onehot)}


def make_train_iterator(*, dataset: str, split: str, data_dir: str | None,
                        global_batch: int, image_size: int, channels: int,
                        pp: ml_collections.ConfigDict, seed: int,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None,
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite; yields this process's slice of each global batch.

  {'image': float32 [global_batch // process_count, image_size, image_size,
  channels] in [-1, 1] (pp.train.mean and std), 'label': int32 [local_batch] (float32 [local_batch,
  num_classes] with mixup)}. Starting at `start_step` yields exactly what an
  uninterrupted iterator yields from that step on.
  """
  builder = catalog.load_builder(dataset, data_dir)
  info = _info(builder, dataset, split)
  opts = pp_options.train_options(pp.get('train'))
  pp_options.check_channels(channels)
  pp_options.check_normalisation(opts, channels, 'pp.train')
  if opts['crop'] == 'random_crop' and opts['random_crop_pad'] >= image_size:
    raise ConfigError(f'pp.train.random_crop_pad={opts["random_crop_pad"]} reflects at most '
                      f'image_size - 1 = {image_size - 1} pixels: use a smaller pad')
  if seed < 0 or start_step < 0:
    raise ConfigError(f'seed ({seed}) and start_step ({start_step}) must be >= 0')
  index, count, local_batch, sliced = _process_slice(
      split, global_batch, process_index, process_count)
  size = _slice_size(builder, split, index, count)
  if not size:
    raise ConfigError(f'{dataset}[{split}] has no examples for process {index} '
                      f'of {count}: use a larger split')
  example_fn = _train_example_fn(opts, image_size, channels,
                                 info.image_shape[-1], seed, index, count)

  def encoded(shuffle_seed: int | None) -> tf.data.Dataset:
    ds = builder.as_dataset(
        split=sliced, shuffle_files=shuffle_seed is not None, decoders=_RAW,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                    try_autocache=False))
    return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})

  # A small slice is held in memory, encoded, and every epoch is an exact permutation of it, all
  # epochs in one pipeline: no shuffle buffer to refill and no pipeline to restart at epoch
  # boundaries (seconds of tf.data work that stalled the step, worst while XLA holds the cores).
  in_memory = (_load_encoded(encoded(None))
               if size <= opts['shuffle_buffer'] or size * _bytes_per_example(builder)
               <= IN_MEMORY_BYTES else None)
  # Uniform images that need no per-example crop are decoded once and preprocessed a batch at
  # a time (flips then drawn per batch: another random stream than the per-example path's).
  batch_fn = None
  if (in_memory is not None and opts['crop'] == 'resize' and not opts['randaug']
      and None not in info.image_shape
      and size * np.prod(info.image_shape) <= IN_MEMORY_BYTES):
    batch_fn = _train_batch_fn(opts, _decode_all(in_memory['image'], info.image_shape[-1]),
                               in_memory['label'], image_size, channels, seed, index, count)
  process_key = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])

  def in_memory_indices(epoch: int, start: int) -> tf.data.Dataset:
    """Every epoch from `epoch` on, each a permutation seeded by (seed, process, epoch)."""

    def order(e):
      shuffled = tf.random.experimental.stateless_shuffle(
          tf.range(size, dtype=tf.int64), seed=tf.stack([tf.constant(process_key, tf.int64), e]))
      return shuffled[tf.where(e == epoch, start, 0):]

    return tf.data.Dataset.range(epoch, np.iinfo(np.int64).max).map(order).unbatch()

  def in_memory_examples(epoch: int, start: int) -> tf.data.Dataset:
    examples = {key: tf.constant(value) for key, value in in_memory.items()}
    return in_memory_indices(epoch, start).map(
        lambda i: {key: tf.gather(value, i) for key, value in examples.items()})

  def epoch_examples(epoch: int, start: int) -> tf.data.Dataset:
    """Examples from number `start` of `epoch` on: to that epoch's end, or forever in memory."""
    if in_memory is not None:
      ds = in_memory_examples(epoch, start)
    else:
      shuffle_seed = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
      ds = encoded(shuffle_seed).shuffle(min(opts['shuffle_buffer'], size), seed=shuffle_seed)
      ds = ds.skip(start)
    ds = ds.enumerate(epoch * size + start)
    return ds.map(example_fn, num_parallel_calls=host_devices.schedulable_cores(),
                  deterministic=True)

  def preprocessed_batches() -> Iterator[dict[str, np.ndarray]]:
    """Before mixup: batch-wise from decoded memory, else example-wise across epochs."""
    epoch, start = divmod(start_step * local_batch, size)
    if batch_fn is not None:
      ds = in_memory_indices(epoch, start).batch(local_batch).enumerate(start_step)
      ds = ds.map(batch_fn, num_parallel_calls=host_devices.schedulable_cores(),
                  deterministic=True)
      yield from numpy_iterator(ds.prefetch(tf.data.AUTOTUNE))
      return
    carry = None  # Examples from the end of the previous epoch(s).
    while True:
      ds = epoch_examples(epoch, start)
      if carry is not None:
        ds = _padding(ds.element_spec, len(carry['label'])).concatenate(ds)
      for batch in numpy_iterator(ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)):
        if carry is not None:
          n = len(carry['label'])
          batch = {k: np.concatenate([carry[k], v[n:]]) for k, v in batch.items()}
          carry = None
        if len(batch['label']) < local_batch:
          carry = batch
          break
        yield batch
      epoch, start = epoch + 1, 0

  def batches() -> Iterator[dict[str, np.ndarray]]:
    for step, batch in enumerate(preprocessed_batches(), start_step):
      if opts['mixup']:  # One weight for the global batch: seeded without the process.
        batch = _mixup(batch, opts['mixup'], info.num_classes,
                       np.random.default_rng([seed, step]))
      yield batch

  return batches()


def train_iterator(config: ml_collections.ConfigDict,
                   start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """`make_train_iterator` as a training config (dataset, split, batch, resolution, pp) sets it."""
  return make_train_iterator(
      dataset=config.dataset, split=config.get('train_split', 'train'),
      data_dir=config.get('data_dir'), global_batch=config.batch, image_size=config.image_size,
      channels=config.get('channels', 3), pp=config.get('pp', ml_collections.ConfigDict()),
      seed=config.get('seed', 0), start_step=start_step)


@dataclasses.dataclass(frozen=True)
class EvalBatches:
  """Re-iterable batches of one eval pass; len() is the number of batches."""
  dataset: tf.data.Dataset
  num_batches: int

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return numpy_iterator(self.dataset)

  def __len__(self) -> int:
    return self.num_batches


def make_eval_iterator(*, dataset: str, split: str, data_dir: str | None,
                       global_batch: int, image_size: int, channels: int,
                       pp: ml_collections.ConfigDict,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       ) -> Iterable[dict[str, np.ndarray]]:
  """Every example of the split exactly once, in a fixed order.

  Yields {'image', 'label': int32, 'mask': bool [local_batch]}; the last batch
  is padded with mask False. Every process yields the same number of batches.
  """
  builder = catalog.load_builder(dataset, data_dir)
  info = _info(builder, dataset, split)
  opts = pp_options.eval_options(pp.get('eval'))
  pp_options.check_channels(channels)
  pp_options.check_normalisation(opts, channels, 'pp.eval')
  index, count, local_batch, sliced = _process_slice(
      split, global_batch, process_index, process_count)
  # split_for_jax_process splits each '+'-joined piece of `split` on its own and gives each
  # piece's remainder to the low process indices: the largest slice sets the batch count.
  sizes = [_slice_size(builder, split, i, count) for i in range(count)]
  num_batches = -(-max(sizes) // local_batch)
  size = sizes[index]
  padding = num_batches * local_batch - size
  assert padding >= 0, (sizes, index, local_batch)

  jpeg_as_pil = preprocess.decodes_jpeg_as_pil(opts)

  def example_fn(example):
    image = preprocess.decode(example['image'], info.image_shape[-1], jpeg_as_pil)
    return {'image': preprocess.eval_image(image, image_size, channels, opts),
            'label': tf.cast(example['label'], tf.int32),
            'mask': tf.constant(True)}

  # TFDS refuses to read an empty slice: such a process reads none of the whole split instead,
  # for the element shapes, and yields only padding.
  ds = builder.as_dataset(split=sliced if size else split, shuffle_files=False, decoders=_RAW)
  ds = ds.take(size).map(example_fn, num_parallel_calls=host_devices.schedulable_cores())
  ds = ds.concatenate(_padding(ds.element_spec, padding))
  return EvalBatches(ds.batch(local_batch).prefetch(tf.data.AUTOTUNE),
                     num_batches)

