"""Fine-tune on CIFAR-100 with the paper's recipe (Table 4): 10k steps, batch 512, 384 px, SGD.

  python -m vit_jax.finetune --config=configs/finetune/cifar100.py --workdir=workdirs/ft_cifar100 \
      --config.init=ViT-B_16.npz --config.model=ViT-B_16 --config.base_lr=0.01

Learning rate: the paper sweeps {0.001, 0.003, 0.01, 0.03} and picks the best on a held-out 2%
of the train split (train[98%:], set `eval_split` to it while sweeping); 0.03 is the released
code's default. Needs `python -m vit_jax.datasets prepare cifar100` (it downloads) in
TFDS_DATA_DIR.
"""
import ml_collections

from vit_jax.training import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.finetune_config('cifar100', total_steps=10_000, base_lr=0.03,
                                 train_split='train[:98%]')
