"""The one place that turns a config into an optax optimizer and its learning-rate schedule.

Weight decay is scaled by the learning rate in both optimizers:
- adamw: decoupled (Loshchilov & Hutter), p -= lr * (adam_update + wd * p), as torch.optim.AdamW.
- sgd: L2 added to the gradient before momentum, g += wd * p, as torch.optim.SGD(weight_decay=).
  Chosen so the usual SGD recipes (lr 0.1, wd 1e-4 to 5e-4) carry over unchanged; for SGD the
  two forms differ only by the momentum filtering of the decay term (roughly wd/(1 - momentum)).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from imgcls import sharding
from imgcls.errors import ConfigError

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('warmup_cosine', 'warmup_linear', 'warmup_step', 'constant')
DECAY_MASKS = ('no_bias_norm', 'all')


def decay_mask(params: Any) -> Any:
  """True for weight matrices and conv kernels (leaves named `kernel`, ndim > 1).

  Not decayed: biases (also ViT's 2-D attention biases), norm scales and biases,
  position embeddings, class tokens and attention-pooling probes.
  """
  def is_kernel(path, p):
    return getattr(path[-1], 'key', None) == 'kernel' and jnp.ndim(p) > 1
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_schedule(lr: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over lr.warmup_steps, then cosine, linear-to-0, steps or constant.

  warmup_step multiplies by lr.decay_factor at each of lr.decay_boundaries (fractions of the
  steps after warmup), as BiT-HyperRule's 0.1x at 30%, 60% and 90%.
  """
  if lr.schedule not in SCHEDULES:
    raise ValueError(f'Unknown lr.schedule {lr.schedule!r}; expected one of {SCHEDULES}.')
  base, warmup = float(lr.base), int(lr.get('warmup_steps', 0))
  end = float(lr.get('end_factor', 0.0))
  # total_steps <= warmup is allowed (the lr then never leaves warmup): restoring a
  # checkpoint builds the optimizer only for its state structure, with any total_steps.
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step: Any) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(step / warmup, 1.0) if warmup > 0 else 1.0
    t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if lr.schedule == 'warmup_cosine':
      decay = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
    elif lr.schedule == 'warmup_linear':
      decay = 1.0 - t
    elif lr.schedule == 'warmup_step':  # x decay_factor at each boundary (BiT-HyperRule)
      crossed = sum(jnp.where(t >= b, 1.0, 0.0) for b in lr.get('decay_boundaries', ()))
      decay = float(lr.get('decay_factor', 0.1)) ** crossed
    else:
      decay = 1.0
    return jnp.asarray(base * ramp * decay, jnp.float32)

  return schedule


