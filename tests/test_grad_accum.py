"""Gradient accumulation: k microbatches give the whole batch's update (no BatchNorm)."""

import jax
import ml_collections
import numpy as np
import pytest

from imgcls import config as config_lib, optim, parallel, step as step_lib
from imgcls.errors import ConfigError
from imgcls.models import resnet, vit

from helpers import train_step_fn


def _config():
  c = ml_collections.ConfigDict()
  c.optimizer = dict(name='sgd', momentum=0.9, nesterov=True)
  c.lr = dict(base=0.5, schedule='constant', warmup_steps=0, end_factor=0.0)
  c.weight_decay = 1e-4
  c.weight_decay_mask = 'no_bias_norm'
  c.grad_clip_norm = 0.0
  c.skip_nonfinite_steps = 2  # apply_if_finite wraps the chain: must keep working
  return c


def _vit():
  # head_zero_init=False: with a zero head every body gradient of the first step is zero.
  return vit.ViT(num_classes=4, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4,
                 pool='gap', head_zero_init=False)


def _batch(n):
  rng = np.random.default_rng(0)
  return {'image': rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
          'labels': np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)]}


def _state(model, tx):
  """A train state with numpy-drawn weights: XLA:CPU compiles a jitted init slowly."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 1)),
                                             train=False))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(a.dtype), shapes)
  params, stats = variables['params'], variables.get('batch_stats', {})
  return step_lib.TrainState(step=np.zeros((), np.int32), params=params, batch_stats=stats,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                             ema_params=params, ema_batch_stats=stats)


def _run(model, n_devices, batch, k, steps=2):
  mesh = parallel.make_mesh(jax.devices()[:n_devices])
  tx, _ = optim.make_optimizer(_config(), total_steps=10)
  state = jax.device_put(_state(model, tx), parallel.replicated(mesh))
  fn = train_step_fn(mesh, model=model, tx=tx, label_smoothing=0.1, ema_decay=0.9,
                     skip_nonfinite_steps=2, grad_accum_steps=k)
  metrics = None
  for _ in range(steps):
    state, metrics = fn(state, parallel.shard_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def _assert_same(a, b, tol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=tol, rtol=tol)


@pytest.fixture(scope='module')
def whole_batch():
  """One device, no accumulation: the reference update."""
  return _run(_vit(), 1, _batch(32), 1)


@pytest.mark.parametrize('n_devices,k', [(1, 4), (8, 2)])
def test_accumulation_equals_whole_batch(whole_batch, n_devices, k):
  full, m_full = whole_batch
  acc, m_acc = _run(_vit(), n_devices, _batch(32), k)
  _assert_same(full.params, acc.params)
  _assert_same(full.ema_params, acc.ema_params)
  # Metrics are the whole batch's.
  np.testing.assert_allclose(m_full['loss'], m_acc['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_full['grad_norm'], m_acc['grad_norm'], rtol=1e-5)
  assert int(m_full['top1_correct']) == int(m_acc['top1_correct'])
  assert int(m_acc['count']) == 32 and int(m_acc['skipped']) == 0 and bool(m_acc['finite'])
  assert int(acc.step) == 2


def test_batchnorm_statistics_update_per_microbatch():
  model = resnet.ResNet(stage_sizes=(1,), block=resnet.BasicBlock, num_classes=4, width=4,
                        stem='small')
  batch = _batch(16)
  before, _ = _run(model, 2, batch, 1, steps=0)
  after, m = _run(model, 2, batch, 2, steps=1)
  assert np.isfinite(m['loss']) and int(m['count']) == 16
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before.batch_stats),
                                                 jax.tree.leaves(after.batch_stats))]
  assert all(moved)


def test_config_checks():
  c = config_lib.defaults()
  assert c.grad_accum_steps == 1
  c.grad_accum_steps = 0
  with pytest.raises(ConfigError, match='grad_accum_steps'):
    config_lib.validate(c)
  mesh = parallel.make_mesh(jax.devices()[:8])
  assert parallel.check_grad_accum(128, 4, mesh) == 4
  with pytest.raises(ConfigError, match='per-device batch of 16.*1, 2, 4, 8, 16'):
    parallel.check_grad_accum(128, 3, mesh)
