"""A checkpoint's stored calibration: fitted once on held-out data, applied everywhere.

`fit` turns a held-out split's scores into one JSON-serialisable dict (what
checkpoints.write_calibration stores beside the step): the temperature (softmax) or the
per-class Platt maps kept where they help (sigmoid), NLL/ECE before and after, and, for
softmax models, what abstention and conformal sets need at predict time for any target:
the calibrated confidence and correctness of every held-out example (`risk_threshold`) and
the sorted conformity scores of the true labels per method (`conformal_for`: qhat for any
alpha, exactly). `calibrated_logits` / `probabilities` apply it to numpy or jax arrays, so
imgcls.load, predict, export (inside the graph) and the reports share one definition.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import numpy as np

from imgcls.errors import UserError
from imgcls.evaluators import calibration as cal, conformal, selective

FORMAT = 1
# The conformity score of class y: the probability mass ranked above y (plus RAPS's penalty
# lam * max(0, rank(y) - k_reg)). It is APS's randomised score with u = 1:
# deterministic (an image always gets the same set, whatever its batch), never an empty set
# (the top class scores 0), and as valid as any score for split conformal. APS's default
# non-randomised score (mass up to and including y) gave the most confident images empty sets
# or overshot the coverage (measured on the default model: docs/reliability.md).
CONFORMAL_PARAMS = {
    'aps': {'lam': 0.0, 'k_reg': 0, 'u': 1.0},
    'raps': {'lam': 0.01, 'k_reg': 5, 'u': 1.0},
}
DEFAULT_METHOD = 'aps'
TINY = 1e-45  # float32's smallest positive: probabilities that underflowed to 0


def logits_from_probs(probs: Any, multilabel: bool) -> np.ndarray:
  """Logits recovered from the eval step's probabilities (float64): log p for softmax (exact
  up to a per-row constant, which softmax ignores), log p - log(1 - p) for sigmoid."""
  p = np.asarray(probs, np.float64)
  if multilabel:
    p = np.clip(p, 1e-7, 1 - 1e-7)  # float32 sigmoid saturates at 1.0
    return np.log(p) - np.log1p(-p)
  return np.log(np.maximum(p, TINY))


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _class_scores(probs: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Classes by descending probability and each one's conformity score (see CONFORMAL_PARAMS)."""
  order = np.argsort(-probs, axis=1, kind='stable')
  ps = np.take_along_axis(probs, order, axis=1)
  rank = np.arange(1, probs.shape[1] + 1)
  score = (np.cumsum(ps, axis=1) - params['u'] * ps +
           params['lam'] * np.maximum(0, rank - params['k_reg']))
  return order, score


def true_scores(probs: np.ndarray, labels: np.ndarray, method: str) -> np.ndarray:
  """Sorted conformity scores of the true labels under `method`'s parameters."""
  order, score = _class_scores(probs, CONFORMAL_PARAMS[method])
  return np.sort(score[np.arange(len(labels)), np.argmax(order == labels[:, None], axis=1)])


def prediction_sets(probs: Any, calibration: conformal.ConformalCalibration) -> np.ndarray:
  """[N, C] boolean: class c is in example i's set when its score is <= qhat (never empty)."""
  p = np.asarray(probs, np.float64)
  order, score = _class_scores(p, calibration.params)
  mask = np.zeros(p.shape, bool)
  np.put_along_axis(mask, order, score <= calibration.qhat, axis=1)
  return mask


