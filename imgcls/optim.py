"""The one place that turns a config into an optax optimizer and its learning-rate schedule.

Weight decay is scaled by the learning rate in both optimizers:
- adamw: decoupled (Loshchilov & Hutter), p -= lr * (adam_update + wd * p), as torch.optim.AdamW.
- sgd: L2 added to the gradient before momentum, g += wd * p, as torch.optim.SGD(weight_decay=).
  Chosen so the usual SGD recipes (lr 0.1, wd 1e-4 to 5e-4) carry over unchanged; for SGD the
  two forms differ only by the momentum filtering of the decay term (roughly wd/(1 - momentum)).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('warmup_cosine', 'warmup_linear', 'constant')
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
  """Linear warmup from 0 over lr.warmup_steps, then cosine, linear-to-0 or constant."""
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
    else:
      decay = 1.0
    return jnp.asarray(base * ramp * decay, jnp.float32)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds (clip -> optimizer with weight decay) and returns it with its lr schedule."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer.name {opt.name!r}; expected one of {OPTIMIZERS}.')
  mask_name = config.get('weight_decay_mask', 'no_bias_norm')
  if mask_name not in DECAY_MASKS:
    raise ValueError(f'Unknown weight_decay_mask {mask_name!r}; expected one of {DECAY_MASKS}.')
  mask = decay_mask if mask_name == 'no_bias_norm' else None
  wd = float(config.get('weight_decay', 0.0) or 0.0)
  schedule = make_schedule(config.lr, total_steps)

  parts = []
  clip = config.get('grad_clip_norm', None)
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if opt.name == 'sgd':
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    momentum = float(opt.get('momentum', 0.9))
    parts.append(optax.sgd(schedule, momentum=momentum or None,
                           nesterov=bool(opt.get('nesterov', True)) and momentum > 0))
  else:
    parts.append(optax.adamw(schedule, b1=float(opt.get('b1', 0.9)), b2=float(opt.get('b2', 0.999)),
                             eps=float(opt.get('eps', 1e-8)), weight_decay=wd, mask=mask))
  return optax.chain(*parts), schedule
