"""TFDS builder for scikit-learn's bundled 8x8 digits: a real dataset with no download.

Importing this module registers the builder (`vit_jax.data.catalog` does), which
preparing needs; once prepared, `tfds.load('digits', data_dir=DIR)` works in
any TFDS program, since TFDS reads a prepared dataset from its files alone.

Splits are fixed by position in scikit-learn's array, which is ordered by
writer: `train` = the first 1500 examples, `test` = the last 297. Pixel values
0..16 are scaled to 0..255 so the images look like any other uint8 image.
"""
import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1500


class Digits(tfds.core.GeneratorBasedBuilder):
  """UCI optical digits as shipped in `sklearn.datasets.load_digits`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target
    return {
        'train': self._generate_examples(images, labels, range(NUM_TRAIN)),
        'test': self._generate_examples(
            images, labels, range(NUM_TRAIN, len(labels))),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield i, {'image': images[i], 'label': int(labels[i])}
