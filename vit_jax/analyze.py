r"""The paper's analyses (Figures 6 and 7) of any checkpoint, as PNGs plus the numbers as JSON.

  python -m vit_jax.analyze --checkpoint=WORKDIR --out_dir=DIR
  python -m vit_jax.analyze --checkpoint=ViT-B_16.npz --model=ViT-B_16 --out_dir=DIR \
      --which=rollout,distance a.jpg b.png  # or --images=a.jpg,b.png

Writes DIR/<name>.png and DIR/<name>.json for each of rollout (attention rollout over the first
--num_images images), distance (mean attention distance per head, averaged over the first
--num_distance_images), posemb (position-embedding similarity) and filters (principal components
of the patch embedding; these two read no images). Images are --images files (by default all
of them serve both), or the --split of --dataset (by default a workdir's own dataset and eval
split; 8 and 32 images), preprocessed as the model's eval split was (at --image_size and with
--crop and --crop_fraction when given: see `vit_jax.infer`). --which defaults to every
analysis the architecture supports (no rollout for a MAP head, no filters for hybrids). Each
JSON also names what its numbers come from: "checkpoint", "params" (what was read, as
`infer --json` names it: a workdir's step, its Polyak average where it keeps one), the
"image_size" and the pp.eval options ("crop", "crop_fraction", "mean", "std") of the
preprocessing, and the "images" or the "dataset" and the "split" read. Each written file's path
is printed.
"""
import os

from absl import flags

from vit_jax import reader_flags
from vit_jax.analysis import from_checkpoint
from vit_jax.analysis import run
from vit_jax.errors import quiet_unless_verbose, run_cli

_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where the PNG and JSON files go.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files (instead of --dataset).')
_DATASET = flags.DEFINE_string('dataset', None, 'A prepared TFDS dataset to take images from '
                               '(default: a workdir\'s own).')
_SPLIT = flags.DEFINE_string('split', None, 'Split of --dataset (default: a workdir\'s own eval '
                             'split, else test).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: $TFDS_DATA_DIR).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', None, 'Images shown with their rollout '
                                   '(default: every file, or 8 of a dataset).')
_NUM_DISTANCE_IMAGES = flags.DEFINE_integer(
    'num_distance_images', None, 'Images the mean attention distance is averaged over (default: '
    'every file, or 32 of a dataset).')
_WHICH = flags.DEFINE_list('which', None, f'Analyses, from {",".join(run.ANALYSES)} '
                           '(default: all the model supports).')
flags.mark_flag_as_required('out_dir')


def main(argv: list[str]) -> None:
  quiet_unless_verbose()
  results = from_checkpoint.analyze_checkpoint(
      reader_flags.CHECKPOINT.value, _OUT_DIR.value, model=reader_flags.MODEL.value,
      image_size=reader_flags.IMAGE_SIZE.value, eval_pp=reader_flags.eval_pp(),
      images=_IMAGES.value + argv[1:],
      dataset=_DATASET.value, split=_SPLIT.value, data_dir=_DATA_DIR.value,
      num_images=_NUM_IMAGES.value, num_distance_images=_NUM_DISTANCE_IMAGES.value,
      which=_WHICH.value)
  for name in results:
    for ext in ('png', 'json'):
      print(os.path.join(_OUT_DIR.value, f'{name}.{ext}'))


if __name__ == '__main__':
  run_cli(main)
