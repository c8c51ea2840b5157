"""ViT-H/14 pre-training, the ViT paper's Table 3 recipe (see vit_jax/training/recipes.py).

  python -m vit_jax.main --config=configs/vit_h14.py:imagenet21k --workdir=gs://BUCKET/WORKDIR
  python -m vit_jax.main --config=configs/vit_h14.py:imagenet2012 --workdir=gs://BUCKET/WORKDIR

The argument picks the dataset (default: imagenet2012); anything else is a ConfigError.

Expected (paper, Table 5: ImageNet top-1 after fine-tuning at 384 px):
  pre-trained on ImageNet-21k: 85.13%

ImageNet-21k: Table 3 has no H row; the L row (30 epochs) is used. The paper reports no
ImageNet-only ViT-H/14.
"""
from typing import Optional

import ml_collections

from vit_jax.training import recipes


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  return recipes.pretrain_config('ViT-H_14', arg)
