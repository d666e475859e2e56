"""Pure per-device training and evaluation steps (no I/O, no globals).

Both run inside `jax.shard_map` (see parallel.py): they see one device's shard of
the batch and reduce over the named axis. Metrics come back as global sums, so
the host only divides.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import optax

from imgcls import augment, sharding
from imgcls.value_range import value_range_math

LOSSES = ('softmax_xent', 'sigmoid_xent')

class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # base key; each step and device folds in its own index
  # Exponential moving average of params and BatchNorm statistics (config.ema_decay > 0),
  # None when off. Checkpointed with the state; evaluated beside the raw parameters.
  ema_params: Any = None
  ema_batch_stats: Any = None

  @classmethod
  def for_eval(cls, weights: dict[str, Any], step: int = 0) -> 'TrainState':
    """A state holding only weights (params, batch_stats and, if given, the EMA ones), for
    evaluation: no optimizer state, no rng."""
    return cls(step=jnp.asarray(step, jnp.int32), params=weights['params'],
               batch_stats=weights.get('batch_stats', {}), opt_state=None, rng=None,
               ema_params=weights.get('ema_params'),
               ema_batch_stats=weights.get('ema_batch_stats',
                                           {} if 'ema_params' in weights else None))

  def ema(self) -> 'TrainState':
    """This state with the EMA weights in place of the raw ones (for evaluation)."""
    if self.ema_params is None:
      raise ValueError('this state keeps no EMA (config.ema_decay is 0)')
    return self.replace(params=self.ema_params, batch_stats=self.ema_batch_stats)

  def with_ema_reset(self) -> 'TrainState':
    """The EMA restarted at the current weights (after loading pretrained ones)."""
    if self.ema_params is None:
      return self
    return self.replace(ema_params=self.params, ema_batch_stats=self.batch_stats)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, input_shape: tuple[int, ...],
                       ema: bool = False) -> TrainState:
  """Initialises the model (eval mode: no collectives), the optimizer and, if asked, the EMA."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=state_rng,
                    ema_params=params if ema else None,
                    ema_batch_stats=batch_stats if ema else None)


def softmax_xent(logits: jax.Array, labels: jax.Array,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against (one-hot or soft) labels."""
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Per-example binary cross-entropy summed over classes (multi-label; big_vision's sum)."""
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / 2
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels),
                 axis=-1)


def imbalanced_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0, *,
                    log_prior: Any = None, logit_adjust_tau: float = 0.0,
                    class_weights: Any = None) -> jax.Array:
  """softmax_xent of logits + tau * log(prior) (the logit-adjusted loss, Menon et al.), each
  example's loss times its (soft) label's class weight; evaluators/imbalance.py has the math."""
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  logits = logits.astype(jnp.float32)
  if logit_adjust_tau:
    logits = logits + logit_adjust_tau * jnp.asarray(log_prior, jnp.float32)
  loss = softmax_xent(logits, labels)
  if class_weights is not None:
    loss = loss * (labels.astype(jnp.float32) @ jnp.asarray(class_weights, jnp.float32))
  return loss


def loss_fn_for(name: str, *, log_prior: Any = None, logit_adjust_tau: float = 0.0,
                class_weights: Any = None):
  """The per-example loss called `name` (config.loss); with logit_adjust_tau (needs log_prior,
  [K]) or class_weights ([K]) softmax_xent becomes `imbalanced_xent` (config.imbalance)."""
  if name not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {name!r}')
  if name == 'softmax_xent' and (logit_adjust_tau or class_weights is not None):
    return functools.partial(imbalanced_xent, log_prior=log_prior,
                             logit_adjust_tau=logit_adjust_tau, class_weights=class_weights)
  return softmax_xent if name == 'softmax_xent' else sigmoid_xent


def probabilities(logits: jax.Array, loss: str = 'softmax_xent') -> jax.Array:
  """Class probabilities for the loss the model was trained with: softmax, or per-class
  sigmoid scores for the multi-label sigmoid_xent (computed in float32)."""
  logits = logits.astype(jnp.float32)
  return jax.nn.sigmoid(logits) if loss == 'sigmoid_xent' else jax.nn.softmax(logits, axis=-1)


def top1_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1 where the top-scored class is a true one: top-1 accuracy for one-hot labels,
  precision@1 for multi-hot labels (mixed labels count their largest component)."""
  pred = jnp.argmax(logits, -1)
  if labels.ndim == logits.ndim:
    top = jnp.take_along_axis(labels, pred[:, None], -1)[:, 0]
    return (top >= jnp.max(labels, -1)) & (top > 0)
  return pred == labels


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """The EMA decay used for the update after `step` updates: min(decay, (1+t)/(10+t))."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))


