"""The data-parallel step equals a single-device step on the same global batch."""

import functools

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgcls import optim, parallel, step as step_lib
from imgcls.models import resnet


def _tiny_model():
  # Two one-block stages keep compile time low; BatchNorm is what needs checking.
  return resnet.ResNet(stage_sizes=(1, 1), block=resnet.BasicBlock, num_classes=4,
                       width=8, stem='small')


def _config():
  c = ml_collections.ConfigDict()
  c.optimizer = dict(name='sgd', momentum=0.9, nesterov=True)
  c.lr = dict(base=0.1, schedule='constant', warmup_steps=0, end_factor=0.0)
  c.weight_decay = 1e-4
  c.weight_decay_mask = 'no_bias_norm'
  c.grad_clip_norm = 1.0
  return c


def _run(n_devices, batch, steps=2):
  mesh = parallel.make_mesh(jax.devices()[:n_devices])
  model = _tiny_model()
  tx, _ = optim.make_optimizer(_config(), total_steps=10)
  state = jax.jit(functools.partial(step_lib.create_train_state, model, tx,
                                    input_shape=(16, 16, 1)),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  fn = parallel.data_parallel(
      functools.partial(step_lib.train_step, model=model, tx=tx, label_smoothing=0.1),
      mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))
  metrics = None
  for _ in range(steps):
    state, metrics = fn(state, parallel.shard_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def _batch(n=16):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, n)
  return {'image': rng.normal(size=(n, 16, 16, 1)).astype(np.float32),
          'labels': np.eye(4, dtype=np.float32)[labels]}


def test_eight_devices_match_one_device():
  assert jax.device_count() >= 8, 'conftest.py must simulate 8 devices'
  batch = _batch()
  one, m1 = _run(1, batch)
  eight, m8 = _run(8, batch)
  # Same parameters and BatchNorm statistics (synced over devices) either way.
  leaves1 = jax.tree.leaves(one.params)
  leaves8 = jax.tree.leaves(eight.params)
  for a, b in zip(leaves1, leaves8):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(eight.batch_stats)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)
  assert int(m1['count']) == int(m8['count']) == 16
  assert int(one.step) == int(eight.step) == 2


def test_step_updates_parameters():
  batch = _batch()
  before, _ = _run(1, batch, steps=0)
  after, _ = _run(1, batch, steps=1)
  changed = [not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params))]
  assert sum(changed) > len(changed) // 2


def test_eval_step_counts_only_masked_in_examples():
  mesh = parallel.make_mesh(jax.devices()[:8])
  model = _tiny_model()
  tx, _ = optim.make_optimizer(_config(), total_steps=10)
  state = jax.jit(functools.partial(step_lib.create_train_state, model, tx,
                                    input_shape=(16, 16, 1)),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  batch = _batch()
  batch['mask'] = (np.arange(16) < 11).astype(np.float32)
  fn = parallel.data_parallel(functools.partial(step_lib.eval_step, model=model), mesh,
                              in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  sums = jax.device_get(fn(state, parallel.shard_batch(batch, mesh)))
  assert float(sums['count']) == 11
  assert 0 <= float(sums['top1']) <= float(sums['top5']) <= 11


def test_label_smoothing_matches_hand_computation():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[1.0, 0.0, 0.0]])
  logp = jax.nn.log_softmax(logits)[0]
  target = np.array([1 - 0.3 + 0.1, 0.1, 0.1])
  expected = -np.sum(target * logp)
  np.testing.assert_allclose(step_lib.softmax_xent(logits, labels, 0.3)[0], expected,
                             rtol=1e-6)


def test_batch_that_does_not_divide_is_a_clear_error():
  mesh = parallel.make_mesh(jax.devices()[:8])
  with pytest.raises(ValueError, match='does not divide evenly over the 8 devices'):
    parallel.check_batch_size(100, mesh)
