"""Split-conformal APS/RAPS: the coverage guarantee over many random splits, RAPS's
smaller sets, the finite-sample quantile by hand, JSON round trip, metrics."""

import numpy as np
import pytest

from imgcls.errors import UserError
from imgcls.evaluators import conformal

ALPHA, N_CAL, N_TEST, TRIALS = 0.1, 500, 1000, 400


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _calibrated(rng, n, c=10):
  """A calibrated model's probabilities with labels drawn from them (continuous scores)."""
  p = _softmax(rng.normal(size=(n, c)) * 2.0)
  return p, (np.cumsum(p, 1) > rng.random((n, 1))).argmax(1)


def _mean_coverage(method, **options):
  rng = np.random.default_rng(0)
  coverage, sizes = [], []
  for trial in range(TRIALS):
    p, y = _calibrated(rng, N_CAL + N_TEST)
    # the guarantee averages over the randomisation too: a fresh seed per split
    calibration = conformal.calibrate(p[:N_CAL], y[:N_CAL], ALPHA, method, k_reg=2,
                                      seed=trial, **options)
    metrics = conformal.set_metrics(conformal.prediction_sets(p[N_CAL:], calibration),
                                    y[N_CAL:])
    coverage.append(metrics['coverage'])
    sizes.append(metrics['mean_set_size'])
  return np.mean(coverage), np.mean(sizes)


@pytest.mark.parametrize('method', conformal.METHODS)
@pytest.mark.parametrize('randomized', [False, True])
def test_coverage_lies_between_the_guarantee_and_its_upper_bound(method, randomized):
  tol = 0.004  # about 4 standard errors of the mean over TRIALS splits
  coverage, _ = _mean_coverage(method, randomized=randomized, allow_empty=True)
  assert 1 - ALPHA - tol <= coverage <= 1 - ALPHA + 1 / (N_CAL + 1) + tol


def test_default_sets_are_never_empty_and_still_cover():
  coverage, size = _mean_coverage('aps')  # non-randomised, top-1 always in
  assert coverage >= 1 - ALPHA - 0.004
  exact_coverage, exact_size = _mean_coverage('aps', allow_empty=True)
  assert coverage >= exact_coverage and size >= exact_size


def _peaked(rng, n, c=50, hard=0.15):
  """Most images have one dominant class (right); a few are misranked, their true label
  anywhere in a noisy tail: APS then pads every set with tail classes, RAPS does not."""
  y = rng.integers(0, c, n)
  z = rng.normal(size=(n, c))
  top = np.where(rng.random(n) < hard, rng.integers(0, c, n), y)
  z[np.arange(n), top] += 6.0
  return _softmax(z), y


def test_raps_gives_smaller_sets_than_aps_on_a_peaked_distribution():
  rng = np.random.default_rng(1)
  p, y = _peaked(rng, 8000)
  cal, test = slice(0, 3000), slice(3000, None)
  aps = conformal.set_metrics(conformal.prediction_sets(
      p[test], conformal.calibrate(p[cal], y[cal], ALPHA, 'aps')), y[test])
  raps = conformal.set_metrics(conformal.prediction_sets(
      p[test], conformal.calibrate(p[cal], y[cal], ALPHA, 'raps', lam=0.01, k_reg=5)), y[test])
  assert raps['mean_set_size'] < 0.85 * aps['mean_set_size']
  assert min(aps['coverage'], raps['coverage']) >= 1 - ALPHA - 0.015


def test_qhat_is_the_finite_sample_corrected_quantile():
  # APS, non-randomised, true label on top: its score is its own probability
  rng = np.random.default_rng(2)
  top = rng.uniform(0.6, 0.99, size=19)
  probs = np.stack([top, 1 - top], 1)
  labels = np.zeros(19, int)
  # ceil((19 + 1) * 0.9) = 18: the 18th smallest score
  assert conformal.calibrate(probs, labels, 0.1).qhat == np.sort(top)[17]
  # ceil(20 * 0.8) = 16
  assert conformal.calibrate(probs, labels, 0.2).qhat == np.sort(top)[15]
  with pytest.raises(UserError, match='too few for alpha=0.1'):
    conformal.calibrate(probs[:8], labels[:8], 0.1)  # ceil(9 * 0.9) = 9 > 8


