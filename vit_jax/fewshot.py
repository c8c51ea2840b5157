r"""Few-shot linear evaluation of a checkpoint's frozen pre-logit features (the paper's probe).

  python -m vit_jax.fewshot --checkpoint=PATH [--model=ViT-B_16 [--image_size=N]] --dataset=digits \
      [--shots=1,5,10,25] [--seeds=3] [--json]

PATH is a training workdir (its newest checkpoint, architecture from its saved config) or a
released-layout `.npz` or timm's `.safetensors` (then --model names the architecture, and
--image_size the resolution where a hybrid's position embeddings leave it open: see
`vit_jax.infer`). Images are prepared as the checkpoint's evaluation saw them (its resolution and
pp.eval; timm's crop and normalisation for timm's weights; --crop and --crop_fraction over
either), so the figures match the probe run during training. Prints mean and spread of the test
accuracy over seeds per shot count.
"""
import json

from absl import flags
import jax
import numpy as np

from vit_jax import reader_flags
from vit_jax import sharding
from vit_jax.checkpoints import restore
from vit_jax.errors import check_no_arguments, quiet_unless_verbose, run_cli
from vit_jax.evaluation import fewshot

_DATASET = flags.DEFINE_string('dataset', None, 'A prepared TFDS dataset, e.g. digits.')
_TRAIN_SPLIT = flags.DEFINE_string('train_split', 'train', 'Where the k shots are drawn from.')
_TEST_SPLIT = flags.DEFINE_string('test_split', 'test', 'Where accuracy is measured.')
_SHOTS = flags.DEFINE_list('shots', [str(k) for k in fewshot.DEFAULT_SHOTS],
                           'Examples per class.')
flags.register_validator(
    'shots', lambda shots: bool(shots) and all(k.isdigit() and int(k) > 0 for k in shots),
    '--shots takes positive integers, e.g. --shots=1,5,10,25')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Independent draws of the shots.', lower_bound=1)
_L2_REG = flags.DEFINE_float('l2_reg', fewshot.DEFAULT_L2_REG, 'Ridge penalty.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Feature-extraction batch size.', lower_bound=1)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: $TFDS_DATA_DIR).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
flags.mark_flag_as_required('dataset')


def _table(results: dict[int, list[float]]) -> str:
  rows = [f'{"shots":>5}  {"accuracy":>8}  {"std":>5}  per seed']
  for k, accs in results.items():
    rows.append(f'{k:>5}  {100 * np.mean(accs):7.2f}%  {100 * np.std(accs):5.2f}  '
                + ' '.join(f'{100 * a:.1f}' for a in accs))
  return '\n'.join(rows)


def main(argv: list[str]) -> None:
  check_no_arguments(argv)
  quiet_unless_verbose()
  pretrained = restore.load_for_reading(reader_flags.CHECKPOINT.value, reader_flags.MODEL.value,
                                        reader_flags.IMAGE_SIZE.value, reader_flags.eval_pp())
  model = pretrained.create_model(num_classes=0)
  params = restore.checked_params(pretrained, model)
  mesh = sharding.make_mesh('data:-1')
  shardings = sharding.tree_shardings(params, mesh)
  evaluator = fewshot.FewShotEvaluator(
      model=model, mesh=mesh, params_shardings=shardings,
      datasets={_DATASET.value: (_TRAIN_SPLIT.value, _TEST_SPLIT.value)},
      image_size=pretrained.image_size, channels=pretrained.channels,
      shots=[int(k) for k in _SHOTS.value], seeds=_SEEDS.value, l2_reg=_L2_REG.value,
      batch=_BATCH.value, eval_pp=pretrained.eval_pp(),
      data_dir=_DATA_DIR.value)
  results = evaluator.evaluate(jax.device_put(params, shardings))[_DATASET.value]
  if _JSON.value:
    print(json.dumps({'checkpoint': pretrained.source, 'model': pretrained.model,
                      'dataset': _DATASET.value, 'seeds': _SEEDS.value, 'l2_reg': _L2_REG.value,
                      'accuracy': {str(k): float(np.mean(a)) for k, a in results.items()},
                      'per_seed': {str(k): a for k, a in results.items()}}))
  else:
    print(f'few-shot linear probe on {_DATASET.value} ({_TRAIN_SPLIT.value} -> '
          f'{_TEST_SPLIT.value}): {pretrained.model} from {pretrained.source}, '
          f'{_SEEDS.value} seeds, l2_reg {_L2_REG.value:g}')
    print(_table(results))


if __name__ == '__main__':
  run_cli(main)
