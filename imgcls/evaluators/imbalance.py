"""Class imbalance: metrics that weigh every class alike, class weights, logit adjustment.

Effective number of samples: Cui et al. 2019, "Class-Balanced Loss Based on Effective Number
of Samples". Logit adjustment: Menon et al. 2021, "Long-tail learning via logit adjustment".
Metrics and weights are numpy (host side); the losses and the post-hoc correction are pure
jax functions, jit-able inside a train or eval step.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imgcls.errors import UserError

WEIGHTINGS = ('balanced', 'effective_number')


# ------------------------------------------------------------------ metrics (numpy)

def _label_pair(labels: Any, predictions: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  y, p = np.asarray(labels), np.asarray(predictions)
  if y.ndim != 1 or y.shape != p.shape or not len(y):
    raise UserError(f'labels {y.shape} and predictions {p.shape}: expected two non-empty [N] '
                    'arrays of class ids (predictions = argmax of the logits).')
  for name, a in (('labels', y), ('predictions', p)):
    if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= num_classes:
      raise UserError(f'{name} must be integer class ids in [0, {num_classes - 1}].')
  return y, p


def per_class_recall(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
  """[K] fraction of each true class predicted as itself; NaN for a class with no examples.
  (The classification report's per-class `accuracy` is this same number.)"""
  y, p = _label_pair(labels, predictions, num_classes)
  count = np.bincount(y, minlength=num_classes)
  with np.errstate(invalid='ignore'):
    return np.bincount(y, weights=y == p, minlength=num_classes) / count


def balanced_accuracy(labels: Any, predictions: Any, num_classes: int) -> float:
  """Mean per-class recall over the classes present in `labels` (sklearn's definition; the
  report's `mean_class_accuracy`)."""
  return float(np.nanmean(per_class_recall(labels, predictions, num_classes)))


def per_class_f1(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
  """[K] F1 = 2TP / (2TP + FP + FN); NaN for a class neither present nor predicted."""
  y, p = _label_pair(labels, predictions, num_classes)
  tp = np.bincount(y, weights=y == p, minlength=num_classes)
  denom = np.bincount(y, minlength=num_classes) + np.bincount(p, minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denom > 0, 2 * tp / denom, np.nan)


def macro_f1(labels: Any, predictions: Any, num_classes: int) -> float:
  """Unweighted mean of per-class F1 over the classes present or predicted (the classes with
  an F1, as the multi-label report's macro F1 skips the others)."""
  return float(np.nanmean(per_class_f1(labels, predictions, num_classes)))


# ------------------------------------------------------------------ priors and class weights

def _counts(counts: Any) -> np.ndarray:
  n = np.asarray(counts, np.float64)
  if n.ndim != 1 or not len(n) or np.any(n < 0) or not np.all(np.isfinite(n)):
    raise UserError(f'class counts {n.shape}: expected [K] non-negative training-set counts.')
  if np.any(n == 0):
    raise UserError(f'classes {np.flatnonzero(n == 0).tolist()} have no training examples, so '
                    'they have no prior or weight: drop them from the label set, or add data.')
  return n


def log_prior(counts: Any) -> np.ndarray:
  """[K] log of the training label frequencies, log(n_c / n): what logit adjustment uses."""
  n = _counts(counts)
  return np.log(n / n.sum()).astype(np.float32)


def class_weights(counts: Any, method: str | Sequence[float] | np.ndarray = 'balanced',
                  beta: float = 0.999) -> np.ndarray:
  """[K] per-class loss weights from the training counts n_c.

  'balanced': n / (K * n_c), so the weights average to 1 over the training examples.
  'effective_number': (1 - beta) / (1 - beta**n_c), scaled to sum to K (Cui et al.): beta = 0
  weighs all classes alike, beta -> 1 approaches 'balanced'. A [K] array: used as given.
  """
  n = _counts(counts)
  if not isinstance(method, str):
    w = np.asarray(method, np.float64)
    if w.shape != n.shape or np.any(w < 0) or not np.all(np.isfinite(w)):
      raise UserError(f'given class weights have shape {w.shape}; expected {n.shape} finite, '
                      'non-negative numbers, one per class.')
    return w.astype(np.float32)
  if method == 'balanced':
    return (n.sum() / (len(n) * n)).astype(np.float32)
  if method == 'effective_number':
    if not 0 <= beta < 1:
      raise UserError(f'beta={beta}; expected 0 <= beta < 1 (e.g. 0.999 or 0.9999).')
    w = (1 - beta) / -np.expm1(n * np.log(beta)) if beta > 0 else np.ones_like(n)
    return (w * len(n) / w.sum()).astype(np.float32)
  raise UserError(f'class weighting {method!r} is unknown; choose one of {WEIGHTINGS} or give '
                  'one weight per class.')


# ------------------------------------------------------------------ losses (jax, jit-able)

def _one_hot(labels: jax.Array, logits: jax.Array) -> jax.Array:
  """Integer [B] labels to one-hot; one-hot or soft [B, K] labels pass through."""
  if labels.ndim == logits.ndim - 1:
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return labels.astype(jnp.float32)


def adjust_logits(logits: jax.Array, log_prior: jax.Array, tau: float = 1.0) -> jax.Array:
  """Post-hoc logit adjustment: logits - tau * log(prior). Predicting the argmax of these
  targets balanced error (Menon et al.); a uniform prior changes no prediction."""
  return logits.astype(jnp.float32) - tau * log_prior


def logit_adjusted_xent(logits: jax.Array, labels: jax.Array, log_prior: jax.Array,
                        tau: float = 1.0) -> jax.Array:
  """Per-example logit-adjusted loss: softmax cross-entropy of logits + tau * log(prior).
  Train with it and predict with the plain logits. labels: [B] ids or [B, K] (soft) one-hot."""
  adjusted = logits.astype(jnp.float32) + tau * log_prior
  return optax.softmax_cross_entropy(adjusted, _one_hot(labels, logits))


def class_weighted_xent(logits: jax.Array, labels: jax.Array,
                        weights: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy times its class's weight (soft labels: the
  label-weighted mix of class weights). Average it as the plain loss is averaged."""
  onehot = _one_hot(labels, logits)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot) * (onehot @ weights)
