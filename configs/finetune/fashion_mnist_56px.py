"""Offline demo: fine-tune the embedded default's Fashion-MNIST ViT at twice its resolution.

  make train   # pre-trains workdirs/default (configs/default.py, 28 px)
  python -m vit_jax.finetune --config=configs/finetune/fashion_mnist_56px.py \
      --workdir=workdirs/ft_fashion_mnist_56px

The paper fine-tunes at a higher resolution than it pre-trains at (Sec. 3.2): with the same patch
size the sequence grows (7x7 -> 14x14 patches here) and the learned position embeddings are
2D-interpolated to the new grid. Recipe of Table 4 at CPU scale: SGD momentum 0.9, batch 128,
cosine, 300 steps. Result: TBD.
"""
import ml_collections

from vit_jax.training import finetune


def get_config() -> ml_collections.ConfigDict:
  config = finetune.paper_config('fashion_mnist', total_steps=300, base_lr=0.01,
                                 model='ViT-Mu_4', image_size=56)
  config.init = 'workdirs/default'
  config.channels = 1
  config.pp.train = ml_collections.ConfigDict({'crop': 'random_crop', 'random_crop_pad': 4,
                                               'flip': True})
  config.batch = 128
  config.batch_eval = 1000
  config.eval_every = 100
  config.checkpoint_every = 300
  return config
