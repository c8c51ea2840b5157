"""Few-shot linear evaluation of frozen features, as in the ViT paper's scaling studies.

"Few-shot accuracies are obtained by solving a regularized least-squares regression problem that
maps the (frozen) representation of a subset of training images to {-1, 1}^K target vectors"
(Dosovitskiy et al., Sec. 4.1). It needs no training loop, so it can run every few hundred steps
of pre-training and show how the representation improves long before fine-tuning would.

`fewshot_accuracies` is the closed-form part (scikit-learn's ridge, on the host);
`FewShotEvaluator` extracts the pre-logit features (the model with `num_classes=0`) of a
dataset's train and test splits on the device mesh and runs it for every dataset, shot count and
seed.
"""
import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from sklearn import linear_model
from sklearn import pipeline
from sklearn import preprocessing

from vit_jax import sharding
from vit_jax.data import global_batch
from vit_jax.data import input_pipeline
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError, TrainingDiverged
from vit_jax.training.experiment import Experiment

DEFAULT_SHOTS = (1, 5, 10, 25)
# Ridge penalty on standardised features. Measured on digits with a ViT-Mu_4 pre-trained on
# Fashion-MNIST (64-d features, 5 seeds), 10-shot accuracy: 0.58 at 0.01, 0.69 at 1, 0.69 at 32,
# 0.52 at 1024 (big_vision's default, 2**10, over-regularises features this small).
DEFAULT_L2_REG = 1.0


