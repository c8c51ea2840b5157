"""Offline demo: fine-tune the embedded default's Fashion-MNIST ViT at twice its resolution.

  make train   # pre-trains workdirs/default (configs/default.py, 28 px); data in data/tfds
  export TFDS_DATA_DIR=$PWD/data/tfds   # make's default; outside make, ~/tensorflow_datasets
  python -m vit_jax.finetune --config=configs/finetune/fashion_mnist_56px.py \
      --workdir=workdirs/ft_fashion_mnist_56px

The paper fine-tunes at a higher resolution than it pre-trains at (Sec. 3.2): with the same patch
size the sequence grows and the learned position embeddings are 2D-interpolated to the new grid.
The model is the workdir's (its saved architecture): for the default, R8+ViT-Mu_8 (a stride-8
stem), the grid grows from 4x4 tokens at 28 px to 7x7 at 56 px (~3x the tokens). Recipe of
Table 4 at CPU scale: SGD momentum 0.9, batch 128, cosine, 200 steps (~20 minutes on 2 shared
cores with ViT-Mu_4).

Measured (Fashion-MNIST test, 10k images) with the earlier default, ViT-Mu_4 (7x7 -> 14x14
patches, 4x the tokens), pre-trained for 800 steps with configs/default.py (74.7% at 28 px):
fine-tuned at 56 px, lr 0.03, 70.7% after 100 steps and 74.4% after 200; from scratch at 56 px
with that default's AdamW recipe for the same 200 steps (then `python -m vit_jax.main
--config=configs/default.py --workdir=workdirs/scratch_56px --config.image_size=56
--config.total_steps=200 --config.warmup_steps=40`): 38.9% and 49.6%. So +24.8 points over
scratch, but at this budget no gain over the 28 px model itself (the new zero head and the
resized position embeddings first have to be re-learnt). lr not swept.
"""
import ml_collections

from vit_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  config = recipes.finetune_config('fashion_mnist', total_steps=200, base_lr=0.03, image_size=56)
  config.init = 'workdirs/default'
  config.channels = 1
  config.pp.train.update(crop='random_crop', random_crop_pad=4, flip=True)
  config.batch = 128
  config.batch_eval = 1000
  config.eval_every = 100
  config.checkpoint_every = 200
  return config
