"""Restoring train states: checkpoints written before the state had its EMA fields."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgcls import checkpoints, step as step_lib


def _state(ema=False):
  params = {'dense': {'kernel': jnp.arange(6.0).reshape(2, 3), 'bias': jnp.ones(3)}}
  tx = optax.sgd(0.1, momentum=0.9)
  state = step_lib.TrainState(step=jnp.asarray(7), params=params,
                              batch_stats={'bn': {'mean': jnp.full(3, 0.5)}},
                              opt_state=tx.init(params), rng=jax.random.key_data(
                                  jax.random.key(3)))
  return state.replace(ema_params=params, ema_batch_stats=state.batch_stats) if ema else state


def test_checkpoint_from_before_the_ema_fields_restores(tmp_path):
  old = _state()
  # The on-disk layout of imgcls before TrainState had ema_params/ema_batch_stats.
  layout = {k: getattr(old, k) for k in ('step', 'params', 'batch_stats', 'opt_state', 'rng')}
  ckpt = checkpoints.Checkpointer(str(tmp_path), asynchronous=False)
  ckpt.save(7, layout, meta={})
  target = jax.tree.map(jnp.zeros_like, old)
  restored = ckpt.restore(7, target)
  assert isinstance(restored, step_lib.TrainState) and restored.ema_params is None
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(old), strict=True):
    np.testing.assert_array_equal(a, b)
  # A state that needs the EMA copy the old checkpoint lacks is still refused clearly.
  with pytest.raises(checkpoints.CheckpointError, match='does not fit this model'):
    ckpt.restore(7, jax.tree.map(jnp.zeros_like, _state(ema=True)))
  ckpt.close()


def test_current_checkpoint_round_trips_with_and_without_ema(tmp_path):
  for ema in (False, True):
    state = _state(ema)
    ckpt = checkpoints.Checkpointer(str(tmp_path / str(ema)), asynchronous=False)
    ckpt.save(7, state, meta={})
    restored = ckpt.restore(7, jax.tree.map(jnp.zeros_like, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
      np.testing.assert_array_equal(a, b)
    ckpt.close()