def param_path(path: tuple[Any, ...]) -> str:
  """A tree path as 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _compile(patterns: Any, key: str) -> list[re.Pattern]:
  try:
    return [re.compile(p) for p in patterns]
  except re.error as e:
    raise ConfigError(f'{key}: bad regex ({e}).') from e


def _pairs(rules: Any, key: str) -> list[tuple[re.Pattern, float]]:
  """((regex, multiplier), ...) from the config, checked."""
  out = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2
            and isinstance(rule[1], (int, float))):
      raise ConfigError(f"{key} entries must be ('regex', multiplier) pairs, got {rule!r}.")
    out.append((_compile([rule[0]], key)[0], float(rule[1])))
  return out


class Rules:
  """The fine-tuning rules of config.optimizer, evaluated on parameter paths.

  freeze: regexes (re.search on 'Transformer/encoderblock_0/.../kernel') of parameters that are
    not trained: they get no update and no optimizer state.
  lr_mults / wd_mults: ('regex', multiplier) pairs; the first match wins, the rest get 1.
  layer_decay: a parameter of layer id l (layer_ids) has its lr scaled by
    layer_decay ** (top - l). ViT: block i's by layer_decay ** (depth - i), the embeddings by
    layer_decay ** (depth + 1), what follows the encoder not at all (BEiT-style fine-tuning).
    ConvNeXt: the official 12 groups (convnext_layer_id), the head not at all.
  """

  def __init__(self, opt: ml_collections.ConfigDict):
    self.freeze = _compile(opt.get('freeze', ()), 'optimizer.freeze')
    self.lr = _pairs(opt.get('lr_mults', ()), 'optimizer.lr_mults')
    self.wd = _pairs(opt.get('wd_mults', ()), 'optimizer.wd_mults')
    self.layer_decay = float(opt.get('layer_decay', 0.0) or 0.0)

  def check(self, params: Any) -> None:
    """Raises ConfigError for a regex that matches no parameter (a typo must not be silent)."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    named = (('optimizer.freeze', self.freeze), ('optimizer.lr_mults', [r for r, _ in self.lr]),
             ('optimizer.wd_mults', [r for r, _ in self.wd]))
    for key, patterns in named:
      for pat in patterns:
        if not any(pat.search(p) for p in paths):
          raise ConfigError(f'{key}: {pat.pattern!r} matches no parameter. Parameter paths look '
                            f'like {paths[0]!r} and {paths[-1]!r}.')
    if self.layer_decay and layer_ids(paths) is None:
      raise ConfigError('optimizer.layer_decay needs a ViT or a ConvNeXt (parameters under '
                        'encoderblock_i or stage{s}_block{b}); set it to 0 for this model.')
    if all(self.frozen(p) for p in paths):
      raise ConfigError('optimizer.freeze matches every parameter: nothing would train.')

  def frozen(self, path: str) -> bool:
    return any(f.search(path) for f in self.freeze)

  def labels(self, params: Any) -> Any:
    return _map_paths(lambda p: 'frozen' if self.frozen(p) else 'train', params)

  def lr_mults(self, params: Any) -> Any:
    # Under optimizer.freeze only the trainable parameters are here (the frozen are masked).
    found = self.layer_decay and layer_ids(
        [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)])
    ids, top = found or ({}, 0)

    def mult(path):
      m = _first(self.lr, path)
      if path in ids:
        m *= self.layer_decay ** (top - ids[path])
      return m
    return _map_paths(mult, params)

  def wd_mults(self, params: Any) -> Any:
    return _map_paths(lambda p: _first(self.wd, p), params)

  @property
  def scales_lr(self) -> bool:
    return bool(self.lr or self.layer_decay)


def _first(rules: list[tuple[re.Pattern, float]], path: str) -> float:
  return next((mult for pat, mult in rules if pat.search(path)), 1.0)


_CONVNEXT_PATH = re.compile(r'stage(\d+)_(?:block(\d+)/|down_)')
# Names only ConvNeXt has (ResNet's blocks are stage{s}_block{b} too, with conv1, bn1, ...),
# any one of which is enough: under optimizer.freeze only the trainable ones are seen.
_CONVNEXT_ONLY = re.compile(r'stem_(conv|norm)/|stage\d+_down_|'
                            r'stage\d+_block\d+/((conv_dw|norm|fc1|grn|fc2)/|layer_scale$)')
CONVNEXT_TOP = 13  # the head's id: 12 groups of layers below it


def convnext_layer_id(path: str) -> int:
  """The layer id of a ConvNeXt parameter path (imgcls.models.convnext's names, 1-based
  stages and blocks) in the official fine-tuning grouping (facebookresearch/ConvNeXt,
  optim_factory.get_num_layer_for_convnext): the stem 0; stage 1 1; stage 2 and its
  downsample 2; stage 3's downsample 3 and its blocks 3 + (block - 1) // 3, three blocks a
  group; stage 4 and its downsample 12; the head (head_norm, head) 13."""
  if path.startswith('stem_'):
    return 0
  m = _CONVNEXT_PATH.match(path)
  if m is None:
    return CONVNEXT_TOP
  stage, block = int(m[1]), m[2]
  if stage >= 4:
    return 12
  if stage == 3 and block is not None:
    return 3 + (int(block) - 1) // 3
  return stage


