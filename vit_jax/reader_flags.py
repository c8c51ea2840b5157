"""The flags of the commands that read a checkpoint (infer, analyze, fewshot): what it is, and what
a `.npz` or timm's `.safetensors`, which hold no config, cannot tell them."""
from typing import Any

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
CROP_FRACTION = flags.DEFINE_float(
    'crop_fraction', None, 'The central fraction kept by --crop=resize_crop or timm '
    '(pp.eval.crop_fraction, e.g. 0.9 for timm\'s augreg ViTs read from a .npz). Default: its '
    'config\'s, the crop_pct of timm\'s config.json, else 0.875.')
flags.mark_flag_as_required('checkpoint')


def eval_pp() -> dict[str, Any]:
  """The pp.eval options the flags set over the checkpoint's own (None: left out)."""
  return {'crop': CROP.value, 'crop_fraction': CROP_FRACTION.value}
