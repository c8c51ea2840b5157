r"""Classifies image files with a trained ViT: the top-5 classes of each, or all scores as JSON.

  python -m vit_jax.infer --checkpoint=WORKDIR photo.jpg scan.png
  python -m vit_jax.infer --checkpoint=ViT-B_16.npz --model=ViT-B_16 --labels=names.txt IMG...
  python -m vit_jax.infer --checkpoint=WORKDIR --json IMG... > predictions.json

Images of any size and mode are resized and converted as the model's eval split was. Labels come
from the dataset named in a workdir's config (when prepared in its data_dir or $TFDS_DATA_DIR),
else from --labels, else they are class indices. A file that is not an image gets one line on
stderr and the others are still classified; the exit status is then 1.

--json prints one document: {"checkpoint", "labels": [name per class], "predictions": [{"image",
"top5": [{"index", "label", "probability"}], "probabilities": [...], "logits": [...]}],
"errors": [{"image", "error"}]}.
"""
import json
import sys
from typing import Optional, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging

from vit_jax.errors import ConfigError, cli_main
from vit_jax.evaluation import classify

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A pre-training workdir or a .npz file.')
_MODEL = flags.DEFINE_string('model', None, 'Model name, e.g. ViT-B_16 (needed for a .npz).')
_LABELS = flags.DEFINE_string('labels', None, 'Text file with one class name per line.')
_JSON = flags.DEFINE_bool('json', False, 'Print every probability and logit as JSON.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')
flags.mark_flag_as_required('checkpoint')


def _prediction_json(classifier: classify.Classifier, prediction: classify.Prediction,
                     top_k: int) -> dict:
  return {
      'image': prediction.path,
      f'top{top_k}': [{'index': i, 'label': classifier.label(i), 'probability': p}
                      for i, p in prediction.top_k(top_k)],
      'probabilities': prediction.probabilities.tolist(),
      'logits': prediction.logits.astype(float).tolist(),
  }


def run(checkpoint: str, paths: Sequence[str], *, model: Optional[str] = None,
        labels: Optional[str] = None, as_json: bool = False, batch_size: int = 32,
        top_k: int = 5, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
  """Classifies `paths`, writing to `out` (and one line per unreadable file to `err`).

  Returns the exit status: 0, or 1 when some file could not be classified.
  """
  if not paths:
    raise ConfigError('no images given: pass image files after the flags')
  class_names = classify.read_labels(labels) if labels else None
  classifier = classify.Classifier.from_checkpoint(checkpoint, model, class_names=class_names,
                                                   batch_size=batch_size)
  top_k = min(top_k, classifier.model.num_classes)
  predictions, errors = [], []
  for result in classifier.classify_files(paths):
    if isinstance(result, classify.ImageError):
      print(f'error: {result}', file=err, flush=True)
      errors.append({'image': result.path, 'error': str(result)})
    elif as_json:
      predictions.append(_prediction_json(classifier, result, top_k))
    else:
      lines = [f'  {p:.4f}  {classifier.label(i)}' for i, p in result.top_k(top_k)]
      print('\n'.join([result.path, *lines]), file=out, flush=True)
  if as_json:
    labels_out = [classifier.label(i) for i in range(classifier.model.num_classes)]
    json.dump({'checkpoint': checkpoint, 'labels': labels_out, 'predictions': predictions,
               'errors': errors}, out, indent=1)
    out.write('\n')
  return 1 if errors else 0


@cli_main
def main(argv: list[str]) -> int:
  if not flags.FLAGS['verbosity'].present:  # stderr is for unreadable files and warnings.
    logging.set_verbosity(logging.WARNING)
  return run(_CHECKPOINT.value, argv[1:], model=_MODEL.value, labels=_LABELS.value,
             as_json=_JSON.value, batch_size=_BATCH_SIZE.value, top_k=_TOP_K.value)


if __name__ == '__main__':
  app.run(main)