def fit(logits: Any, labels: Any, *, multilabel: bool, split: str, step: int,
        weights: str) -> dict[str, Any]:
  """The calibration of a checkpoint from held-out (logits, labels); labels: [N] class ids,
  or [N, C] multi-hot for a multi-label model. `split` is recorded (it must be held out)."""
  z = np.asarray(logits, np.float64)
  record: dict[str, Any] = {
      'format': FORMAT, 'split': split, 'step': int(step), 'weights': weights,
      'examples': int(len(z)),
      'fitted_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  if multilabel:
    t = np.asarray(labels)
    scaling = cal.fit_platt_where_it_helps(z, t)
    summary = cal.platt_summary(z, t, scaling)  # class means of the binary ECE and NLL
    record.update(kind='platt', platt=scaling.to_dict(),
                  summary={**{k: v for k, v in summary.items() if not k.endswith('_class')},
                           'classes_kept': int(scaling.kept.sum())})
    return record
  y = np.asarray(labels)
  temperature = cal.fit_temperature(z, y)
  p = _softmax(z / temperature)
  record.update(kind='temperature', temperature=temperature,
                summary=cal.temperature_summary(z, y, temperature))
  record['selective'] = {'confidence': p.max(-1).tolist(),
                         'correct': (p.argmax(-1) == y).astype(int).tolist()}
  record['conformal'] = {m: {'params': CONFORMAL_PARAMS[m],
                             'scores': true_scores(p, y, m).tolist()}
                         for m in CONFORMAL_PARAMS}
  return record


def calibrated_logits(logits: Any, calibration: dict[str, Any] | None) -> Any:
  """Logits with the calibration applied (numpy or jax, inside jit or an exported graph):
  `logits / T`, or `a * logits + b` per class; unchanged when there is none."""
  if calibration is None:
    return logits
  if calibration['kind'] == 'temperature':
    return logits / np.float32(calibration['temperature'])
  platt = calibration['platt']
  return logits * np.asarray(platt['a'], np.float32) + np.asarray(platt['b'], np.float32)


def platt_scores(scores: Any, calibration: dict[str, Any]) -> np.ndarray:
  """Raw sigmoid scores [N, C] -> the calibrated ones imgcls.load serves (float64)."""
  c = np.shape(scores)[1]
  if calibration.get('kind') != 'platt' or len(calibration['platt']['a']) != c:
    raise UserError(f"the stored calibration ({calibration.get('kind')}) does not fit a "
                    f'sigmoid model with {c} classes: recalibrate with `imgcls calibrate`.')
  z = calibrated_logits(logits_from_probs(scores, True), calibration)
  return 0.5 + 0.5 * np.tanh(z / 2)  # sigmoid, without overflow


def binary_report(raw_logits: Any, targets: Any, calibration: dict[str, Any] | None,
                  names: list[str], num_bins: int = 15) -> tuple[dict, dict, dict | None]:
  """A multi-label report's calibration part: (scalars, per-class arrays, `calibration_fit`).

  Per class c: `ece`, the binary ECE of the served score p_c as the probability that c is
  present (calibration.binary_ece: `num_bins` equal-width bins, count-weighted |fraction
  present - mean p_c|), and `nll`, the binary cross-entropy; the scalars are their class
  means. With a stored Platt scaling, the served scores are the calibrated ones, the scalars
  add `*_uncalibrated`, and the fit lists each class's numbers before and after and which
  classes kept their Platt map (the others are served raw). None: no fit, raw scores.
  """
  c = len(names)
  scaling = (cal.PlattScaling(np.ones(c), np.zeros(c), np.zeros(c, bool)) if calibration is None
             else cal.PlattScaling.from_dict(calibration['platt']))
  s = cal.platt_summary(raw_logits, targets, scaling, num_bins)
  scalars = {'ece': s['ece_after'], 'nll': s['nll_after']}
  per_class = {'ece': s['ece_after_per_class'], 'nll': s['nll_after_per_class']}
  if calibration is None:
    return scalars, per_class, None
  scalars.update(ece_uncalibrated=s['ece_before'], nll_uncalibrated=s['nll_before'])
  fit = {k: calibration.get(k) for k in ('kind', 'split', 'examples', 'step', 'weights',
                                         'fitted_at', 'summary')}
  fit.update({k: v for k, v in s.items() if not k.endswith('_class')}, num_bins=num_bins)
  fit['per_class'] = {**{k[:-len('_per_class')]: v for k, v in s.items()
                         if k.endswith('_class')},
                      'platt_kept': scaling.kept, 'a': scaling.a, 'b': scaling.b}
  fit['classes_kept'] = [n for n, k in zip(names, scaling.kept) if k]
  fit['classes_left_as_is'] = [n for n, k in zip(names, scaling.kept) if not k]
  fit['rule'] = ('Platt is kept for a class where its 5-fold cross-validated NLL on the '
                 'calibration split beats the raw sigmoid; the other classes are left as is '
                 '(a=1, b=0).')
  return scalars, per_class, fit


def describe(calibration: dict[str, Any] | None) -> str:
  if calibration is None:
    return 'none (raw scores; `imgcls calibrate --workdir=W --split=S` fits one)'
  what = (f"temperature {calibration['temperature']:.4f}" if calibration['kind'] == 'temperature'
          else f"Platt on {sum(calibration['platt']['kept'])} classes")
  return f"{what}, fitted on {calibration['split']!r} ({calibration['examples']} examples)"


def _softmax_only(calibration: dict[str, Any] | None, what: str) -> dict[str, Any]:
  if calibration is None:
    raise UserError(f'{what} needs a calibration stored with the checkpoint: run `imgcls '
                    "calibrate --workdir=W --split=HELD_OUT` first (e.g. --split='test[:5000]').")
  if calibration['kind'] != 'temperature':
    raise UserError(f'{what} is for single-label (softmax) models; this one is multi-label.')
  return calibration


def conformal_for(calibration: dict[str, Any] | None, alpha: float,
                  method: str = DEFAULT_METHOD) -> conformal.ConformalCalibration:
  """The split-conformal calibration at `alpha` from the stored scores: qhat is the
  ceil((n+1)(1-alpha))-th smallest held-out score (exact for any alpha; no refit)."""
  calibration = _softmax_only(calibration, '--conformal')
  if method not in calibration['conformal']:
    raise UserError(f'conformal method {method!r} unknown; choose one of '
                    f"{sorted(calibration['conformal'])}.")
  if not 0 < alpha < 1:
    raise UserError(f'--conformal={alpha}: expected a miscoverage rate alpha in (0, 1), '
                    'e.g. 0.1 for sets that hold the true label 90% of the time.')
  stored = calibration['conformal'][method]
  if stored['params'] != CONFORMAL_PARAMS[method]:
    raise UserError(f'the stored conformal scores were made with other parameters '
                    f"({stored['params']}): recalibrate with `imgcls calibrate`.")
  scores = stored['scores']
  n = len(scores)
  k = math.ceil((n + 1) * (1 - alpha))
  if k > n:
    raise UserError(f'{n} calibration examples are too few for alpha={alpha}: recalibrate '
                    f'on at least {math.ceil(1 / alpha) - 1} examples or raise alpha.')
  return conformal.ConformalCalibration(float(scores[k - 1]), method, float(alpha), n,
                                        dict(stored['params']))


def risk_threshold(calibration: dict[str, Any] | None,
                   max_risk: float) -> selective.SelectiveThreshold:
  """The confidence threshold whose error rate on the calibration split is <= max_risk."""
  calibration = _softmax_only(calibration, '--max_risk')
  s = calibration['selective']
  return selective.threshold_for_risk(s['confidence'], s['correct'], max_risk)


def set_column(alpha: float) -> str:
  """The column of `predict --conformal=alpha`: 'set_90' for alpha = 0.1."""
  level = round(100 * (1 - alpha), 2)
  return f'set_{level:g}'.replace('.', '_')