def sample_shots(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of `shots` examples of every class, drawn without replacement."""
  picked = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if len(members) < shots:
      raise ConfigError(f'class {label} has only {len(members)} training examples, fewer than '
                        f'{shots} shots: use fewer shots or a larger train split')
    picked.append(rng.choice(members, shots, replace=False))
  return np.concatenate(picked)


def linear_probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                          y_test: np.ndarray, l2_reg: float) -> float:
  """Ridge regression of standardised features onto {-1, 1}^K targets (scikit-learn's
  RidgeClassifier: an unpenalised intercept, the dual form when examples are fewer than
  dimensions); test top-1 accuracy. float64: a few shots make a badly conditioned system."""
  probe = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                 linear_model.RidgeClassifier(alpha=l2_reg))
  probe.fit(np.asarray(x_train, np.float64), y_train)
  return float(probe.score(np.asarray(x_test, np.float64), y_test))


def fewshot_accuracies(features_train: np.ndarray, labels_train: np.ndarray,
                       features_test: np.ndarray, labels_test: np.ndarray, *,
                       shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 3,
                       l2_reg: float = DEFAULT_L2_REG) -> dict[int, list[float]]:
  """{shots: [test accuracy per seed]}: each seed samples its own k examples per class."""
  results = {}
  for k in shots:
    results[k] = []
    for seed in range(seeds):
      idx = sample_shots(labels_train, k, np.random.default_rng([seed, k]))
      results[k].append(linear_probe_accuracy(features_train[idx], labels_train[idx],
                                              features_test, labels_test, l2_reg))
  return results


@dataclasses.dataclass
class FewShotEvaluator:
  """Features on the mesh -> few-shot accuracies, for every configured dataset.

  `datasets` maps a TFDS name to its (train split, test split); the train split only needs enough
  examples per class for the largest shot count.
  """
  model: Any  # Any VisionTransformer; its head is ignored.
  mesh: jax.sharding.Mesh
  params_shardings: Any
  datasets: Mapping[str, tuple[str, str]]
  image_size: int
  channels: int
  shots: Sequence[int] = DEFAULT_SHOTS
  seeds: int = 3
  l2_reg: float = DEFAULT_L2_REG
  batch: int = 256
  eval_pp: Mapping[str, Any] = dataclasses.field(  # The input pipeline's pp.eval options.
      default_factory=lambda: dict(pp_options.EVAL_DEFAULTS))
  data_dir: Optional[str] = None
  context: Callable[[], Any] = contextlib.nullcontext  # e.g. Experiment.rules_context.

  def __post_init__(self):
    # Checked before any feature is computed; named as both the CLI and a config spell them.
    devices = sharding.data_parallel_size(self.mesh)
    if self.batch % devices:
      raise ConfigError(f'few-shot batch {self.batch} is not divisible by the {devices} '
                        f'data-parallel devices: use a multiple of {devices} (--batch; '
                        'config.fewshot.batch)')
    if not self.shots or min(self.shots) <= 0:
      raise ConfigError(f'few-shot shots {list(self.shots)} must be positive counts, at least one '
                        '(--shots=1,5,10,25; config.fewshot.shots)')
    if self.seeds < 1:
      raise ConfigError(f'few-shot seeds={self.seeds} must be positive: the draws of the shots '
                        '(--seeds; config.fewshot.seeds)')
    if self.l2_reg < 0:
      raise ConfigError(f'few-shot l2_reg={self.l2_reg} must be >= 0: the ridge penalty '
                        '(--l2_reg; config.fewshot.l2_reg)')
    check_datasets(self.datasets, self.shots, self.data_dir)
    featurizer = self.model.clone(num_classes=0)

    def features(params, batch):
      params = {k: v for k, v in params.items() if k != 'head'}
      feats = featurizer.apply({'params': params}, batch['image'], train=False)
      return feats, batch['label'], batch['mask']

    # Replicated outputs: every process gets the features of the whole global batch.
    self._features = jax.jit(features, in_shardings=(self.params_shardings,
                                                     sharding.batch_sharding(self.mesh)),
                             out_shardings=sharding.replicated(self.mesh))

  def features(self, params: Any, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of every example of the split, in a fixed order."""
    data = input_pipeline.make_eval_iterator(
        dataset=dataset, split=split, data_dir=self.data_dir, global_batch=self.batch,
        image_size=self.image_size, channels=self.channels,
        pp=ml_collections.ConfigDict({'eval': dict(self.eval_pp)}))
    feats, labels = [], []
    with self.context():
      for batch in global_batch.prefetch_to_mesh(data, self.mesh):
        batch_feats, batch_labels, mask = jax.device_get(self._features(params, batch))
        feats.append(batch_feats[mask])
        labels.append(batch_labels[mask])
    feats = np.concatenate(feats)
    if not np.isfinite(feats).all():  # scikit-learn's traceback otherwise.
      raise TrainingDiverged(f'the features of {dataset}[{split}] are not finite: the params '
                             'have diverged (lower base_lr, lengthen warmup_steps or set '
                             'grad_norm_clip)')
    return feats, np.concatenate(labels)

  def evaluate(self, params: Any) -> dict[str, dict[int, list[float]]]:
    """{dataset: {shots: [accuracy per seed]}}."""
    results = {}
    for dataset, (train_split, test_split) in self.datasets.items():
      train = self.features(params, dataset, train_split)
      test = self.features(params, dataset, test_split)
      results[dataset] = fewshot_accuracies(*train, *test, shots=self.shots, seeds=self.seeds,
                                            l2_reg=self.l2_reg)
    return results

  def scalars(self, params: Any) -> dict[str, float]:
    """`fewshot/<dataset>_<k>shot` (mean over seeds): what the training loop writes."""
    return {f'fewshot/{dataset}_{k}shot': float(np.mean(accs))
            for dataset, by_shot in self.evaluate(params).items()
            for k, accs in by_shot.items()}


def check_datasets(datasets: Mapping[str, tuple[str, str]], shots: Sequence[int],
                   data_dir: Optional[str]) -> None:
  """A missing dataset or split, or too few training examples for the shots, found before the
  first probe (hours into a training run) or a fine-tune's pre-trained checkpoint is read."""
  for dataset, (train_split, test_split) in datasets.items():
    info = input_pipeline.get_info(dataset, train_split, data_dir)
    input_pipeline.get_info(dataset, test_split, data_dir)
    needed = max(shots) * info.num_classes
    if info.num_examples < needed:
      raise ConfigError(f'few-shot {max(shots)} shots of {info.num_classes} classes need '
                        f'{needed} training examples; {dataset}[{train_split}] holds '
                        f'{info.num_examples}: use fewer shots (--shots; config.fewshot.shots) '
                        'or a larger train split')


def check_config(config: ml_collections.ConfigDict) -> None:
  """`check_datasets` for config.fewshot, if any."""
  if config.get('fewshot'):
    check_datasets(datasets_from_config(config.fewshot.datasets),
                   tuple(config.fewshot.get('shots', DEFAULT_SHOTS)), config.get('data_dir'))


def datasets_from_config(datasets: Any) -> dict[str, tuple[str, str]]:
  """config.fewshot.datasets: names (train/test splits) or a mapping name -> (train, test)."""
  if isinstance(datasets, str):
    datasets = (datasets,)
  if hasattr(datasets, 'items'):
    pairs = {name: tuple(splits) for name, splits in datasets.items()
             if isinstance(splits, (tuple, list)) and len(splits) == 2
             and all(isinstance(split, str) for split in splits)}
    well_formed = bool(pairs) and len(pairs) == len(datasets)
  else:
    well_formed = (isinstance(datasets, Iterable) and bool(datasets)
                   and all(isinstance(name, str) for name in datasets))
    pairs = {name: ('train', 'test') for name in datasets} if well_formed else {}
  if not well_formed:
    raise ConfigError(f'fewshot.datasets={datasets!r}: give dataset names, or a mapping name -> '
                      "(train_split, test_split) like {'digits': ('train', 'test')}")
  return pairs


def from_experiment(exp: Experiment) -> FewShotEvaluator:
  """The evaluator of `config.fewshot` for a training run (same mesh, params shardings)."""
  config, fewshot = exp.config, exp.config.fewshot
  return FewShotEvaluator(
      model=exp.model, mesh=exp.mesh, params_shardings=exp.state_shardings.params,
      datasets=datasets_from_config(fewshot.datasets), image_size=config.image_size,
      channels=config.get('channels', 3), shots=tuple(fewshot.get('shots', DEFAULT_SHOTS)),
      seeds=fewshot.get('seeds', 3), l2_reg=fewshot.get('l2_reg', DEFAULT_L2_REG),
      batch=fewshot.get('batch', config.get('batch_eval', config.batch)),
      eval_pp=pp_options.from_config(config, 'eval'),
      data_dir=config.get('data_dir'), context=exp.rules_context)
