"""Fine-tune on Oxford Flowers-102 with the paper's recipe (Table 4): 500 steps, 384 px, SGD.

  python -m vit_jax.finetune --config=configs/finetune/oxford_flowers102.py \
      --workdir=workdirs/ft_flowers --config.init=ViT-B_16.npz --config.model=ViT-B_16

Learning rate: the paper sweeps {0.001, 0.003, 0.01, 0.03}; select it on the `validation` split
(set `eval_split` to it while sweeping), then report on `test`. 0.03 is the released code's
default. The warmup of a 500-step run is 100.
"""
import ml_collections

from vit_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.finetune_config('oxford_flowers102', total_steps=500, base_lr=0.03)
