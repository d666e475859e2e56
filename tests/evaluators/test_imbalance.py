"""Imbalance: balanced accuracy, macro-F1 and recall by hand, class weights, and logit
adjustment as a post-hoc correction and as a loss (jit-able, equal to CE for a uniform prior)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import step
from imgcls.errors import UserError
from imgcls.evaluators import imbalance

# 3 classes, 8 examples; by hand:
#   class 0: 4 examples, 3 right;  predicted 0 four times   -> recall 3/4, precision 3/4
#   class 1: 3 examples, 1 right;  predicted 1 once         -> recall 1/3, precision 1
#   class 2: 1 example,  1 right;  predicted 2 three times  -> recall 1,   precision 1/3
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2])
PREDS = np.array([0, 0, 0, 2, 1, 0, 2, 2])


def test_recall_balanced_accuracy_and_macro_f1_by_hand():
  recall = imbalance.per_class_recall(LABELS, PREDS, 3)
  np.testing.assert_allclose(recall, [3 / 4, 1 / 3, 1.0])
  balanced = imbalance.balanced_accuracy(LABELS, PREDS, 3)
  assert balanced == pytest.approx(np.mean(recall))
  assert balanced == pytest.approx((3 / 4 + 1 / 3 + 1) / 3)
  assert balanced != pytest.approx(np.mean(LABELS == PREDS))  # 5/8: not plain accuracy
  f1 = imbalance.per_class_f1(LABELS, PREDS, 3)
  np.testing.assert_allclose(f1, [3 / 4, 2 * (1 / 3) / (1 + 1 / 3), 2 * (1 / 3) / (1 + 1 / 3)])
  assert imbalance.macro_f1(LABELS, PREDS, 3) == pytest.approx(np.mean(f1))


def test_absent_classes_are_left_out_not_counted_as_zero():
  recall = imbalance.per_class_recall(LABELS, PREDS, 4)  # class 3 never occurs
  assert np.isnan(recall[3])
  assert imbalance.balanced_accuracy(LABELS, PREDS, 4) == imbalance.balanced_accuracy(
      LABELS, PREDS, 3)
  assert imbalance.macro_f1(LABELS, PREDS, 4) == imbalance.macro_f1(LABELS, PREDS, 3)
  with pytest.raises(UserError, match='class ids'):
    imbalance.balanced_accuracy(LABELS, PREDS, 2)


def test_balanced_accuracy_equals_the_reports_mean_class_accuracy():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 300)
  preds = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))
  recall = imbalance.per_class_recall(labels, preds, 5)
  counts = np.bincount(labels, minlength=5)
  by_hand = [np.mean(preds[labels == k] == k) for k in range(5)]
  np.testing.assert_allclose(recall, by_hand)
  assert imbalance.balanced_accuracy(labels, preds, 5) == pytest.approx(
      np.sum(np.array(by_hand) * (counts > 0)) / np.sum(counts > 0))
  # the report (being moved into evaluators/: taken from wherever it is now) agrees
  for name in ('imgcls.evaluators.reports', 'imgcls.reports'):
    try:
      report = importlib.import_module(name).single_label_report
      break
    except (ImportError, AttributeError):
      continue
  else:
    pytest.skip('no single_label_report found')
  scalars = report(np.eye(5)[preds], labels, num_bins=15, grid_size=0).scalars
  assert scalars['mean_class_accuracy'] == pytest.approx(
      imbalance.balanced_accuracy(labels, preds, 5))


def test_class_weights():
  counts = np.array([1000, 100, 10])
  balanced = imbalance.class_weights(counts, 'balanced')
  np.testing.assert_allclose(balanced, 1110 / (3 * counts), rtol=1e-6)
  assert np.sum(balanced * counts) == pytest.approx(counts.sum())  # mean 1 per example
  effective = imbalance.class_weights(counts, 'effective_number', beta=0.99)
  by_hand = (1 - 0.99) / (1 - 0.99 ** counts)
  np.testing.assert_allclose(effective, by_hand * 3 / by_hand.sum(), rtol=1e-5)
  assert effective[0] < effective[1] < effective[2]
  np.testing.assert_allclose(imbalance.class_weights(counts, 'effective_number', beta=0.0), 1.0)
  # beta -> 1: proportional to 'balanced'
  near_one = imbalance.class_weights(counts, 'effective_number', beta=1 - 1e-9)
  np.testing.assert_allclose(near_one / near_one[0], balanced / balanced[0], rtol=1e-4)
  np.testing.assert_array_equal(imbalance.class_weights(counts, [1, 2, 3]), [1, 2, 3])
  with pytest.raises(UserError, match=r'classes \[1\] have no training examples'):
    imbalance.class_weights([5, 0, 3])
  with pytest.raises(UserError, match='unknown'):
    imbalance.class_weights(counts, 'inverse')
  with pytest.raises(UserError, match='one per class'):
    imbalance.class_weights(counts, [1.0, 2.0])


def test_post_hoc_adjustment_with_uniform_priors_changes_no_prediction():
  logits = jax.random.normal(jax.random.key(0), (256, 10)) * 3
  uniform = jnp.asarray(imbalance.log_prior(np.full(10, 600)))
  adjusted = jax.jit(imbalance.adjust_logits)(logits, uniform, 1.0)
  np.testing.assert_array_equal(adjusted.argmax(-1), logits.argmax(-1))


def test_post_hoc_adjustment_favours_rare_classes():
  logits = jnp.zeros((1, 3)).at[0, 0].set(1.0)  # head class ahead by 1
  prior = imbalance.log_prior([900, 90, 10])
  np.testing.assert_allclose(prior, np.log([0.9, 0.09, 0.01]), rtol=1e-6)
  assert int(imbalance.adjust_logits(logits, prior, 0.0).argmax()) == 0
  assert int(imbalance.adjust_logits(logits, prior, 1.0).argmax()) == 2


def test_logit_adjusted_loss_with_uniform_prior_is_plain_cross_entropy():
  key1, key2 = jax.random.split(jax.random.key(1))
  logits = jax.random.normal(key1, (64, 7))
  labels = jax.random.randint(key2, (64,), 0, 7)
  onehot = jax.nn.one_hot(labels, 7)
  uniform = jnp.asarray(imbalance.log_prior(np.ones(7)))
  plain = step.softmax_xent(logits, onehot)
  loss = jax.jit(imbalance.logit_adjusted_xent)
  np.testing.assert_allclose(loss(logits, onehot, uniform, 1.0), plain, rtol=1e-6)
  np.testing.assert_allclose(loss(logits, labels, uniform, 1.0), plain, rtol=1e-6)  # int ids
  # a skewed prior: CE of logits + tau * log(prior), by hand
  prior = jnp.asarray(imbalance.log_prior(np.arange(1, 8) ** 2))
  np.testing.assert_allclose(loss(logits, onehot, prior, 0.5),
                             step.softmax_xent(logits + 0.5 * prior, onehot), rtol=1e-6)
  grads = jax.grad(lambda z: loss(z, onehot, prior, 1.0).mean())(logits)
  assert grads.shape == logits.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_class_weighted_xent():
  logits = jax.random.normal(jax.random.key(2), (16, 3))
  labels = jnp.arange(16) % 3
  weights = jnp.array([0.5, 1.0, 4.0])
  plain = step.softmax_xent(logits, jax.nn.one_hot(labels, 3))
  weighted = jax.jit(imbalance.class_weighted_xent)(logits, labels, weights)
  np.testing.assert_allclose(weighted, plain * weights[labels], rtol=1e-6)
  np.testing.assert_allclose(imbalance.class_weighted_xent(logits, labels, jnp.ones(3)), plain,
                             rtol=1e-6)
