"""R50+ViT-B/16 pre-training, the ViT paper's Table 3 recipe (see vit_jax/training/recipes.py).

  python -m vit_jax.main --config=configs/r50_vit_b16.py:imagenet21k --workdir=gs://BUCKET/WORKDIR
  python -m vit_jax.main --config=configs/r50_vit_b16.py:imagenet2012 --workdir=gs://BUCKET/WORKDIR

The argument picks the dataset (default: imagenet2012); anything else is a ConfigError.

The paper lists hybrids for JFT-300M only (Tables 3 and 6); the recipe is the ViT-B row.
"""
from typing import Optional

import ml_collections

from vit_jax.training import recipes


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  return recipes.pretrain_config('R50+ViT-B_16', arg)
