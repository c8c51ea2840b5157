"""What the data tests share: the training stream of a prepared dataset with few arguments."""
import ml_collections

from vit_jax.data import input_pipeline

PLAIN = {'train': {'crop': 'resize', 'flip': False}}  # No randomness: rows are comparable.


def pp_dict(d=None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(d or {})


def train_stream(data_dir, dataset='digits', batch=64, size=8, pp=None, channels=3, **kw):
  return input_pipeline.make_train_iterator(
      dataset=dataset, split='train', data_dir=data_dir, global_batch=batch,
      image_size=size, channels=channels, pp=pp_dict(pp), seed=kw.pop('seed', 0), **kw)
