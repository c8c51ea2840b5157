"""The embedded default: a ViT trained from scratch on Fashion-MNIST on a 2-core CPU.

  make train
  # = python -m vit_jax.main --config=configs/default.py --workdir=workdirs/default

Measured so far (2026-11-24, on the 2-core machine while other jobs loaded it to ~10): with
total_steps=4000, warmup 300 (otherwise these settings), test accuracy 75.8% after 1000 steps
(2.1 epochs), ~180 img/s under that load. That is short of the issue's >= 90% target; the
recipe (model size, epochs, augmentation) still needs tuning on a validation slice
(`--config.train_split='train[:54000]' --config.eval_split='train[54000:]'`) on a quiet machine.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = 'ViT-Mu_4'
  config.model_overrides = ml_collections.ConfigDict()
  config.dataset = 'fashion_mnist'
  config.data_dir = None  # TFDS_DATA_DIR or ~/tensorflow_datasets
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 28
  config.channels = 1
  config.pp = ml_collections.ConfigDict({'train': {'crop': 'random_crop', 'random_crop_pad': 2,
                                                    'flip': True}, 'eval': {'crop': 'resize'}})
  config.batch = 128
  config.batch_eval = 1000
  config.total_steps = 2000
  config.optimizer = 'adamw'
  config.base_lr = 1e-3
  config.weight_decay = 0.05
  config.warmup_steps = 200
  config.decay_type = 'cosine'
  config.grad_norm_clip = 1.0
  config.label_smoothing = 0.0
  config.accum_steps = 1
  config.dtype = 'float32'
  config.mesh = 'data:-1'
  config.eval_every = 1000
  config.progress_every = 100
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.seed = 0
  return config
