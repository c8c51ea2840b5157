"""Fine-tune on a VTAB-1k task with the paper's recipe (Table 4): 2.5k steps at lr 0.01, 384 px.

  python -m vit_jax.finetune --config=configs/finetune/vtab.py:dtd --workdir=workdirs/vtab_dtd \
      --config.init=ViT-B_16.npz --config.model=ViT-B_16

VTAB-1k trains on 1000 examples per task (800 train + 200 validation) with one setting for all
tasks: the paper uses lr 0.01 and 2500 steps, no per-task sweep, and 384 px for every task (no
task-specific resolution). The splits below take the first 1000 examples of each task's train
split and evaluate on its test split; VTAB's official split files differ in which 1000.

The tasks here are those whose TFDS datasets carry an image class `label`. Left out: the
structured tasks (Clevr count/distance, dSprites location/orientation, sNORB azimuth/elevation,
KITTI distance, DMLab), whose labels are derived from other features.
"""
import ml_collections

from vit_jax.errors import ConfigError
from vit_jax.training import recipes

# task -> (TFDS name, train split, test split). Eurosat and Resisc45 ship one split; VTAB tests
# on its last 20%.
TASKS = {
    'caltech101': ('caltech101', 'train[:1000]', 'test'),
    'cifar100': ('cifar100', 'train[:1000]', 'test'),
    'dtd': ('dtd', 'train[:1000]', 'test'),
    'oxford_flowers102': ('oxford_flowers102', 'train[:1000]', 'test'),
    'oxford_iiit_pet': ('oxford_iiit_pet', 'train[:1000]', 'test'),
    'sun397': ('sun397', 'train[:1000]', 'test'),
    'svhn': ('svhn_cropped', 'train[:1000]', 'test'),
    'patch_camelyon': ('patch_camelyon', 'train[:1000]', 'test'),
    'eurosat': ('eurosat', 'train[:1000]', 'train[80%:]'),
    'resisc45': ('resisc45', 'train[:1000]', 'train[80%:]'),
    'retinopathy': ('diabetic_retinopathy_detection/btgraham-300', 'train[:1000]', 'test'),
}


def get_config(task: str = 'dtd') -> ml_collections.ConfigDict:
  if task not in TASKS:
    raise ConfigError(f'unknown VTAB task {task!r}: use one of {", ".join(TASKS)}')
  dataset, train_split, eval_split = TASKS[task]
  return recipes.finetune_config(dataset, total_steps=2_500, base_lr=0.01,
                                 train_split=train_split, eval_split=eval_split)