def skipped_update(opt_state: Any, max_skips: int) -> jax.Array | None:
  """Whether optax.apply_if_finite (config.skip_nonfinite_steps = max_skips, the outermost
  transformation) rejected this step's update; None when the optimizer does not skip."""
  if not max_skips:
    return None
  return jnp.logical_not(opt_state.last_finite) & (opt_state.notfinite_count <= max_skips)


def _microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B // k, ...]: microbatch i holds rows i*B/k .. (i+1)*B/k - 1."""
  if x.shape[0] % k:
    raise ValueError(f'grad_accum_steps={k} does not divide the per-device batch of '
                     f'{x.shape[0]}')
  return x.reshape(k, x.shape[0] // k, *x.shape[1:])


def device_value_range(images: jax.Array, value_range: dict[str, float] | None) -> jax.Array:
  """The input's `value_range` (data.TrainBatches / data.EvalData), applied on the device to
  a uint8 batch: the same bits as tf.data's op (each pass rounded on its own, no fused
  multiply-add). None: the images as they are (value_range stayed in tf.data)."""
  if value_range is None:
    return images
  return value_range_math(images.astype(jnp.float32), **value_range,
                          barrier=lax.optimization_barrier)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, label_smoothing: float = 0.0,
               loss: str = 'softmax_xent', mix: augment.MixConfig = augment.MixConfig(),
               ema_decay: float = 0.0, skip_nonfinite_steps: int = 0,
               grad_accum_steps: int = 1, value_range: dict[str, float] | None = None,
               axis_name: str = 'batch', specs: TrainState | None = None,
               imbalance: dict[str, Any] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's shard; gradients are the global-batch mean.

  specs: the state's PartitionSpecs under config.sharding='fsdp' (imgcls.sharding), the state
  arriving as this device's shards, each parameter all-gathered where the model reads it
  (sharding.gather_on_read: a block's inside its remat / scan); None: replicated.

  value_range: the train input's `value_range` (data.TrainBatches), applied here to the
  (uint8) batch with the same float32 arithmetic as the pp op.
  imbalance: loss_fn_for's log_prior, logit_adjust_tau and class_weights (config.imbalance).

  With grad_accum_steps = k > 1 the (mixed) per-device batch is split into k equal
  microbatches that run one after another under `lax.scan` (activation memory of one
  microbatch); their gradients are averaged and the optimizer updates once, so for a model
  without BatchNorm the update equals the whole batch's. Metrics are the whole batch's.
  BatchNorm normalises each microbatch with that microbatch's statistics and updates its
  running averages once per microbatch (k times per step), as torch does.
  """
  # Keyed by the global index of this device's first example, not by the device index: the
  # keys of a slice of the global batch do not change when the device count does.
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           lax.axis_index(axis_name) * batch['labels'].shape[0])
  p_specs, s_specs = (None, None) if specs is None else (specs.params, specs.batch_stats)
  rng, mix_rng = jax.random.split(rng)
  per_example_loss = loss_fn_for(loss, **(imbalance or {}))
  images = device_value_range(batch['image'], value_range)
  images, labels, _ = augment.mix_batch(mix_rng, images, batch['labels'], mix)

  def loss_and_grad(params, batch_stats, images, labels, rng):
    def loss_fn(params):
      logits, updates = model.apply(
          {'params': sharding.gather_on_read(params, p_specs, axis_name),
           'batch_stats': sharding.gather(batch_stats, s_specs, axis_name)}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      local = jnp.mean(per_example_loss(logits, labels, label_smoothing))
      # pmean of the loss, not of the gradients: under shard_map the gradient of a
      # replicated parameter is already summed over the axis, so this gives the mean.
      new_stats = (sharding.shard(updates['batch_stats'], s_specs, axis_name)
                   if 'batch_stats' in updates else batch_stats)
      return lax.pmean(local, axis_name), (logits, new_stats)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  if grad_accum_steps == 1:
    (loss, (logits, new_stats)), grads = loss_and_grad(
        state.params, state.batch_stats, images, labels, rng)
  else:
    k = grad_accum_steps

    def micro(carry, xs):
      grad_sum, stats = carry
      i, x, y = xs
      (l, (logits, stats)), g = loss_and_grad(state.params, stats, x, y,
                                              jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grad_sum, g), stats), (l, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, new_stats), (losses, logits) = lax.scan(
        micro, (zeros, state.batch_stats),
        (jnp.arange(k), _microbatches(images, k), _microbatches(labels, k)))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    loss = jnp.mean(losses)  # equal microbatches: the mean of means is the batch mean
    logits = logits.reshape(-1, logits.shape[-1])
  opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  skipped = skipped_update(opt_state, skip_nonfinite_steps)
  batch_stats = new_stats
  if skipped is not None:  # a skipped update leaves the BatchNorm statistics as they were
    batch_stats = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), batch_stats,
                               state.batch_stats)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, opt_updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  if ema_decay:
    # ema <- d * ema + (1 - d) * new, with d warmed up as tf.train.ExponentialMovingAverage's
    # num_updates (and timm's EMA warmup) do, so that short runs do not average in the init.
    d = ema_decay_at(state.step, ema_decay)
    new_state = new_state.replace(
        ema_params=optax.incremental_update(new_state.params, state.ema_params, 1.0 - d),
        ema_batch_stats=optax.incremental_update(new_state.batch_stats,
                                                 state.ema_batch_stats, 1.0 - d))
  grad_norm = sharding.global_norm(grads, axis_name)
  correct = top1_hits(logits, labels)
  metrics = {
      'loss': loss,
      'top1_correct': lax.psum(jnp.sum(correct), axis_name),
      'count': lax.psum(correct.shape[0], axis_name),
      'grad_norm': grad_norm,
      # The new state is usable: the step was finite, or its update was skipped.
      'finite': (jnp.isfinite(loss) & jnp.isfinite(grad_norm)) | (
          False if skipped is None else skipped),
  }
  if skipped is not None:
    metrics['skipped'] = skipped.astype(jnp.int32)
  return new_state, metrics


# Test-time augmentation at evaluation: '' none, 'flip' averages the probabilities of each
# image and its left-right mirror (what `imgcls predict --tta=flip` does).
TTA = ('', 'flip')


def eval_logits(model: nn.Module, variables: dict[str, Any], images: jax.Array,
                loss: str = 'softmax_xent', tta: str = '') -> jax.Array:
  """The model's eval-mode logits; with tta='flip', logits whose probabilities are the mean of
  the image's and its mirror's (log p for softmax, logit p for sigmoid scores, computed in
  log space so that confident scores neither saturate nor tie), so that loss, top-k and the
  reports all score the averaged prediction."""
  logits = model.apply(variables, images, train=False)
  if not tta:
    return logits
  if tta != 'flip':
    raise ValueError(f"tta must be one of {TTA}, got {tta!r}.")
  mirrored = model.apply(variables, images[:, :, ::-1], train=False)  # NHWC: flip W
  a, b = logits.astype(jnp.float32), mirrored.astype(jnp.float32)
  if loss == 'sigmoid_xent':  # log(mean p) - log(mean (1 - p)); the halves cancel
    return (jnp.logaddexp(jax.nn.log_sigmoid(a), jax.nn.log_sigmoid(b)) -
            jnp.logaddexp(jax.nn.log_sigmoid(-a), jax.nn.log_sigmoid(-b)))
  return jnp.logaddexp(jax.nn.log_softmax(a), jax.nn.log_softmax(b)) - jnp.log(2.0)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              loss: str = 'softmax_xent', axis_name: str = 'batch', tta: str = '',
              value_range: dict[str, float] | None = None, logit_offset: Any = None
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Global sums of loss and top-1/top-5 hits over the real (mask 1) examples, and this
  shard's per-example probabilities (softmax, or sigmoid scores for multi-label) for the
  reports. Multi-label top-1 is precision@1; top-5 counts a true class among the top 5.
  tta='flip' scores each image with its mirror (`eval_logits`). value_range: the eval
  input's `value_range` (data.EvalData), applied here to the uint8 batch (as in `train_step`).
  logit_offset: [K] subtracted from the logits, tau * log(prior) (post-hoc logit adjustment,
  config.imbalance.posthoc_tau); None: none."""
  logits = eval_logits(model, {'params': state.params, 'batch_stats': state.batch_stats},
                       device_value_range(batch['image'], value_range), loss, tta)
  if logit_offset is not None:
    logits = logits.astype(jnp.float32) - jnp.asarray(logit_offset, jnp.float32)
  mask = batch['mask']
  labels = batch['labels']
  k = min(5, logits.shape[-1])
  topk = lax.top_k(logits, k)[1]
  top1 = top1_hits(logits, labels) * mask
  top5 = jnp.any(jnp.take_along_axis(labels, topk, -1) > 0, axis=-1) * mask
  sums = {
      'loss': jnp.sum(loss_fn_for(loss)(logits, labels) * mask),
      'top1': jnp.sum(top1),
      'top5': jnp.sum(top5),
      'count': jnp.sum(mask),
  }
  return lax.psum(sums, axis_name), {'probs': probabilities(logits, loss), 'labels': labels, 'mask': mask}
