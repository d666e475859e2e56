"""The data-parallel step equals a single-device step on the same global batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgcls import optim, parallel, step as step_lib
from imgcls.evaluators.base import make_eval_fn
from imgcls.models import resnet

from helpers import replicated_state, train_step_fn


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
  state = replicated_state(model, tx, mesh, (16, 16, 1))
  fn = train_step_fn(mesh, model=model, tx=tx, label_smoothing=0.1)
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


def _eval_setup():
  """An 8-device mesh, the tiny model and its freshly initialised state, replicated."""
  mesh = parallel.make_mesh(jax.devices()[:8])
  model = _tiny_model()
  tx, _ = optim.make_optimizer(_config(), total_steps=10)
  return mesh, model, replicated_state(model, tx, mesh, (16, 16, 1))


def test_eval_step_counts_only_masked_in_examples():
  mesh, model, state = _eval_setup()
  batch = _batch()
  batch['mask'] = (np.arange(16) < 11).astype(np.float32)
  fn = make_eval_fn(model, 'softmax_xent', mesh)
  sums, per_example = jax.device_get(fn(state, parallel.shard_batch(batch, mesh)))
  assert float(sums['count']) == 11
  assert 0 <= float(sums['top1']) <= float(sums['top5']) <= 11
  # Per-example outputs come back whole, in batch order: probabilities and the mask.
  assert per_example['probs'].shape == (16, 4)
  np.testing.assert_allclose(per_example['probs'].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(per_example['mask'], batch['mask'])
  hits = np.argmax(per_example['probs'], -1) == np.argmax(batch['labels'], -1)
  assert float(sums['top1']) == np.sum(hits * batch['mask'])


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


def test_ema_decay_matches_hand_computation():
  batch = _batch()
  mesh = parallel.make_mesh(jax.devices()[:2])
  model = _tiny_model()
  tx, _ = optim.make_optimizer(_config(), total_steps=10)
  state = replicated_state(model, tx, mesh, (16, 16, 1), ema=True)
  fn = train_step_fn(mesh, model=model, tx=tx, ema_decay=0.9)
  p0 = jax.device_get(state.params)
  s1, _ = fn(state, parallel.shard_batch(batch, mesh))
  s2, _ = fn(s1, parallel.shard_batch(batch, mesh))
  p1, p2, ema = jax.device_get((s1.params, s2.params, s2.ema_params))
  # ema_0 = p0; ema_t+1 = d_t ema_t + (1 - d_t) p_t+1 with d_t = min(0.9, (1 + t) / (10 + t)).
  d0, d1 = min(0.9, 1 / 10), min(0.9, 2 / 11)
  for a, b, c, e in zip(*(jax.tree.leaves(t) for t in (p0, p1, p2, ema))):
    np.testing.assert_allclose(e, d1 * (d0 * a + (1 - d0) * b) + (1 - d1) * c,
                               rtol=1e-5, atol=1e-7)
  stats = jax.device_get((state.batch_stats, s1.batch_stats, s1.ema_batch_stats))
  for a, b, e in zip(*(jax.tree.leaves(t) for t in stats)):
    np.testing.assert_allclose(e, d0 * a + (1 - d0) * b, rtol=1e-5, atol=1e-7)
  # Later the decay is the configured one.
  np.testing.assert_allclose(step_lib.ema_decay_at(10_000, 0.9), 0.9)
  np.testing.assert_allclose(step_lib.ema_decay_at(90, 0.999), 91 / 100)
  assert not np.allclose(jax.tree.leaves(ema)[0], jax.tree.leaves(p2)[0])
  ema_view = s2.ema()
  assert ema_view.params is s2.ema_params and ema_view.batch_stats is s2.ema_batch_stats


def test_sigmoid_xent_and_precision_at_1():
  logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
  labels = jnp.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
  expected = [-np.sum(y * np.log(jax.nn.sigmoid(x)) + (1 - y) * np.log(1 - jax.nn.sigmoid(x)))
              for x, y in zip(np.asarray(logits), np.asarray(labels))]
  np.testing.assert_allclose(step_lib.sigmoid_xent(logits, labels), expected, rtol=1e-5)
  # Row 0's top class (0) is a true one, row 1's (1) is not.
  np.testing.assert_array_equal(step_lib.top1_hits(logits, labels), [True, False])
  with pytest.raises(ValueError, match='sigmoid_xent'):
    step_lib.loss_fn_for('hinge')


@pytest.mark.parametrize('loss', ['softmax_xent', 'sigmoid_xent'])
def test_flip_tta_scores_the_average_of_image_and_mirror(loss):
  """eval_step(tta='flip') scores the mean of the image's and its mirror's probabilities:
  its probabilities, top-1 and loss are those of that mean, not of either view alone."""
  mesh, model, state = _eval_setup()
  batch = _batch()
  batch['mask'] = np.ones(16, np.float32)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def probs_of(images):
    logits = model.apply(variables, images, train=False)
    return np.asarray(step_lib.probabilities(logits, loss))

  plain, mirrored = probs_of(batch['image']), probs_of(batch['image'][:, :, ::-1])
  assert np.abs(plain - mirrored).max() > 1e-4  # the mirror changes the prediction
  expected = (plain + mirrored) / 2
  fn = make_eval_fn(model, loss, mesh, tta='flip')
  sums, per_example = jax.device_get(fn(state, parallel.shard_batch(batch, mesh)))
  np.testing.assert_allclose(per_example['probs'], expected, rtol=1e-5, atol=1e-6)
  hits = step_lib.top1_hits(jnp.asarray(expected), jnp.asarray(batch['labels']))
  assert float(sums['top1']) == float(np.sum(hits))
  if loss == 'softmax_xent':
    nll = -np.sum(np.log(np.sum(expected * batch['labels'], -1)))
  else:
    y = batch['labels']
    nll = -np.sum(y * np.log(expected) + (1 - y) * np.log(1 - expected))
  np.testing.assert_allclose(float(sums['loss']), nll, rtol=1e-4)
  with pytest.raises(ValueError, match='tta must be one of'):
    step_lib.eval_logits(model, variables, batch['image'], loss, 'rot90')


class _PixelLogits(nn.Module):
  """Logits = the pixels of a 1 x K x 1 image, so its mirror's logits are reversed."""

  @nn.compact
  def __call__(self, x, train=False):
    return x.reshape(x.shape[0], -1)