def layer_ids(paths: list[str]) -> tuple[dict[str, int], int] | None:
  """({path: layer id}, the top id) for layer-wise lr decay, by the family the paths show;
  None for a model without layers to decay. Parsed from the paths alone: ConvNeXt's here,
  the ViT's by imgcls.models.vit (imported only for a ViT, so other runs never load it)."""
  if any(_CONVNEXT_ONLY.match(p) for p in paths):
    return {p: convnext_layer_id(p) for p in paths}, CONVNEXT_TOP
  if not any(re.search(r'encoderblock_\d+/', p) for p in paths):
    return None
  from imgcls.models import vit, vit_layers  # pylint: disable=g-import-not-at-top
  blocks = [i for p in paths if (i := vit_layers.block_index(p)) is not None]
  depth = max(blocks) + 1
  return {p: vit.layer_index(p, depth) for p in paths}, depth + 1


def _map_paths(fn, tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), tree)


def _scale_by_param(mults_fn) -> optax.GradientTransformation:
  """Multiplies each update by its own constant, mults_fn(params) (optax scales globally only)."""
  def update(updates, state, params=None):
    return jax.tree.map(lambda u, m: u * m, updates, mults_fn(params)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _decay_by_param(rates_fn) -> optax.GradientTransformation:
  """updates + rate * params with a rate per parameter, rates_fn(params) (0: not decayed)."""
  def update(updates, state, params):
    rates = rates_fn(params)
    return jax.tree.map(lambda u, r, p: u + r * p if r else u, updates, rates, params), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds [clip -> sgd | adamw with weight decay -> lr multipliers] and its lr schedule.

  Frozen parameters (optimizer.freeze) go through optax.multi_transform to set_to_zero: no
  update, no optimizer state, and they do not count in the clipping norm. Per-parameter
  multipliers are computed from the parameter paths when the optimizer state is created.
  """
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer.name {opt.name!r}; expected one of {OPTIMIZERS}.')
  mask_name = config.get('weight_decay_mask', 'no_bias_norm')
  if mask_name not in DECAY_MASKS:
    raise ValueError(f'Unknown weight_decay_mask {mask_name!r}; expected one of {DECAY_MASKS}.')
  wd = float(config.get('weight_decay', 0.0) or 0.0)
  schedule = make_schedule(config.lr, total_steps)
  rules = Rules(opt)

  def rates(params):
    decayed = decay_mask(params) if mask_name == 'no_bias_norm' else jax.tree.map(
        lambda _: True, params)
    return jax.tree.map(lambda d, m: wd * m if d else 0.0, decayed, rules.wd_mults(params))

  parts = []
  clip = config.get('grad_clip_norm', None)
  if clip:
    parts.append(sharding.clip_by_global_norm(float(clip)))
  if opt.name == 'sgd':  # L2 into the gradient, then momentum: torch.optim.SGD
    momentum = float(opt.get('momentum', 0.9))
    if wd:
      parts.append(_decay_by_param(rates))
    if momentum:
      parts.append(optax.trace(decay=momentum, nesterov=bool(opt.get('nesterov', True))))
  else:  # Adam, then decoupled decay scaled by the lr: torch.optim.AdamW / optax.adamw
    parts.append(optax.scale_by_adam(b1=float(opt.get('b1', 0.9)), b2=float(opt.get('b2', 0.999)),
                                     eps=float(opt.get('eps', 1e-8))))
    if wd:
      parts.append(_decay_by_param(rates))
  parts.append(optax.scale_by_learning_rate(schedule))
  if rules.scales_lr:
    parts.append(_scale_by_param(rules.lr_mults))
  tx = optax.chain(*parts)
  if rules.freeze:
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, rules.labels)
  skips = int(config.get('skip_nonfinite_steps', 0) or 0)
  if skips:  # outermost: imgcls.step.skipped_update reads its state
    tx = sharding.apply_if_finite(tx, max_consecutive_errors=skips)
  return tx, schedule
