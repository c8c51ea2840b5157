"""ViT-L/16 pre-training, the ViT paper's Table 3 recipe (see vit_jax/training/recipes.py).

  python -m vit_jax.main --config=configs/vit_l16.py:imagenet21k --workdir=gs://BUCKET/WORKDIR
  python -m vit_jax.main --config=configs/vit_l16.py:imagenet2012 --workdir=gs://BUCKET/WORKDIR

The argument picks the dataset (default: imagenet2012); anything else is a ConfigError.

Expected (paper, Table 5: ImageNet top-1 after fine-tuning at 384 px):
  pre-trained on ImageNet-21k: 85.15%
  pre-trained on ImageNet:     76.53%
"""
from typing import Optional

import ml_collections

from vit_jax.training import recipes


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  return recipes.pretrain_config('ViT-L_16', arg)
