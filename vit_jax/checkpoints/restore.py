"""Pre-trained params plus the architecture they belong to, from a workdir or a `.npz` file.

Fine-tuning, export and few-shot evaluation all start from "a checkpoint": either a training
workdir (its newest Orbax checkpoint; the architecture is read from the config saved with it) or
a `.npz` in the released layout, or timm's `.safetensors` (or a hub folder holding one) read
into it (timm_layout.py); a file holds no config: the caller names the model (timm's config.json
can), and the options its keys show are read from them.
Only the params are read from Orbax (their Polyak average, if the run kept one): the optimizer
state is neither needed nor restorable into another recipe's optimizer.
"""
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from vit_jax import models
from vit_jax.checkpoints import is_npz
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import timm_layout
from vit_jax.checkpoints.manager import Checkpointer, no_checkpoint_error
from vit_jax.checkpoints.orbax_console import abandoned_reads_dropped, error_summary
from vit_jax.data import pp_options
from vit_jax.errors import ConfigError

Params = dict[str, Any]


@dataclasses.dataclass
class Pretrained:
  """Host (numpy) params in the checkpoint's own layout, and how to build their model."""
  params: Params
  model: str
  model_overrides: dict[str, Any]
  source: str  # For messages: 'workdir W (step N...)' or the file's path.
  config: Optional[dict[str, Any]] = None  # The pre-training config (workdirs only).
  class_names: Optional[tuple[str, ...]] = None  # Those the file names (timm's config.json).
  file_eval_pp: Optional[dict[str, Any]] = None  # pp.eval of timm's config.json (its crop_pct).
  requested_image_size: Optional[int] = None  # A reader's --image_size, over the config's.
  requested_eval_pp: Mapping[str, Any] = dataclasses.field(
      default_factory=dict)  # A reader's --crop / --crop_fraction, over the config's.

  @property
  def num_classes(self) -> int:
    """The pre-training class count (0 for a checkpoint without a head)."""
    head = self.params.get('head', {}).get('kernel')
    return 0 if head is None else int(head.shape[-1])

  @property
  def channels(self) -> int:
    """Input channels of the first layer: the hybrid stem's root conv, else the embedding."""
    first = self.params.get('conv_root') or self.params.get('embedding')
    return int(first['kernel'].shape[2]) if first else 3

  def eval_pp(self) -> dict[str, Any]:
    """The pp.eval options of its training config, else of timm's config.json (the defaults for a
    bare file: 'resize'), those the reader asked for over them."""
    config = self.config or {'pp': {'eval': self.file_eval_pp}}
    return pp_options.from_config(config, 'eval') | dict(self.requested_eval_pp)

  @functools.cached_property
  def image_size(self) -> int:
    """The resolution to run it at: `requested_image_size` if it fits the position embeddings,
    else its config's, else the largest that gives their grid (logged when ambiguous)."""
    sizes = self.posemb_image_sizes()
    if self.requested_image_size:
      if sizes and self.requested_image_size not in sizes:
        fits = f'from {sizes[0]} to {sizes[-1]}' if len(sizes) > 1 else f'of {sizes[0]}'
        raise ConfigError(f'image size {self.requested_image_size} does not give the token grid '
                          f'of the position embeddings of {self.source}: pass an --image_size '
                          f'{fits}')
      return self.requested_image_size
    if self.config and self.config.get('image_size'):
      return int(self.config['image_size'])
    if not sizes:
      raise ConfigError(f'{self.source} has no learned position embeddings to infer its image '
                        'size from: pass --image_size, or use its training workdir')
    if len(sizes) > 1:
      logging.warning('%s: %d-%d px images give its position embeddings\' token grid (a hybrid\'s '
                      'stem rounds up); guessing %d, the largest: pass --image_size if it was '
                      'trained at another', self.source, sizes[0], sizes[-1], sizes[-1])
    return sizes[-1]

  def posemb_image_sizes(self) -> range:
    """The image sizes whose token grid fits the learned position embeddings (none without them):
    one for a plain ViT, a stem's stride of them for a hybrid."""
    posemb = self.params.get('Transformer', {}).get('posembed_input', {}).get('pos_embedding')
    if posemb is None:
      return range(0)
    model = self.create_model(1)
    patch_h, patch_w = models.patch_on_image(model)
    tokens = posemb.shape[1] - int('cls' in self.params) if posemb.ndim == 3 else 0
    largest = int(np.sqrt(tokens * patch_h * patch_w))  # Square images, maybe oblong patches.
    try:  # The patches of an image of the largest size must tile it with that many tokens.
      grid_tokens = int(np.prod(models.token_grid(model, largest, largest))) if tokens else 0
    except ConfigError:
      grid_tokens = 0
    if posemb.shape[0] != 1 or not tokens or grid_tokens != tokens:
      raise ConfigError(f'the position embeddings of {self.source}, of shape {posemb.shape}, '
                        f'are not (1, tokens, width) for a square grid of {self.model}\'s '
                        f'{patch_h}x{patch_w} px patches: the file is damaged, or the model '
                        'name is not its architecture')
    stem_stride = patch_h // model.patch_size[0]
    return range(largest - stem_stride + 1, largest + 1)

  def posemb_grid(self) -> Optional[tuple[int, int]]:
    """The token grid (h, w) of the learned position embeddings (None without them): oblong
    for an oblong patch, which their token count alone does not tell."""
    sizes = self.posemb_image_sizes()
    return models.token_grid(self.create_model(1), sizes[-1], sizes[-1]) if sizes else None

  def create_model(self, num_classes: int, **overrides: Any) -> Any:
    """The flax module of this architecture (overrides such as dtype or scan on top)."""
    return models.create(self.model, num_classes=num_classes,
                         **(self.model_overrides | overrides))


