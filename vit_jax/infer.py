r"""Classifies image files with a trained ViT: the top-5 classes of each, or all scores as JSON.

  python -m vit_jax.infer --checkpoint=WORKDIR photo.jpg scan.png
  python -m vit_jax.infer --checkpoint=ViT-B_16.npz --model=ViT-B_16 --labels=names.txt IMG...
  python -m vit_jax.infer --checkpoint=WORKDIR --json IMG... > predictions.json
  python -m vit_jax.infer --checkpoint=default.npz --model=R8+ViT-Mu_8 --image_size=28 IMG...
  python -m vit_jax.infer --checkpoint=model.safetensors --model=ViT-B_16 IMG...  # timm's weights

Images of any size and mode are decoded, resized and converted as the model's eval split was, at
the resolution of a workdir's config or, for a .npz, the one its position embeddings fit (for a
hybrid the largest of several, which is logged: give --image_size when it was another), with its
config's eval crop; timm's weights with a config.json beside them are cropped as timm evaluates
them (bicubic, its crop_pct), other files only resized (--crop=resize_crop for a .npz evaluated
as big_vision evaluates, --crop=timm as timm evaluates, both keeping the central --crop_fraction,
0.875 unless a config gives it: 0.9 for timm's augreg ViTs). Labels come from --labels when given,
else from the config.json timm saved beside its weights (label_names, with label_descriptions'
text), else from the dataset named in a workdir's config (when prepared in its data_dir or
$TFDS_DATA_DIR), else they are class indices. A file that is not an image gets one line on
stderr and the others are still classified; the exit status is then 1. The formats are
`vit_jax.evaluation.classify.report`'s.
"""
from absl import flags

from vit_jax import reader_flags
from vit_jax.errors import ConfigError, quiet_unless_verbose, run_cli
from vit_jax.evaluation import classify

_LABELS = flags.DEFINE_string('labels', None, 'Text file with one class name per line.')
_JSON = flags.DEFINE_bool('json', False, 'Print every probability and logit as JSON.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')


def main(argv: list[str]) -> int:
  quiet_unless_verbose()  # stderr is for unreadable files and warnings.
  if len(argv) < 2:
    raise ConfigError('no images given: pass image files after the flags')
  class_names = classify.read_labels(_LABELS.value) if _LABELS.value else None
  checkpoint = reader_flags.CHECKPOINT.value
  classifier = classify.Classifier.from_checkpoint(
      checkpoint, reader_flags.MODEL.value, image_size=reader_flags.IMAGE_SIZE.value,
      eval_pp=reader_flags.eval_pp(), class_names=class_names, batch_size=_BATCH_SIZE.value)
  failed = classify.report(classifier, argv[1:], as_json=_JSON.value, top_k=_TOP_K.value,
                           source=checkpoint)
  return 1 if failed else 0


if __name__ == '__main__':
  run_cli(main)
