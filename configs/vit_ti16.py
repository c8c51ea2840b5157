"""ViT-Ti/16 pre-training, the ViT paper's Table 3 recipe (see vit_jax/training/recipes.py).

  python -m vit_jax.main --config=configs/vit_ti16.py:imagenet21k --workdir=gs://BUCKET/WORKDIR
  python -m vit_jax.main --config=configs/vit_ti16.py:imagenet2012 --workdir=gs://BUCKET/WORKDIR

The argument picks the dataset (default: imagenet2012); anything else is a ConfigError.

Not in the paper (Ti and S come from DeiT / "How to train your ViT"); the recipe is Table 3's B
row.
"""
from typing import Optional

import ml_collections

from vit_jax.training import recipes


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  return recipes.pretrain_config('ViT-Ti_16', arg)
