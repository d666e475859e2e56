"""Risk-coverage, AURC and the threshold for a target risk, against closed forms and by hand."""

import numpy as np
import pytest

from imgcls.errors import UserError
from imgcls.evaluators import selective


def _perfect_aurc(n, e):
  """AURC when all e errors rank below all n - e correct answers (no ties)."""
  harmonic = lambda m: np.sum(1 / np.arange(1, m + 1))
  return e / n - (1 - e / n) * (harmonic(n) - harmonic(n - e))


@pytest.mark.parametrize('n,e', [(10, 3), (1000, 87), (50, 0), (7, 7)])
def test_aurc_of_a_perfect_ranking_is_the_closed_form(n, e):
  rng = np.random.default_rng(n)
  correct = np.arange(n) >= e  # errors first ...
  confidence = np.sort(rng.random(n))  # ... with the lowest confidences
  perm = rng.permutation(n)
  assert selective.aurc(confidence[perm], correct[perm]) == pytest.approx(_perfect_aurc(n, e))


def test_aurc_of_the_worst_ranking_and_of_all_ties():
  correct = np.array([False] * 3 + [True] * 7)
  worst = selective.aurc(np.linspace(1, 0, 10), correct)  # errors most confident
  assert worst == pytest.approx(np.mean([min(k, 3) / k for k in range(1, 11)]))
  # all tied: the expected risk at every coverage is the error rate, whatever the order
  assert selective.aurc(np.full(10, 0.7), correct) == pytest.approx(0.3)
  assert selective.aurc(np.full(10, 0.7), correct[::-1]) == pytest.approx(0.3)
  # any ranking lies between (its risk at each coverage does)
  for seed in range(20):
    random = selective.aurc(np.random.default_rng(seed).random(10), correct)
    assert _perfect_aurc(10, 3) - 1e-12 <= random <= worst + 1e-12


def test_risk_coverage_by_hand_with_ties():
  conf = [0.9, 0.8, 0.8, 0.6, 0.3]
  correct = [True, True, False, True, False]
  curve = selective.risk_coverage(conf, correct)
  np.testing.assert_allclose(curve.threshold, [0.9, 0.8, 0.6, 0.3])
  np.testing.assert_allclose(curve.coverage, [0.2, 0.6, 0.8, 1.0])
  np.testing.assert_allclose(curve.risk, [0.0, 1 / 3, 1 / 4, 2 / 5])


def test_threshold_for_risk_hits_the_target_on_validation():
  rng = np.random.default_rng(1)
  conf = rng.random(5000)
  correct = rng.random(5000) < conf  # calibrated: the error rate falls with confidence
  for max_risk in (0.05, 0.1, 0.2):
    chosen = selective.threshold_for_risk(conf, correct, max_risk)
    coverage, risk = selective.selective_risk(conf, correct, chosen.threshold)
    assert risk <= max_risk and risk == pytest.approx(chosen.risk)
    assert coverage == pytest.approx(chosen.coverage)
    # the most coverage: one more example (the next lower confidence) breaks the target
    lower = np.max(conf[conf < chosen.threshold])
    assert selective.selective_risk(conf, correct, lower)[1] > max_risk
  # an overall error rate below the target answers everything
  everything = selective.threshold_for_risk(conf, correct, 0.6)
  assert everything.coverage == 1.0 and everything.threshold == conf.min()


def test_threshold_for_risk_takes_the_largest_coverage_when_risk_is_not_monotone():
  conf = [0.9, 0.8, 0.7, 0.6]
  correct = [False, True, True, True]  # risk 1, 1/2, 1/3, 1/4
  chosen = selective.threshold_for_risk(conf, correct, 0.4)
  assert (chosen.threshold, chosen.coverage, chosen.risk) == (0.6, 1.0, 0.25)


def test_threshold_for_risk_says_when_no_threshold_reaches_it():
  with pytest.raises(UserError, match=r'no confidence threshold reaches max_risk=0.1 .*0.5'):
    selective.threshold_for_risk([0.9, 0.9, 0.5], [True, False, False], 0.1)
  with pytest.raises(UserError, match='max_risk'):
    selective.threshold_for_risk([0.9], [True], 1.5)
  with pytest.raises(UserError, match=r'\[N\]'):
    selective.aurc([0.9, 0.8], [True])
  assert np.isnan(selective.selective_risk([0.5], [True], 0.9)[1])
