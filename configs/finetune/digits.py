"""Offline demo: fine-tune the embedded default's Fashion-MNIST ViT on digits (8x8 -> 28 px).

  make train   # pre-trains workdirs/default (configs/default.py)
  python -m vit_jax.finetune --config=configs/finetune/digits.py --workdir=workdirs/ft_digits

The paper's transfer and recipe (zero head, SGD momentum 0.9, cosine, clipping at 1, no weight
decay) at CPU scale: batch 128, 300 steps (~25 epochs of the 1500 training digits). The model and
input channels come from the pre-training workdir. Result: TBD.
"""
import ml_collections

from vit_jax.training import finetune


def get_config() -> ml_collections.ConfigDict:
  config = finetune.paper_config('digits', total_steps=300, base_lr=0.03, model='ViT-Mu_4',
                                 image_size=28)
  config.init = 'workdirs/default'
  config.channels = 1
  # Small shifts only: the 8x8 digits upscaled to 28 px are centred, and flips change digits.
  config.pp.train = ml_collections.ConfigDict({'crop': 'random_crop', 'random_crop_pad': 2,
                                               'flip': False})
  config.batch = 128
  config.batch_eval = 256
  config.eval_every = 100
  config.checkpoint_every = 300
  return config
