"""The flags of the commands that read a checkpoint (infer, analyze, fewshot): what it is, and what
a `.npz` or timm's `.safetensors`, which hold no config, cannot tell them."""
from absl import flags

from vit_jax.data import pp_options

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A training workdir, a .npz, or timm\'s '
                                 '.safetensors or the hub folder holding it.')
MODEL = flags.DEFINE_string('model', None, 'Model name, e.g. ViT-B_16 (needed for a file, unless '
                            "timm's config.json beside it names it).")
IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'The resolution it was trained at '
                                  '(default: from its config or position embeddings).')
CROP = flags.DEFINE_enum('crop', None, pp_options.EVAL_CROPS,
                         'The eval crop (pp.eval.crop): resize, resize_crop as big_vision '
                         'evaluates ImageNet, or timm as timm does (bicubic; both keep the '
                         'central pp.eval.crop_fraction: a config\'s, the crop_pct of timm\'s '
                         'config.json, else 0.875). Default: its config\'s, timm for timm\'s '
                         'weights with a config.json, else resize.')
flags.mark_flag_as_required('checkpoint')
