"""Post-hoc calibration fitted on held-out data: temperature scaling for softmax
classifiers, per-class Platt scaling (kept where it helps) for sigmoid ones.

Temperature scaling: Guo et al. 2017, "On Calibration of Modern Neural Networks".
Platt scaling: Platt 1999, "Probabilistic Outputs for Support Vector Machines".
Fitting is float64 numpy on the host; applying (`logits / T`, `a * logits + b`) is plain
arithmetic, so it works on numpy and jax arrays alike (inside a jitted or exported graph).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from imgcls.errors import UserError

T_MIN, T_MAX = 1e-3, 1e3  # the fitted temperature is clamped to this range


# ------------------------------------------------------------------ checks

def _logits(logits: Any, name: str = 'logits') -> np.ndarray:
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or 0 in z.shape:
    raise UserError(f'{name} has shape {z.shape}; expected [N, C] (examples, classes), N, C > 0.')
  if not np.all(np.isfinite(z)):
    raise UserError(f'{name} has {np.sum(~np.isfinite(z))} NaN/inf values; expected finite '
                    'logits (check the model or its dtype).')
  return z


def _labels(labels: Any, n: int, c: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise UserError(f'labels has shape {y.shape} and dtype {y.dtype}; expected [N] = ({n},) '
                    'integer class ids (not one-hot: use argmax(-1)).')
  if y.min() < 0 or y.max() >= c:
    raise UserError(f'labels lie in [{y.min()}, {y.max()}]; expected class ids in [0, {c - 1}].')
  return y


def _targets(targets: Any, shape: tuple[int, ...]) -> np.ndarray:
  t = np.asarray(targets)
  if t.shape != shape or not np.all((t == 0) | (t == 1)):
    raise UserError(f'targets has shape {t.shape}; expected multi-hot 0/1 of shape {shape} '
                    'like the logits.')
  return t.astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ------------------------------------------------------------------ softmax: temperature

def nll(logits: Any, labels: Any) -> float:
  """Mean negative log-likelihood (cross-entropy) of the labels under softmax(logits)."""
  z = _logits(logits)
  y = _labels(labels, *z.shape)
  return float(-np.mean(_log_softmax(z)[np.arange(len(y)), y]))


def ece(confidence: Any, correct: Any, num_bins: int = 15) -> float:
  """Expected calibration error over equal-width confidence bins (lo, hi].

  The same definition as the classification report's ECE (`calibration_bins`: bin by
  `searchsorted(edges[1:-1], side='left')`, count-weighted |accuracy - confidence|), written
  again here so this module imports nothing that is moving; tests check they agree.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct)
  if confidence.ndim != 1 or confidence.shape != correct.shape or not len(confidence):
    raise UserError(f'confidence {confidence.shape} and correct {correct.shape}: expected two '
                    'non-empty [N] arrays.')
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.searchsorted(edges[1:-1], confidence, side='left')
  count = np.bincount(idx, minlength=num_bins)
  with np.errstate(invalid='ignore'):
    acc = np.bincount(idx, weights=correct.astype(np.float64), minlength=num_bins) / count
    conf = np.bincount(idx, weights=confidence, minlength=num_bins) / count
  return float(np.nansum(np.abs(acc - conf) * count) / len(confidence))


