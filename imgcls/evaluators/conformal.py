"""Split-conformal prediction sets: APS and RAPS (Angelopoulos, Bates, Malik and Jordan 2021,
"Uncertainty Sets for Image Classifiers using Conformal Prediction"; APS: Romano, Sesia and
Candes 2020). Pure numpy.

The guarantee: when the calibration and test examples are exchangeable (drawn alike, the
calibration set never trained on), a test label lies in its set with probability at least
1 - alpha, marginally (on average over images and calibration draws, not per image or per
class), and at most 1 - alpha + 1/(n+1) when the scores have no ties and empty sets are
allowed. This holds for both variants. The randomised one gives smaller sets; the default
is the non-randomised one, whose sets are reproducible (the same image always gets the same
set), at the cost of slightly larger sets. By default an empty set gets the top-1 class
(`allow_empty=False`), which can only raise coverage.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from imgcls.errors import UserError

METHODS = ('aps', 'raps')


@dataclasses.dataclass(frozen=True)
class ConformalCalibration:
  """What `prediction_sets` needs, JSON-serialisable: the score quantile and how scores are made.

  params: lam and k_reg (RAPS's penalty lam * max(0, rank - k_reg); lam = 0 for APS),
  randomized, allow_empty and seed (of the randomisation).
  """
  qhat: float
  method: str
  alpha: float
  n: int
  params: dict[str, Any]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> 'ConformalCalibration':
    return cls(**json.loads(text))


def _probs(probs: Any) -> np.ndarray:
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or 0 in p.shape or not np.all(np.isfinite(p)):
    raise UserError(f'probs has shape {p.shape}; expected finite [N, C] softmax probabilities.')
  if p.min() < -1e-6 or np.abs(p.sum(-1) - 1).max() > 1e-3:
    raise UserError('probs rows are not probability distributions (negative or not summing '
                    'to 1): apply softmax to the logits first.')
  return p


def _labels(labels: Any, n: int, c: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= c:
    raise UserError(f'labels has shape {y.shape} and dtype {y.dtype}; expected [N] = ({n},) '
                    f'integer class ids in [0, {c - 1}].')
  return y


def _sorted_scores(p: np.ndarray, params: dict[str, Any], seed_offset: int):
  """Classes by descending probability, and the conformity score of each (sorted) class:
  the probability mass ranked above it plus its own (less u * its own when randomised),
  plus RAPS's penalty lam * max(0, rank - k_reg) summed over the ranks up to it."""
  order = np.argsort(-p, axis=1, kind='stable')
  ps = np.take_along_axis(p, order, axis=1)
  rank = np.arange(1, p.shape[1] + 1)
  score = np.cumsum(ps, axis=1) + params['lam'] * np.maximum(0, rank - params['k_reg'])
  if params['randomized']:
    u = np.random.default_rng([params['seed'], seed_offset]).random((len(p), 1))
    score = score - u * ps
  return order, score


def calibrate(probs: Any, labels: Any, alpha: float, method: str = 'aps', *,
              lam: float = 0.01, k_reg: int = 5, randomized: bool = False,
              allow_empty: bool = False, seed: int = 0) -> ConformalCalibration:
  """The score quantile qhat on held-out (probs, labels) for 1 - alpha coverage.

  qhat is the ceil((n+1)(1-alpha))-th smallest of the n calibration scores (the quantile
  at level ceil((n+1)(1-alpha))/n: the finite-sample correction). lam and k_reg apply to
  'raps' only; `raps_k_reg` picks k_reg from a separate tuning split. randomized: one
  uniform u per example from `seed` (the guarantee averages over u too, so a seed is one
  draw, like the calibration split; an image's set then depends on its row, not only on it).
  """
  if method not in METHODS:
    raise UserError(f'method {method!r} is not a conformal method; choose one of {METHODS}.')
  if not 0 < alpha < 1:
    raise UserError(f'alpha={alpha}; expected a miscoverage rate in (0, 1), e.g. 0.1.')
  if lam < 0 or k_reg < 0:
    raise UserError(f'lam={lam}, k_reg={k_reg}; expected both >= 0.')
  p = _probs(probs)
  y = _labels(labels, *p.shape)
  n = len(p)
  k = math.ceil((n + 1) * (1 - alpha))
  if k > n:
    raise UserError(f'{n} calibration examples are too few for alpha={alpha}: the set would '
                    f'be every class. Use at least {math.ceil(1 / alpha) - 1} examples or a '
                    'larger alpha.')
  params = {'lam': float(lam) if method == 'raps' else 0.0,
            'k_reg': int(k_reg) if method == 'raps' else 0,
            'randomized': bool(randomized), 'allow_empty': bool(allow_empty), 'seed': int(seed)}
  order, score = _sorted_scores(p, params, seed_offset=0)
  true_score = score[np.arange(n), np.argmax(order == y[:, None], axis=1)]
  qhat = float(np.sort(true_score)[k - 1])
  return ConformalCalibration(qhat, method, float(alpha), n, params)


def prediction_sets(probs: Any, calibration: ConformalCalibration,
                    seed_offset: int = 1) -> np.ndarray:
  """[N, C] boolean mask: class c is in example i's set when its score is <= qhat.

  Sets are the top-L classes of each row. seed_offset varies the randomisation between
  calls (randomised variant only; the calibration used 0).
  """
  p = _probs(probs)
  order, score = _sorted_scores(p, calibration.params, seed_offset)
  keep = score <= calibration.qhat
  if not calibration.params['allow_empty']:
    keep[:, 0] = True
  mask = np.zeros(p.shape, bool)
  np.put_along_axis(mask, order, keep, axis=1)
  return mask


def raps_k_reg(probs: Any, labels: Any, alpha: float) -> int:
  """RAPS's k_reg as the paper picks it: the (1 - alpha) quantile (finite-sample corrected)
  of the true labels' ranks. Use a tuning split apart from the calibration split."""
  p = _probs(probs)
  y = _labels(labels, *p.shape)
  ranks = np.sort(1 + np.sum(p > p[np.arange(len(p)), y][:, None], axis=1))
  k = min(math.ceil((len(p) + 1) * (1 - alpha)), len(p))
  return int(ranks[k - 1])


def set_metrics(sets: Any, labels: Any) -> dict[str, Any]:
  """Empirical coverage and mean set size, overall and per true class (NaN: class absent)."""
  sets = np.asarray(sets, bool)
  y = _labels(labels, *sets.shape)
  covered = sets[np.arange(len(y)), y]
  size = sets.sum(1)
  count = np.bincount(y, minlength=sets.shape[1])
  with np.errstate(invalid='ignore'):
    per_class_coverage = np.bincount(y, weights=covered, minlength=sets.shape[1]) / count
    per_class_size = np.bincount(y, weights=size, minlength=sets.shape[1]) / count
  return {'coverage': float(covered.mean()), 'mean_set_size': float(size.mean()),
          'empty_sets': float(np.mean(size == 0)),
          'per_class': {'coverage': per_class_coverage, 'mean_set_size': per_class_size,
                        'count': count}}
