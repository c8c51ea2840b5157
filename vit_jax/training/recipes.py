"""The ViT paper's recipes (Dosovitskiy et al., ICLR 2021) as configs: pre-training (Table 3,
`pretrain_config`) and fine-tuning (Table 4, `finetune_config`).

Plain configs, light to import (no TensorFlow, no training loop), so that a command reports a
mistaken flag in a second or two. Every `configs/vit_*.py` file is a one-line call of
`pretrain_config` and every `configs/finetune/*.py` one of `finetune_config`, so each recipe
lives in one place. A pre-training dataset is the config file's argument
(`--config=configs/vit_b16.py:imagenet21k`); without one it is ImageNet-2012 (the dataset TFDS
can build, from the manual download).

Table 3 ("all models are trained with a batch size of 4096 and learning rate warmup of 10k
steps; for ImageNet we found it beneficial to additionally apply gradient clipping at global
norm 1; training resolution is 224"):

  dataset        epochs                  base lr  decay   weight decay  dropout
  ImageNet-21k   90 (B), 30 (L; 90 too)  1e-3     linear  0.03          0.1
  ImageNet       300                     3e-3     cosine  0.3           0.1

Adam (b1 0.9, b2 0.999) with decoupled weight decay scaled by the learning rate (as Flax's old
`optim.Adam(weight_decay=...)` that the paper used, = optax.adamw), on kernels only as in
big_vision and timm (Flax's decayed every parameter). Pre-training puts a
pre-logits layer (tanh, width = hidden size) before the head; the ImageNet-21k recipe trains
with a sigmoid cross-entropy and the head's bias initialised to -10 (the released code's
`sigmoid_xent` and `head_bias_init`), ImageNet with the softmax one.

Recipe choices the paper's table leaves open (documented here, overridable by flags):
  * Ti/16 and S/16 (not in the paper) follow the B row; ViT-H/14 on ImageNet-21k (not in
    Table 3) follows the L row (30 epochs); R50+ViT-B/16 (hybrids are only listed for JFT)
    follows the B row.
  * total_steps = ceil(epochs x train examples / 4096). ImageNet-2012 train has 1,281,167
    images. ImageNet-21k is the fall 2011 release, 14,197,122 images in 21,843 classes (the
    released checkpoints' head). TFDS has no builder for it: extract the release's per-class
    tars into ROOT/train/<wordnet id>/ and run `python -m vit_jax.datasets prepare imagenet21k
    --source=ROOT` (classes in sorted folder order). Of its one split, `train`, the first 98%
    is trained on (`train[:98%]` = 13,913,180 images, TFDS rounds to the closest index) and
    the last 2% is the minival (`train[98%:]`). A head smaller than the prepared classes is a
    one-line error before training.
  * Eval: ImageNet's `validation` split (50,000 images), resize to 256 then central crop 224.
"""
import math
from typing import Optional

import ml_collections

from vit_jax import models
from vit_jax.data import pp_options
from vit_jax.models import registry
from vit_jax.errors import ConfigError

BATCH = 4096
WARMUP_STEPS = 10_000
IMAGE_SIZE = 224

IMAGENET2012_TRAIN = 1_281_167
IMAGENET21K_IMAGES = 14_197_122
IMAGENET21K_TRAIN = round(0.98 * IMAGENET21K_IMAGES)  # train[:98%]: 13,913,180.

# Per dataset: classes, splits, train examples, and the Table 3 row.
DATASETS = {
    'imagenet21k': dict(num_classes=21_843, train_split='train[:98%]', eval_split='train[98%:]',
                        train_examples=IMAGENET21K_TRAIN, base_lr=1e-3, decay_type='linear',
                        weight_decay=0.03, dropout=0.1, grad_norm_clip=0.0,
                        loss='sigmoid_xent', head_bias_init=-10.0),
    'imagenet2012': dict(num_classes=1000, train_split='train', eval_split='validation',
                         train_examples=IMAGENET2012_TRAIN, base_lr=3e-3, decay_type='cosine',
                         weight_decay=0.3, dropout=0.1, grad_norm_clip=1.0,
                         loss='softmax_xent', head_bias_init=0.0),
}
DEFAULT_DATASET = 'imagenet2012'

# Table 3's epochs: ImageNet-21k 90 for B and smaller, 30 for L (and H); ImageNet 300 for all.
_LARGE = ('ViT-L_16', 'ViT-L_32', 'ViT-H_14')


def epochs(model: str, dataset: str) -> int:
  """Table 3's pre-training epochs."""
  if dataset == 'imagenet2012':
    return 300
  return 30 if model in _LARGE else 90


def steps_for(num_epochs: int, train_examples: int, batch: int = BATCH) -> int:
  """Optimizer steps for `num_epochs` passes over `train_examples` (rounded up)."""
  return math.ceil(num_epochs * train_examples / batch)


def parse_dataset(arg: Optional[str]) -> str:
  """The config file's argument -> a dataset of DATASETS (None or '' = the default)."""
  name = (arg or DEFAULT_DATASET).strip().lower()
  if name not in DATASETS:
    raise ConfigError(f'config argument {arg!r} is not a pre-training dataset: use '
                      f'{" or ".join(":" + d for d in DATASETS)} after the config file, as in '
                      'configs/vit_b16.py:imagenet21k')
  return name