def _nll_derivatives(beta: float, z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """First and second derivative in beta = 1/T of the mean NLL of softmax(beta * z)."""
  p = np.exp(_log_softmax(beta * z))
  mean_z = (p * z).sum(-1)
  grad = np.mean(mean_z - z[np.arange(len(y)), y])
  hess = np.mean((p * z * z).sum(-1) - mean_z ** 2)  # a variance: >= 0, so convex
  return float(grad), float(hess)


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
  """The temperature T > 0 minimising the NLL of softmax(logits / T) on held-out data.

  Why not a generic optimiser: the NLL is convex in 1/T, so a Newton step on its
  derivative, bracketed and falling back to bisection in log T, reaches float64 precision
  in a few passes over the data with nothing to tune. The result lies in [T_MIN, T_MAX]:
  T_MIN when the held-out set is separable (the NLL keeps falling as T -> 0).
  """
  z = _logits(logits)
  y = _labels(labels, *z.shape)
  lo, hi = 1.0 / T_MAX, 1.0 / T_MIN  # bracket on beta = 1/T
  if _nll_derivatives(0.0, z, y)[0] >= 0:
    raise UserError('the logits score the held-out labels no better than a uniform guess, so '
                    'no temperature helps: check that labels follow the logits\' class order.')
  if _nll_derivatives(hi, z, y)[0] <= 0:
    return T_MIN
  if _nll_derivatives(lo, z, y)[0] >= 0:
    return T_MAX
  beta = 1.0
  for _ in range(max_iter):
    grad, hess = _nll_derivatives(beta, z, y)
    if grad > 0:
      hi = beta
    else:
      lo = beta
    if grad == 0 or hi - lo <= 1e-12 * beta:
      break
    step = beta - grad / hess if hess > 0 else np.nan
    beta = step if lo < step < hi else float(np.sqrt(lo * hi))
  return float(1.0 / beta)


def apply_temperature(logits: Any, temperature: float) -> Any:
  """Calibrated logits, `logits / temperature` (numpy or jax; softmax them as before).
  Top-1 is unchanged: dividing by T > 0 keeps the order of each row."""
  return logits / temperature


def temperature_summary(logits: Any, labels: Any, temperature: float,
                        num_bins: int = 15) -> dict[str, float]:
  """NLL and ECE before and after scaling by `temperature`, for reports."""
  out = {'temperature': float(temperature)}
  for when, z in (('before', _logits(logits)), ('after', _logits(logits) / temperature)):
    p = np.exp(_log_softmax(z))
    out[f'nll_{when}'] = nll(z, labels)
    out[f'ece_{when}'] = ece(p.max(-1), p.argmax(-1) == np.asarray(labels), num_bins)
  return out


# ------------------------------------------------------------------ sigmoid: per-class Platt

@dataclasses.dataclass
class PlattScaling:
  """Per-class sigmoid(a * logit + b); `kept[c]` false where class c keeps a=1, b=0."""
  a: np.ndarray
  b: np.ndarray
  kept: np.ndarray

  def to_dict(self) -> dict[str, list[Any]]:
    return {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'PlattScaling':
    return cls(np.asarray(d['a'], np.float64), np.asarray(d['b'], np.float64),
               np.asarray(d['kept'], bool))


def binary_nll(logits: Any, targets: Any) -> np.ndarray:
  """[C] per-class mean binary NLL of multi-hot targets under sigmoid(logits)."""
  z = _logits(logits)
  t = _targets(targets, z.shape)
  return np.mean(np.logaddexp(0.0, z) - t * z, axis=0)


def _platt_loss(a, b, z, t):
  s = a * z + b
  return np.mean(np.logaddexp(0.0, s) - t * s, axis=0)


def fit_platt(logits: Any, targets: Any, max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """Per-class (a, b) [C] minimising the binary NLL of sigmoid(a * logits + b).

  Targets are smoothed as Platt proposed, (N+ + 1)/(N+ + 2) and 1/(N- + 2), so a class
  whose held-out scores separate perfectly still gets finite a and b. Newton's method per
  class (a 2x2 system), with step halving so the loss never rises.
  """
  z = _logits(logits)
  t = _targets(targets, z.shape)
  pos = t.sum(0)
  t = np.where(t > 0, (pos + 1) / (pos + 2), 1 / (len(t) - pos + 2))
  a, b = np.ones(z.shape[1]), np.zeros(z.shape[1])
  loss = _platt_loss(a, b, z, t)
  for _ in range(max_iter):
    p = 1 / (1 + np.exp(-(a * z + b)))
    w = p * (1 - p)
    ga, gb = np.mean((p - t) * z, 0), np.mean(p - t, 0)
    haa, hab, hbb = np.mean(w * z * z, 0) + 1e-12, np.mean(w * z, 0), np.mean(w, 0) + 1e-12
    det = haa * hbb - hab ** 2
    da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
    step = np.ones_like(a)
    for _ in range(30):  # halve each class's step until its loss does not rise
      new = _platt_loss(a - step * da, b - step * db, z, t)
      worse = ~(new <= loss)
      if not worse.any():
        break
      step = np.where(worse, step / 2, step)
    step = np.where(new <= loss, step, 0.0)
    a, b = a - step * da, b - step * db
    done = np.all(np.abs(loss - new) <= 1e-12)
    loss = np.minimum(loss, new)
    if done:
      break
  return a, b


def fit_platt_where_it_helps(logits: Any, targets: Any, folds: int = 5,
                             seed: int = 0) -> PlattScaling:
  """Per-class Platt scaling, kept for a class only where it helps.

  The rule: class c keeps its Platt map if its K-fold cross-validated binary NLL on the
  held-out data (fit on K-1 folds, scored on the K-th, with the real 0/1 targets) is lower
  than the raw sigmoid's on the same folds; every other class keeps a=1, b=0. Kept classes
  are then refitted on all of the held-out data.
  """
  z = _logits(logits)
  t = _targets(targets, z.shape)
  if not 2 <= folds <= len(z):
    raise UserError(f'folds={folds} with {len(z)} held-out examples; expected 2 <= folds <= N.')
  fold = np.random.default_rng(seed).permutation(len(z)) % folds
  raw, platt = np.zeros(z.shape[1]), np.zeros(z.shape[1])
  for k in range(folds):
    fit, held = fold != k, fold == k
    a, b = fit_platt(z[fit], t[fit])
    raw += binary_nll(z[held], t[held]) * held.sum()
    platt += _platt_loss(a, b, z[held], t[held]) * held.sum()
  kept = platt < raw
  a, b = fit_platt(z, t)
  return PlattScaling(np.where(kept, a, 1.0), np.where(kept, b, 0.0), kept)


def apply_platt(logits: Any, scaling: PlattScaling) -> Any:
  """Calibrated logits `a * logits + b` per class (numpy or jax; sigmoid them as before)."""
  return logits * scaling.a + scaling.b


def binary_ece(probs: Any, targets: Any, num_bins: int = 15) -> np.ndarray:
  """[C] per-class calibration error of sigmoid scores (class-wise ECE, Kull et al. 2019).

  For class c: the binary ECE of its score p_c read as the probability that c is present.
  The N scores go into `num_bins` equal-width bins (lo, hi] of [0, 1], and the error is
  sum over bins of (count / N) * |fraction of the bin's examples with c present - mean p_c|,
  i.e. `ece(p_c, target_c)`. 0 for a perfectly calibrated class; at most 1.
  """
  p = np.asarray(probs, np.float64)
  t = _targets(targets, p.shape)
  return np.array([ece(p[:, k], t[:, k], num_bins) for k in range(p.shape[1])])


def platt_summary(logits: Any, targets: Any, scaling: PlattScaling,
                  num_bins: int = 15) -> dict[str, Any]:
  """Per-class binary ECE (`binary_ece`) and NLL (`binary_nll`, binary cross-entropy) of
  sigmoid(logits) before and of sigmoid(a * logits + b) after, and their class means."""
  z = _logits(logits)
  t = _targets(targets, z.shape)
  out: dict[str, Any] = {}
  for when, s in (('before', z), ('after', apply_platt(z, scaling))):
    out[f'ece_{when}_per_class'] = binary_ece(0.5 + 0.5 * np.tanh(s / 2), t, num_bins)
    out[f'nll_{when}_per_class'] = binary_nll(s, t)
    out[f'ece_{when}'] = float(out[f'ece_{when}_per_class'].mean())
    out[f'nll_{when}'] = float(out[f'nll_{when}_per_class'].mean())
  return out