def _check_exists(path: str) -> None:
  if not path:
    raise ConfigError('no checkpoint given: pass a pre-training workdir, a .npz or timm\'s '
                      '.safetensors')
  if '://' not in path and not os.path.exists(path):
    raise ConfigError(f'checkpoint {path} does not exist: pass a pre-training workdir, a .npz or '
                      "timm's .safetensors")


READER_EVAL_OPTIONS = ('crop', 'crop_fraction')


def load_for_reading(path: str, model: Optional[str] = None, image_size: Optional[int] = None,
                     eval_pp: Optional[Mapping[str, Any]] = None) -> Pretrained:
  """`load` for the commands that only read params (infer, analyze, few-shot): their --model
  names a file's architecture; naming another one for a workdir is a mistake, not ignored.
  Their --image_size and `eval_pp` (--crop, --crop_fraction) override the resolution a config
  gives or position embeddings suggest, and the config's pp.eval options."""
  eval_pp = {key: value for key, value in (eval_pp or {}).items() if value is not None}
  if set(eval_pp) - set(READER_EVAL_OPTIONS):
    raise ValueError(f'eval_pp={eval_pp}: a reader sets only {READER_EVAL_OPTIONS}')
  pretrained = load(path, model)
  if image_size is not None and image_size <= 0:
    raise ConfigError(f'--image_size={image_size} must be positive (or left out)')
  crop, fraction = eval_pp.get('crop'), eval_pp.get('crop_fraction')
  if crop is not None and crop not in pp_options.EVAL_CROPS:
    raise ConfigError(f'--crop={crop} is not one of {", ".join(pp_options.EVAL_CROPS)}')
  if fraction is not None and not 0 < fraction <= 1:
    raise ConfigError(f'--crop_fraction={fraction} is not in (0, 1]: pass the central fraction '
                      "to keep, e.g. 0.9 (timm's crop_pct)")
  pretrained = dataclasses.replace(pretrained, requested_image_size=image_size,
                                   requested_eval_pp=eval_pp)
  if fraction is not None and pretrained.eval_pp()['crop'] == 'resize':
    raise ConfigError(f'--crop_fraction={fraction} keeps a central part only under '
                      f"--crop=resize_crop or timm, and {pretrained.source} is evaluated with "
                      "'resize': add --crop=timm (or resize_crop)")
  return pretrained


def load(path: str, model: Optional[str] = None,
         model_overrides: Optional[dict[str, Any]] = None) -> Pretrained:
  """Reads a workdir's newest checkpoint, a `.npz` or timm's `.safetensors` (for a file, `model` is
  required, unless timm's config.json beside it names one of timm's plain ViTs; a workdir names
  its own, and naming another is a mistake, not ignored)."""
  _check_exists(path)
  path = timm_layout.weights_of_folder(path)
  # A workdir is a folder; a file is a .npz, or timm's .safetensors.
  hub = None
  if timm_layout.is_safetensors(path):
    model, params, overrides, hub = timm_layout.load(path, model, model_overrides or {})
  elif is_npz(path) or os.path.isfile(path):
    _check_not_inside_a_workdir(path)
    if not model:
      raise ConfigError(f'{path} holds no architecture: name the model it was trained as '
                        "(--model; fine-tuning's --config.model), e.g. ViT-B_16")
    params, overrides = npz.load_npz(path), {}
  else:
    pretrained = _load_workdir(path)
    if model and model != pretrained.model:
      raise ConfigError(f'{pretrained.source} holds a {pretrained.model}, not {model}: drop the '
                        "model name (--model; fine-tuning's --config.model): a workdir names its "
                        'own architecture')
    return pretrained
  overrides |= npz.visible_architecture(params) | dict(model_overrides or {})
  return Pretrained(params, model, overrides, path, class_names=hub and hub.class_names,
                    file_eval_pp=hub and hub.eval_pp())


def _open(workdir: str) -> tuple[Checkpointer, list[int]]:
  """A read-only checkpointer of `workdir` and its steps (a ConfigError when there are none)."""
  checkpointer = Checkpointer(workdir, read_only=True)
  steps = checkpointer.all_steps()
  if not steps:
    checkpointer.close()
    _check_not_inside_a_workdir(workdir)
    raise no_checkpoint_error(workdir)
  return checkpointer, steps


