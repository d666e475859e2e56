"""Pure per-device training and evaluation steps (no I/O, no globals).

Both run inside `jax.shard_map` (see parallel.py): they see one device's shard of
the batch and reduce over the named axis. Metrics come back as global sums, so
the host only divides.
"""

from __future__ import annotations

from typing import Any

import flax
from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # base key; each step and device folds in its own index


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
  """Initialises the model (eval mode: no collectives) and the optimizer."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), rng=state_rng)


def softmax_xent(logits: jax.Array, labels: jax.Array,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against (one-hot or soft) labels."""
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, label_smoothing: float = 0.0,
               axis_name: str = 'batch') -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's shard; gradients are the global-batch mean."""
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           lax.axis_index(axis_name))

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    local = jnp.mean(softmax_xent(logits, batch['labels'], label_smoothing))
    # pmean of the loss, not of the gradients: under shard_map the gradient of a
    # replicated parameter is already summed over the axis, so this gives the mean.
    return lax.pmean(local, axis_name), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, opt_updates),
                            batch_stats=updates.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  correct = jnp.argmax(logits, -1) == jnp.argmax(batch['labels'], -1)
  metrics = {
      'loss': loss,
      'top1_correct': lax.psum(jnp.sum(correct), axis_name),
      'count': lax.psum(correct.shape[0], axis_name),
      'grad_norm': grad_norm,
      'finite': jnp.isfinite(loss) & jnp.isfinite(grad_norm),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              axis_name: str = 'batch') -> dict[str, jax.Array]:
  """Sums of loss and top-1/top-5 hits over the real (mask 1) examples of the batch."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False)
  mask = batch['mask']
  label = jnp.argmax(batch['labels'], -1)
  k = min(5, logits.shape[-1])
  topk = lax.top_k(logits, k)[1]
  top1 = (topk[:, 0] == label) * mask
  top5 = jnp.any(topk == label[:, None], axis=-1) * mask
  sums = {
      'loss': jnp.sum(softmax_xent(logits, batch['labels']) * mask),
      'top1': jnp.sum(top1),
      'top5': jnp.sum(top5),
      'count': jnp.sum(mask),
  }
  return lax.psum(sums, axis_name)