def test_raps_score_adds_the_rank_penalty():
  probs = np.array([[0.5, 0.3, 0.2]] * 9)
  labels = np.full(9, 2)  # rank 3: score 0.5 + 0.3 + 0.2 + lam * (3 - k_reg)
  calibration = conformal.calibrate(probs, labels, 0.1, 'raps', lam=0.25, k_reg=1)
  assert calibration.qhat == pytest.approx(1.0 + 0.25 * 2)
  assert conformal.calibrate(probs, labels, 0.1, 'aps', lam=0.25).qhat == pytest.approx(1.0)


def test_sets_are_top_classes_nested_in_alpha_and_survive_json():
  rng = np.random.default_rng(3)
  p, y = _calibrated(rng, 3000)
  loose = conformal.calibrate(p[:1000], y[:1000], 0.2, 'raps', lam=0.05, k_reg=2)
  tight = conformal.calibrate(p[:1000], y[:1000], 0.05, 'raps', lam=0.05, k_reg=2)
  small, big = (conformal.prediction_sets(p[1000:], c) for c in (loose, tight))
  assert np.all(big[small])  # lower alpha: a superset
  # top-L: every class in a set is more probable than every class outside it
  inside = np.where(big, p[1000:], np.inf).min(1)
  outside = np.where(big, -np.inf, p[1000:]).max(1)
  assert np.all(inside >= outside)
  again = conformal.ConformalCalibration.from_json(tight.to_json())
  assert again == tight
  np.testing.assert_array_equal(conformal.prediction_sets(p[1000:], again), big)


def test_randomised_sets_are_reproducible_per_seed_offset():
  rng = np.random.default_rng(4)
  p, y = _calibrated(rng, 2000)
  c = conformal.calibrate(p[:1000], y[:1000], 0.1, randomized=True)
  a = conformal.prediction_sets(p[1000:], c, seed_offset=1)
  np.testing.assert_array_equal(a, conformal.prediction_sets(p[1000:], c, seed_offset=1))
  assert not np.array_equal(a, conformal.prediction_sets(p[1000:], c, seed_offset=2))


def test_set_metrics_by_hand():
  sets = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]], bool)
  labels = np.array([0, 0, 2, 2])
  m = conformal.set_metrics(sets, labels)
  assert m['coverage'] == 0.75 and m['mean_set_size'] == 1.5 and m['empty_sets'] == 0
  np.testing.assert_array_equal(m['per_class']['coverage'], [0.5, np.nan, 1.0])
  np.testing.assert_array_equal(m['per_class']['mean_set_size'], [1.5, np.nan, 1.5])
  np.testing.assert_array_equal(m['per_class']['count'], [2, 0, 2])


def test_raps_k_reg_and_bad_input():
  probs = np.array([[0.6, 0.3, 0.1]] * 9)
  labels = np.array([0] * 6 + [1] * 2 + [2])  # ranks 1 x6, 2 x2, 3 x1; 9th smallest: 3
  assert conformal.raps_k_reg(probs, labels, 0.1) == 3
  assert conformal.raps_k_reg(probs, labels, 0.3) == 2  # ceil(10 * 0.7) = 7th smallest
  with pytest.raises(UserError, match='softmax'):
    conformal.calibrate(np.full((20, 3), 2.0), np.zeros(20, int), 0.1)
  with pytest.raises(UserError, match='aps'):
    conformal.calibrate(probs, labels, 0.1, 'thr')
  with pytest.raises(UserError, match='alpha'):
    conformal.calibrate(probs, labels, 1.0)
