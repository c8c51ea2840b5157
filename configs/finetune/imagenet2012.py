"""Fine-tune on ImageNet (ILSVRC-2012) with the paper's recipe (Table 4): 20k steps, 384 px, SGD.

  python -m vit_jax.finetune --config=configs/finetune/imagenet2012.py \
      --workdir=workdirs/ft_imagenet --config.init=ViT-B_16.npz --config.model=ViT-B_16

Learning rate: the paper sweeps {0.003, 0.01, 0.03, 0.06} and picks the best on a held-out 1%
of the train split (train[99%:], set `eval_split` to it while sweeping); 0.03 is the released
code's default. Reports on `validation` (ImageNet's test labels are not public); `tfds build
imagenet2012` needs the manually downloaded archives.
"""
import ml_collections

from vit_jax.training import finetune


def get_config() -> ml_collections.ConfigDict:
  return finetune.paper_config('imagenet2012', total_steps=20_000, base_lr=0.03,
                               train_split='train[:99%]', eval_split='validation')
