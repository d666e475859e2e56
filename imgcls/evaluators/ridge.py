"""The few-shot probe's math: closed-form ridge regression on k shots per class (numpy only).

The "few-shot linear" probe of the ViT and BiT papers (big_vision's fewshot evaluator): how
linearly separable a model's pre-logits features are from very few labels. The evaluator that
feeds it features is `imgcls.evaluators.fewshot.FewShot`.

Protocol, which fixes what a number means:
  pool    per class, the first `pool_per_class` examples of the train split in file order.
  draw    for seed s, each class's pool is permuted by a generator seeded with (s, class); the
          first k examples are the k-shot set, the last `val_per_class` the held-out set
          (disjoint, as k + val_per_class <= pool). One seed's k-shot sets are nested.
  fit     features are centred on the k-shot set's mean and divided by its RMS norm (one
          scalar: the relative scale of the features is kept, and l2 means the same for every
          model). Ridge regression onto one-hot targets with an unpenalised intercept, solved in
          closed form for the whole l2 grid from one eigendecomposition of the smaller Gram
          matrix: the dual X Xᵀ (n x n) when n < D, the primal Xᵀ X (D x D) otherwise.
  choose  l2: per shot count, the grid value with the best held-out top-1 (mean over seeds;
          ties go to the larger l2). The test split never takes part in the choice, so the test
          top-1 is an unbiased estimate; the held-out labels are extra labelled examples, used
          only to pick one of a handful of l2 values.
  report  test top-1 at that l2: mean and std over seeds.

Linear algebra is numpy float64 on the host: the systems are small (n = k * classes, or D), and
float64 keeps the near-singular ones (l2 = 2^-10) exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgcls.errors import UserError

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_L2_REGS = tuple(float(2.0 ** e) for e in range(-10, 11, 4))  # 2^-10, 2^-6, ..., 2^10
DEFAULT_VAL_PER_CLASS = 10


class FewShotError(UserError):
  """Bad few-shot input; the message names the problem and the fix."""


# ------------------------------------------------------------------ sampling

def check_ints(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
  values = tuple(values)
  if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum
                       for v in values):
    raise FewShotError(f'{name} must be a non-empty sequence of ints >= {minimum}, got '
                       f'{values!r}.')
  return tuple(int(v) for v in values)


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
  if num_classes is None:
    return int(labels.max()) + 1 if labels.size else 0
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise FewShotError(f'labels lie in [{labels.min()}, {labels.max()}], outside the '
                       f'{num_classes} classes [0, {num_classes}): pass the right num_classes.')
  return num_classes


def sample_shots(labels: np.ndarray, shots: int, seed: int, *, num_classes: int | None = None,
                 holdout: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Indices of exactly `shots` examples per class, and of `holdout` other ones per class.

  Deterministic for (seed, class): each class's indices are permuted by
  np.random.default_rng([seed, class]); the first `shots` are drawn, the last `holdout` held
  out. So for one seed the k-shot sets are nested and the held-out set does not depend on k.
  Both index arrays are grouped by class (class 0 first). Every class in [0, num_classes)
  must have shots + holdout examples, else FewShotError naming the classes that do not.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise FewShotError(f'labels must be a 1-D integer array, got {labels.dtype} '
                       f'{labels.shape}.')
  (shots,), (holdout,), (seed,) = (check_ints('shots', [shots], 1),
                                   check_ints('holdout', [holdout], 0),
                                   check_ints('seed', [seed], 0))
  num_classes = _num_classes(labels, num_classes)
  need = shots + holdout
  drawn, held, short = [], [], []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < need:
      short.append(f'{c} ({len(idx)})')
      continue
    perm = np.random.default_rng([seed, c]).permutation(idx)
    drawn.append(perm[:shots])
    held.append(perm[len(perm) - holdout:])
  if short:
    raise FewShotError(
        f'{shots}-shot needs {need} examples of every class ({shots} shots + {holdout} held out '
        f'to choose l2), but class(es) {", ".join(short[:10])}{" ..." if len(short) > 10 else ""} '
        f'have fewer among the {len(labels)} train examples. Lower the shots or val_per_class, '
        'raise pool_per_class, or use a larger train split.')
  empty = np.zeros((0,), np.int64)
  return (np.concatenate(drawn) if drawn else empty), (np.concatenate(held) if held else empty)


# --------------------------------------------------------------------- ridge

def ridge_regression(x: np.ndarray, y: np.ndarray, l2_regs: Sequence[float]) -> np.ndarray:
  """W [len(l2_regs), D, C] minimising ||x W - y||² + l2 ||W||² for each l2 (no intercept).

  One eigendecomposition serves the whole grid: of the dual Gram x xᵀ when n < D (W = xᵀ (x xᵀ
  + l2 I)⁻¹ y), of the primal xᵀ x otherwise (W = (xᵀ x + l2 I)⁻¹ xᵀ y); the two are equal.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
    raise FewShotError(f'ridge_regression needs x [n, D] and y [n, C], got {x.shape} and '
                       f'{y.shape}.')
  l2 = np.asarray(l2_regs, np.float64)
  if l2.ndim != 1 or not l2.size or np.any(~np.isfinite(l2)) or np.any(l2 <= 0):
    raise FewShotError(f'l2_regs must be positive finite numbers, got {l2_regs!r}.')
  dual = len(x) < x.shape[1]
  gram = x @ x.T if dual else x.T @ x
  s, u = np.linalg.eigh(gram)
  s = np.maximum(s, 0.0)  # a Gram matrix is PSD; rounding can leave tiny negatives
  uty = u.T @ (y if dual else x.T @ y)  # [n or D, C]
  solved = u @ (uty[None] / (s[None, :, None] + l2[:, None, None]))  # [L, n or D, C]
  return np.einsum('nd,lnc->ldc', x, solved) if dual else solved


