"""Fine-tune on Oxford-IIIT Pets with the paper's recipe (Table 4): 500 steps, 384 px, SGD.

  python -m vit_jax.finetune --config=configs/finetune/oxford_iiit_pet.py \
      --workdir=workdirs/ft_pets --config.init=ViT-B_16.npz --config.model=ViT-B_16

Learning rate: the paper sweeps {0.001, 0.003, 0.01, 0.03} and picks the best on a held-out
10% of the train split (while sweeping, --config.train_split='train[:90%]'
--config.eval_split='train[90%:]'); 0.03 is the released code's default. With 500
steps the warmup is 100 (a fifth of the run, as in the released AugReg config).
"""
import ml_collections

from vit_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.finetune_config('oxford_iiit_pet', total_steps=500, base_lr=0.03)