def test_flip_tta_is_exact_for_confident_scores():
  """Averaged in log space: saturated sigmoid scores keep their size and order, and tiny
  softmax probabilities keep theirs (float32 probabilities would give 1.0 and 0.0)."""
  images = np.asarray([[40.0, -40.0, 30.0], [0.0, -200.0, 0.0]], np.float32)[:, None, :, None]
  a = images.reshape(2, 3).astype(np.float64)
  b = a[:, ::-1]
  got = np.asarray(step_lib.eval_logits(_PixelLogits(), {}, jnp.asarray(images),
                                        'sigmoid_xent', 'flip'))
  p = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  mean_p = (p(a) + p(b)) / 2
  mean_q = (p(-a) + p(-b)) / 2  # 1 - mean_p, without cancellation
  np.testing.assert_allclose(got, np.log(mean_p) - np.log(mean_q), rtol=1e-5, atol=1e-5)
  assert got[0, 0] == pytest.approx(30 + np.log(2), abs=1e-4)  # not clamped to ~87
  got = np.asarray(step_lib.eval_logits(_PixelLogits(), {}, jnp.asarray(images),
                                        'softmax_xent', 'flip'))
  log_softmax = lambda z: z - np.logaddexp.reduce(z, axis=-1, keepdims=True)  # noqa: E731
  want = np.logaddexp(log_softmax(a), log_softmax(b)) - np.log(2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert got[1, 1] < -150  # e^-200: far below float32's smallest probability