class _Probe:
  """The k-shot set's normalisation and ridge weights for a grid of l2 values."""

  def __init__(self, feats: np.ndarray, labels: np.ndarray, num_classes: int,
               l2_regs: Sequence[float]):
    x = feats.astype(np.float64)
    self.mean = x.mean(axis=0)
    x = x - self.mean
    rms = math.sqrt(float(np.mean(np.sum(x * x, axis=1))))
    self.scale = rms if rms > 1e-12 else 1.0  # all-equal features: nothing to scale
    y = np.eye(num_classes)[labels]
    self.bias = y.mean(axis=0)  # the unpenalised intercept, once x and y are centred
    self.weights = ridge_regression(x / self.scale, y - self.bias, l2_regs)

  def accuracy(self, feats: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Top-1 for each l2 of the grid, [L]; in chunks, so scores stay small for many classes."""
    hits = np.zeros(len(self.weights))
    for start in range(0, len(feats), chunk):
      x = (feats[start:start + chunk].astype(np.float64) - self.mean) / self.scale
      scores = np.einsum('md,ldc->lmc', x, self.weights) + self.bias
      hits += np.sum(np.argmax(scores, axis=-1) == labels[None, start:start + chunk], axis=-1)
    return hits / len(feats)


def _check_features(name: str, feats: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  feats, labels = np.asarray(feats), np.asarray(labels)
  if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
    raise FewShotError(f'{name} features must be [N, D] with labels [N], got {feats.shape} and '
                       f'{labels.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise FewShotError(f'{name} labels must be integer class ids, got {labels.dtype}.')
  if not np.all(np.isfinite(feats)):
    raise FewShotError(f'{name} features contain NaN or inf: the model diverged or its weights '
                       'are corrupt. Evaluate an earlier checkpoint.')
  return feats, labels


def ridge_fewshot(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                  test_labels: np.ndarray, shots: Sequence[int] = DEFAULT_SHOTS,
                  seeds: Sequence[int] = DEFAULT_SEEDS,
                  l2_regs: Sequence[float] = DEFAULT_L2_REGS, *,
                  val_per_class: int = DEFAULT_VAL_PER_CLASS, num_classes: int | None = None,
                  prefix: str = 'fewshot') -> dict[str, float]:
  """Few-shot ridge-regression top-1 on the test features (the protocol of the module doc).

  train_feats/labels are the pool the k-shot and held-out sets are drawn from. Returns, per k
  in shots: {prefix}_{k}shot_top1 (test, mean over seeds), ..._top1_std, ..._l2 (chosen on the
  held-out set) and ..._val_top1 (held-out top-1 at that l2; absent when val_per_class=0,
  which needs a single l2).
  """
  train_feats, train_labels = _check_features('train', train_feats, train_labels)
  test_feats, test_labels = _check_features('test', test_feats, test_labels)
  if train_feats.shape[1] != test_feats.shape[1]:
    raise FewShotError(f'train features have D={train_feats.shape[1]}, test features '
                       f'D={test_feats.shape[1]}: extract both with the same model.')
  if not len(test_labels):
    raise FewShotError('no test examples: pass a non-empty test split.')
  shots = check_ints('shots', shots, 1)
  seeds = check_ints('seeds', seeds, 0)
  (val_per_class,) = check_ints('val_per_class', [val_per_class], 0)
  l2_regs = tuple(float(v) for v in l2_regs)
  if val_per_class == 0 and len(l2_regs) > 1:
    raise FewShotError(f'choosing among {len(l2_regs)} l2 values needs held-out examples: '
                       'set val_per_class >= 1, or pass a single l2 in l2_regs.')
  if num_classes is None:
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max())) + 1
  _num_classes(test_labels, num_classes)

  out = {}
  for k in shots:
    val_acc, probes = [], []
    for seed in seeds:
      drawn, held = sample_shots(train_labels, k, seed, num_classes=num_classes,
                                 holdout=val_per_class)
      probe = _Probe(train_feats[drawn], train_labels[drawn], num_classes, l2_regs)
      val_acc.append(probe.accuracy(train_feats[held], train_labels[held]) if len(held)
                     else np.zeros(len(l2_regs)))
      probes.append(probe)
    mean_val = np.mean(val_acc, axis=0)
    best = max(range(len(l2_regs)), key=lambda i: (mean_val[i], l2_regs[i]))
    test_acc = []
    for probe in probes:  # only the chosen l2 is scored on the test set
      probe.weights = probe.weights[best:best + 1]
      test_acc.append(float(probe.accuracy(test_feats, test_labels)[0]))
    name = f'{prefix}_{k}shot'
    out[f'{name}_top1'] = float(np.mean(test_acc))
    out[f'{name}_top1_std'] = float(np.std(test_acc))
    out[f'{name}_l2'] = l2_regs[best]
    if val_per_class:
      out[f'{name}_val_top1'] = float(mean_val[best])
  return out
