"""ViT-L/32 pre-training, the ViT paper's Table 3 recipe (see vit_jax/training/recipes.py).

  python -m vit_jax.main --config=configs/vit_l32.py:imagenet21k --workdir=gs://BUCKET/WORKDIR
  python -m vit_jax.main --config=configs/vit_l32.py:imagenet2012 --workdir=gs://BUCKET/WORKDIR

The argument picks the dataset (default: imagenet2012); anything else is a ConfigError.

Expected (paper, Table 5: ImageNet top-1 after fine-tuning at 384 px):
  pre-trained on ImageNet-21k: 80.99%
  pre-trained on ImageNet:     71.16%
"""
from typing import Optional

import ml_collections

from vit_jax.training import recipes


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  return recipes.pretrain_config('ViT-L_32', arg)
