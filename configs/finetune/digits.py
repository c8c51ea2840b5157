"""Offline demo: fine-tune the embedded default's Fashion-MNIST ViT on digits (8x8 -> 28 px).

  make train   # pre-trains workdirs/default (configs/default.py); data in data/tfds
  export TFDS_DATA_DIR=$PWD/data/tfds   # make's default; outside make, ~/tensorflow_datasets
  python -m vit_jax.datasets prepare digits
  python -m vit_jax.finetune --config=configs/finetune/digits.py --workdir=workdirs/ft_digits

The paper's transfer and recipe (zero head, SGD momentum 0.9, cosine, clipping at 1, no weight
decay) at CPU scale: batch 128, 300 steps (~25 epochs of the 1500 training digits). The model and
input channels come from the pre-training workdir: its saved architecture (now R8+ViT-Mu_8, a
4x4 token grid at 28 px).

Measured with the earlier default, ViT-Mu_4, pre-trained for 800 steps with configs/default.py
(74.7% on Fashion-MNIST); 2-core CPU; digits test split, 297 images, so +-1.7 points is one
standard error. Against the same recipe from scratch (the model named, as the config leaves it
to the checkpoint; the model overrides left None, the checkpoint's when fine-tuning, are the
model's defaults there):

  python -m vit_jax.main --config=configs/finetune/digits.py --config.model=ViT-Mu_4 \
      --workdir=workdirs/digits_scratch

  budget                         lr     fine-tuned  from scratch
  300 steps (this config)        0.03   83.2%       73.1%
                                 0.1    91.2%       90.6%   (scratch with AdamW 3e-3: 87.9%)
                                 0.3    91.6%       90.6%
  60 steps                       0.1    68.0%       52.2%
  100 steps on train[:200]       0.1    76.1%       58.9%

At the full budget the gain is within noise: digits are easy to learn from scratch in 25 epochs.
It is large with a short budget or little data, where transfer is meant to help.
"""
import ml_collections

from vit_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  config = recipes.finetune_config('digits', total_steps=300, base_lr=0.1, image_size=28)
  config.init = 'workdirs/default'
  config.channels = 1
  # Small shifts only: the 8x8 digits upscaled to 28 px are centred, and flips change digits.
  config.pp.train.update(crop='random_crop', random_crop_pad=2, flip=False)
  config.batch = 128
  config.batch_eval = 256
  config.eval_every = 100
  config.checkpoint_every = 300
  return config
