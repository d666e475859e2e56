"""Selective prediction: answer only above a confidence threshold, send the rest to a person.

The risk-coverage curve and its area (AURC): Geifman, Uziel and El-Yaniv 2019, "Bias-Reduced
Uncertainty Estimation for Deep Neural Classifiers"; selective classification: Geifman and
El-Yaniv 2017, "Selective Classification for Deep Neural Networks". Pure numpy.
A threshold chosen here meets its risk on the data it was chosen on; on new data its risk
is an estimate (no high-probability bound), so choose it on validation, report it on test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from imgcls.errors import UserError


@dataclasses.dataclass(frozen=True)
class RiskCoverage:
  """The curve at each distinct confidence, highest first: keeping `confidence >= threshold`
  answers a `coverage` fraction of the examples with error rate `risk` among them."""
  threshold: np.ndarray
  coverage: np.ndarray
  risk: np.ndarray


@dataclasses.dataclass(frozen=True)
class SelectiveThreshold:
  """Answer where confidence >= threshold; coverage and risk as measured where it was chosen."""
  threshold: float
  coverage: float
  risk: float


def _inputs(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
  conf = np.asarray(confidence, np.float64)
  ok = np.asarray(correct)
  if conf.ndim != 1 or conf.shape != ok.shape or not len(conf):
    raise UserError(f'confidence {conf.shape} and correct {ok.shape}: expected two non-empty [N] '
                    'arrays (e.g. max softmax probability and argmax == label).')
  if not np.all(np.isfinite(conf)):
    raise UserError('confidence has NaN/inf values; expected finite scores.')
  return conf, ok.astype(bool)


def _sorted_groups(conf: np.ndarray, ok: np.ndarray):
  """Confidence descending; per tie group: its confidence, its end index, its errors."""
  order = np.argsort(-conf, kind='stable')
  s, err = conf[order], ~ok[order]
  end = np.flatnonzero(np.append(s[:-1] != s[1:], True))  # last index of each tie group
  return s, err, end


def risk_coverage(confidence: Any, correct: Any) -> RiskCoverage:
  """The risk-coverage curve, one point per distinct confidence (tied examples are kept or
  dropped together, as a threshold would)."""
  conf, ok = _inputs(confidence, correct)
  s, err, end = _sorted_groups(conf, ok)
  kept = end + 1
  return RiskCoverage(s[end], kept / len(s), np.cumsum(err)[end] / kept)


def aurc(confidence: Any, correct: Any) -> float:
  """Area under the risk-coverage curve: the mean over k = 1..N of the error rate among the
  k most confident examples (lower is better). Ties are counted as their expected value
  under a random order, so the result does not depend on how ties were sorted. A perfect
  ranking with e errors in N reaches e/N - (1 - e/N) * (H_N - H_{N-e}) (H: harmonic numbers).
  """
  conf, ok = _inputs(confidence, correct)
  s, err, end = _sorted_groups(conf, ok)
  start = np.append(0, end[:-1] + 1)
  group = np.repeat(np.arange(len(end)), end - start + 1)
  group_err = np.add.reduceat(err.astype(np.float64), start)
  before = np.append(0.0, np.cumsum(group_err)[:-1])
  k = np.arange(1, len(s) + 1)
  within = k - start[group]  # how many of this tie group are kept at k
  expected_err = before[group] + within * group_err[group] / (end - start + 1)[group]
  return float(np.mean(expected_err / k))


def selective_risk(confidence: Any, correct: Any, threshold: float) -> tuple[float, float]:
  """(coverage, risk) of answering where confidence >= threshold; risk is NaN at coverage 0."""
  conf, ok = _inputs(confidence, correct)
  kept = conf >= threshold
  return float(kept.mean()), float((~ok[kept]).mean()) if kept.any() else float('nan')


def threshold_for_risk(confidence: Any, correct: Any, max_risk: float) -> SelectiveThreshold:
  """The lowest confidence threshold (most coverage) whose risk here is at most `max_risk`.

  Every distinct confidence is a candidate; risk need not fall monotonically as the
  threshold rises, so this is the largest coverage among all candidates that meet the
  target. When none does (even the most confident tie group errs too often) it raises a
  UserError naming the lowest risk these data reach.
  """
  if not 0.0 <= max_risk <= 1.0:
    raise UserError(f'max_risk={max_risk}; expected an error rate in [0, 1] (e.g. 0.02).')
  curve = risk_coverage(confidence, correct)
  meets = np.flatnonzero(curve.risk <= max_risk)
  if not len(meets):
    raise UserError(f'no confidence threshold reaches max_risk={max_risk} on these '
                    f'{len(np.asarray(confidence))} examples (lowest risk at any threshold: '
                    f'{curve.risk.min():.4g}): raise max_risk, or improve the model.')
  i = meets[-1]
  return SelectiveThreshold(float(curve.threshold[i]), float(curve.coverage[i]),
                            float(curve.risk[i]))