def pretrain_config(model: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """The Table 3 recipe for `model` (a registry name) on the dataset named by `arg`."""
  dataset = parse_dataset(arg)
  row = DATASETS[dataset]
  size = model.split('ViT-')[1].split('_')[0]
  config = ml_collections.ConfigDict()
  config.model = model
  config.model_overrides = ml_collections.ConfigDict({
      'representation_size': registry.SIZES[size][0],  # Pre-logits: the hidden size.
      'dropout_rate': row['dropout'],
      'head_bias_init': row['head_bias_init'],
      **models.COMPUTE_OPTIONS,
  })
  config.dataset = dataset
  # None: TFDS_DATA_DIR or ~/tensorflow_datasets. A typed placeholder, so that
  # --config.data_dir=DIR works on the command line.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = row['train_split']
  config.eval_split = row['eval_split']
  config.num_classes = row['num_classes']  # The model is built without reading the dataset.
  config.image_size = IMAGE_SIZE
  config.channels = 3
  config.pp = pp_options.config_dict(train={'crop': 'inception', 'flip': True},
                                     eval_crop='resize_crop')
  config.batch = BATCH
  config.batch_eval = 1024
  # Table 3's epochs, as steps: no `epochs` key, which --config.epochs=N would set to no effect.
  config.total_steps = steps_for(epochs(model, dataset), row['train_examples'])
  config.optimizer = 'adam'
  config.b1 = 0.9
  config.b2 = 0.999
  config.base_lr = row['base_lr']
  config.weight_decay = row['weight_decay']
  config.warmup_steps = WARMUP_STEPS
  config.decay_type = row['decay_type']
  config.grad_norm_clip = row['grad_norm_clip']  # 0 = no clipping.
  config.label_smoothing = 0.0
  config.polyak_decay = 0.0  # > 0: evaluate (and save for readers) the params' Polyak average.
  config.loss = row['loss']
  config.accum_steps = 1
  config.dtype = 'bfloat16'
  config.optimizer_moments_dtype = 'float32'
  return _with_run_settings(config, eval_every=5000, progress_every=100, keep_checkpoints=3)


def finetune_config(dataset: str, *, total_steps: int, base_lr: float,
                    model: Optional[str] = None, image_size: int = 384,
                    train_split: str = 'train',
                    eval_split: str = 'test') -> ml_collections.ConfigDict:
  """The paper's fine-tuning recipe (Table 4) for one dataset.

  SGD with momentum 0.9, batch 512, cosine decay, gradient clipping at global norm 1, no weight
  decay, 384 px. Warmup is 500 steps, a fifth of the run for recipes under 2,500 steps (a
  500-step run warms up for 100, as the released AugReg fine-tuning config does).
  """
  config = ml_collections.ConfigDict()
  # A pre-training workdir, a released-layout .npz or timm's .safetensors.
  config.init = ''
  config.keep_pre_logits = False  # The paper drops the pre-logits layer when transferring.
  # None: the checkpoint's (a workdir's saved config, timm's config.json); a .npz holds none, so
  # it needs one named, and so does training the config from scratch with `vit_jax.main`.
  config.model = ml_collections.config_dict.placeholder(str) if model is None else model
  # None: the checkpoint's setting. Listed so that `--config.model_overrides.scan=True` works.
  config.model_overrides = ml_collections.ConfigDict({
      k: ml_collections.config_dict.placeholder(type(v))
      for k, v in models.COMPUTE_OPTIONS.items()})
  # None: no dropout (pre-training's is not inherited); the released code fine-tunes ViT-L,
  # ViT-H and R50+ViT-B with --config.model_overrides.dropout_rate=0.1.
  config.model_overrides.dropout_rate = ml_collections.config_dict.placeholder(float)
  config.dataset = dataset
  # None: TFDS_DATA_DIR or ~/tensorflow_datasets. A typed placeholder, so that
  # --config.data_dir=DIR works on the command line.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = train_split
  config.eval_split = eval_split
  config.image_size = image_size
  config.channels = 3
  config.pp = pp_options.config_dict(train={'crop': 'inception', 'flip': True},
                                     eval_crop='resize')
  config.batch = 512
  config.batch_eval = 512
  config.accum_steps = 1  # The released code uses 8 for B/16 at 384 px on a TPUv3-8.
  config.total_steps = total_steps
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.base_lr = base_lr
  config.weight_decay = 0.0
  # Recipes under 2,500 steps warm up for a fifth of the run, also when --config.total_steps
  # changes it; a longer recipe keeps 500 (shortened below that, set --config.warmup_steps too).
  config.warmup_steps = 500 if total_steps >= 2500 else config.get_ref('total_steps') // 5
  config.decay_type = 'cosine'
  config.grad_norm_clip = 1.0
  config.label_smoothing = 0.0
  # > 0: evaluate (and save for readers) the Polyak average of the params, as the paper's
  # fine-tunes of Table 2 at 512 and 518 px did (0.9999, Sec. 4.1).
  config.polyak_decay = 0.0
  config.dtype = 'float32'
  return _with_run_settings(config, eval_every=max(total_steps // 10, 1), progress_every=50,
                            keep_checkpoints=2)


def _with_run_settings(config: ml_collections.ConfigDict, *, eval_every: int,
                       progress_every: int, keep_checkpoints: int) -> ml_collections.ConfigDict:
  """The keys of a run rather than of its recipe: mesh, logging, checkpoints, profile, seed."""
  config.mesh = 'data:-1'
  config.eval_every = eval_every
  config.progress_every = progress_every
  config.checkpoint_every = 1000
  config.keep_checkpoints = keep_checkpoints
  config.profile_steps = 0  # > 0: trace that many steps into WORKDIR/profile (XProf).
  config.profile_skip_steps = 5  # Steps of the run before the trace (compile, warm-up).
  config.seed = 0
  return config
