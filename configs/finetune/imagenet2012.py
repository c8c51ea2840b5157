"""Fine-tune on ImageNet (ILSVRC-2012) with the paper's recipe (Table 4): 20k steps, 384 px, SGD.

  python -m vit_jax.finetune --config=configs/finetune/imagenet2012.py \
      --workdir=workdirs/ft_imagenet --config.init=ViT-B_16.npz --config.model=ViT-B_16

Learning rate: the paper sweeps {0.003, 0.01, 0.03, 0.06} and picks the best on a held-out 1%
of the train split (train[99%:], set `eval_split` to it while sweeping); 0.03 is the released
code's default. Reports on `validation` (ImageNet's test labels are not public); `python -m
vit_jax.datasets prepare imagenet2012 --manual_dir=M` needs the archives downloaded by hand in M.

The argument `ViT-L_16` or `ViT-H_14` gives Table 2's fine-tunes of those models: at 512 and
518 px, evaluating the Polyak average of the params (0.9999, Sec. 4.1), e.g.
`--config=configs/finetune/imagenet2012.py:ViT-L_16`.
"""
from typing import Optional

import ml_collections

from vit_jax.errors import ConfigError
from vit_jax.training import recipes

# Table 2's fine-tuning resolutions (Sec. 4.1): 32x32 patches of 16 px, 37x37 of 14 px.
TABLE_2_IMAGE_SIZES = {'ViT-L_16': 512, 'ViT-H_14': 518}


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  if arg and arg not in TABLE_2_IMAGE_SIZES:
    raise ConfigError(f'imagenet2012.py:{arg} is not one of {list(TABLE_2_IMAGE_SIZES)} '
                      '(Table 2\'s fine-tunes): drop the argument for the Table 4 recipe')
  config = recipes.finetune_config('imagenet2012', total_steps=20_000, base_lr=0.03,
                                   train_split='train[:99%]', eval_split='validation')
  if arg:
    config.model = arg
    config.image_size = TABLE_2_IMAGE_SIZES[arg]
    config.polyak_decay = 0.9999
  return config