def _check_not_inside_a_workdir(path: str) -> None:
  """WORKDIR/checkpoints, one of its step folders or one of its files (config.json) named
  instead of WORKDIR: say so, rather than "no checkpoint in" a folder full of them, or that a
  file holds no architecture."""
  path = path.rstrip('/')
  parent, name = os.path.split(path)
  if name == 'checkpoints':
    workdir, what = parent, 'the checkpoints folder'
  elif os.path.basename(parent) == 'checkpoints' and name.isdigit():
    workdir, what = os.path.dirname(parent), f'the checkpoint of step {name}'
  elif os.path.isfile(path) and not is_npz(path):
    workdir, what = parent, f'the file {name}'
  else:
    return
  if workdir and '://' not in path and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ConfigError(f'{path} is {what} of the workdir {workdir}: pass the workdir itself '
                      '(its newest checkpoint is read)')


def _saved_config(workdir: str, checkpointer: Checkpointer) -> dict[str, Any]:
  """The config stored with the newest checkpoint, else the workdir's config.json."""
  step = checkpointer.all_steps()[-1]
  path, unreadable = os.path.join(workdir, 'config.json'), None
  try:
    config = checkpointer.restore_meta(step).get('config')
  except (ValueError, KeyError, OSError, TypeError) as e:
    config, unreadable = None, e
  if config:
    return config
  if not tf.io.gfile.exists(path):
    if unreadable is not None:
      raise ConfigError(f'the checkpoint at step {step} in {workdir} has an unreadable meta '
                        f'({error_summary(unreadable)}) and the run no config.json: move that '
                        'step directory out of checkpoints/ to read an older one') from unreadable
    raise ConfigError(f'{workdir} has a checkpoint but no saved config: it was not written by '
                      'vit_jax.main, so save its params as a .npz in the released layout and '
                      'pass that with the model name')
  if unreadable is not None:
    # The run's config.json says the same (the architecture cannot change on resuming), and a
    # resumed run sets the unreadable step aside itself.
    logging.warning('the checkpoint at step %d in %s has an unreadable meta (%s): reading the '
                    "run's config from its config.json", step, workdir, error_summary(unreadable))
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}): write the run\'s config back into '
                      'it') from e


def saved_config(workdir: str) -> dict[str, Any]:
  """The pre-training config of a workdir (model, overrides, image size), without its params."""
  _check_exists(workdir)
  checkpointer, _ = _open(workdir)
  with checkpointer:
    return _saved_config(workdir, checkpointer)


def _is_array_metadata(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def restore_params(checkpointer: Checkpointer, step: int) -> tuple[Params, bool]:
  """The params of checkpoint `step` as host numpy arrays (bit-exact), and whether they are its
  Polyak average (`state.averaged_params`, which a run with averaging evaluated) rather than
  `state.params`."""
  saved = checkpointer.state_metadata(step)
  name = 'averaged_params' if 'averaged_params' in saved else 'params'
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved[name],
                              is_leaf=_is_array_metadata)
  with abandoned_reads_dropped(), ocp.PyTreeCheckpointer() as reader:
    params = reader.restore(checkpointer.state_path(step), args=ocp.args.PyTreeRestore(
        {name: saved[name]}, restore_args={name: restore_args}, partial_restore=True))[name]
  damaged = npz.non_finite_keys(params)
  if damaged:  # Read as unreadable: the loop never saves them.
    raise ValueError(f'NaN or infinite values in {len(damaged)} of its arrays (e.g. {name}/'
                     f'{damaged[0]}), which training never saves: it is damaged')
  return params, name == 'averaged_params'


def _load_workdir(workdir: str) -> Pretrained:
  """The newest readable checkpoint's params, and the model name and overrides from the saved
  config. An unreadable newest step (a write cut short) falls back to an older one, as resuming
  does, with a warning: readers leave the step where it is."""
  checkpointer, steps = _open(workdir)
  with checkpointer:
    config = _saved_config(workdir, checkpointer)
    newest_error = None
    for step in reversed(steps):
      try:
        params, averaged = restore_params(checkpointer, step)
        break
      except (ValueError, KeyError, OSError, TypeError) as e:
        newest_error = newest_error or e
        logging.warning('the checkpoint at step %d in %s is unreadable (%s): trying an older one',
                        step, workdir, error_summary(e))
    else:
      raise ConfigError(f'no checkpoint in {workdir} is readable (the newest, step {steps[-1]}: '
                        f'{error_summary(newest_error)}): copy the workdir back from a backup, or '
                        'train again') from newest_error
  source = f'workdir {workdir} (step {step}{", Polyak-averaged params" if averaged else ""})'
  logging.info('loaded the params of %s, a %s', source, config['model'])
  return Pretrained(params, config['model'], models.given_overrides(config.get('model_overrides')),
                    source, config)


def checked_params(pretrained: Pretrained, model: Any) -> Params:
  """`pretrained.params` checked against `model` (at its image size), in the model's layout.

  A model with `num_classes == 0` takes the params without the head (a feature extractor).
  """
  params = pretrained.params
  if not model.num_classes:
    params = {k: v for k, v in params.items() if k != 'head'}
  size = pretrained.image_size
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, pretrained.channels), jnp.float32))
  return npz.match_params(params, shapes, what=pretrained.source)

