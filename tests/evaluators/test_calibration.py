"""Temperature scaling, ECE and per-class Platt scaling on synthetic logits whose
calibrated form is known."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from imgcls.errors import UserError
from imgcls.evaluators import calibration as cal


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _calibrated(n, c=10, seed=0):
  """Logits of a perfectly calibrated model: labels drawn from softmax(logits)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, c)) * 2.0
  y = (np.cumsum(_softmax(z), 1) > rng.random((n, 1))).argmax(1)
  return z, y


def test_temperature_recovers_three_and_lowers_ece_and_nll():
  z, y = _calibrated(6000)
  over = 3.0 * z  # over-confident: the calibrated logits times 3
  t = cal.fit_temperature(over[:3000], y[:3000])
  assert t == pytest.approx(3.0, rel=0.08)
  held_out = cal.temperature_summary(over[3000:], y[3000:], t)
  assert held_out['ece_after'] < 0.5 * held_out['ece_before']
  # about as good as the true model's own logits (ECE of finite samples is not 0)
  truth = cal.temperature_summary(z[3000:], y[3000:], 1.0)['ece_before']
  assert held_out['ece_after'] < truth + 0.01
  assert held_out['nll_after'] < held_out['nll_before']
  np.testing.assert_array_equal(cal.apply_temperature(over, t).argmax(1), over.argmax(1))


def test_temperature_of_a_calibrated_model_is_one_and_under_confidence_is_fixed_too():
  z, y = _calibrated(6000, seed=1)
  assert cal.fit_temperature(z, y) == pytest.approx(1.0, rel=0.08)
  assert cal.fit_temperature(z / 2, y) == pytest.approx(0.5, rel=0.08)


def test_temperature_is_the_nll_minimum():
  z, y = _calibrated(2000, seed=2)
  t = cal.fit_temperature(2 * z, y)
  grid = t * np.array([0.97, 0.99, 1.01, 1.03])
  best = cal.nll(2 * z / t, y)
  assert all(cal.nll(2 * z / g, y) > best for g in grid)


def test_temperature_edge_cases():
  y = np.array([0, 1, 2, 0])
  separable = 5.0 * np.eye(3)[y]
  assert cal.fit_temperature(separable, y) == cal.T_MIN  # NLL keeps falling as T -> 0
  with pytest.raises(UserError, match='no better than a uniform guess'):
    cal.fit_temperature(-separable, y)
  with pytest.raises(UserError, match='class ids'):
    cal.fit_temperature(separable, np.array([0, 1, 3, 0]))
  with pytest.raises(UserError, match=r'\[N, C\]'):
    cal.fit_temperature(np.zeros(4), y)


def test_apply_temperature_works_on_jax_arrays():
  z = jnp.array([[1.0, 3.0, -2.0]])
  np.testing.assert_allclose(cal.apply_temperature(z, 2.0), [[0.5, 1.5, -1.0]])


def test_ece_matches_the_reports_definition():
  # The report's ECE lives in reports.py, which is being moved into evaluators/: take it
  # from wherever it is now, so the two definitions can never drift apart.
  for name in ('imgcls.evaluators.reports', 'imgcls.reports'):
    try:
      calibration_bins = importlib.import_module(name).calibration_bins
      break
    except (ImportError, AttributeError):
      continue
  else:
    pytest.skip('no calibration_bins found')
  rng = np.random.default_rng(3)
  conf = np.concatenate([rng.random(500), [0.0, 1.0, 1 / 15, 2 / 15, 0.5]])  # edges too
  correct = rng.random(len(conf)) < conf
  for bins in (1, 10, 15):
    assert cal.ece(conf, correct, bins) == calibration_bins(conf, correct, bins)[0]


def test_ece_by_hand():
  # Two bins: (0, .5] holds 0.3 (wrong) and 0.5 (right): |0.5 - 0.4| * 2; (.5, 1] holds
  # 0.9 (right): |1 - 0.9| * 1; total / 3.
  assert cal.ece([0.3, 0.5, 0.9], [False, True, True], 2) == pytest.approx((0.2 + 0.1) / 3)


def _multilabel(n, scales, seed=0):
  """Calibrated sigmoid logits per class and their 0/1 targets; the model's logits are
  the calibrated ones times `scales`."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, len(scales))) * 2.0
  t = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.int32)
  return z * np.asarray(scales), t


def test_platt_recovers_the_scale_per_class():
  logits, t = _multilabel(8000, [3.0, 1.0, 0.5])
  a, b = cal.fit_platt(logits, t)
  np.testing.assert_allclose(a, [1 / 3, 1.0, 2.0], rtol=0.1)
  np.testing.assert_allclose(b, 0.0, atol=0.1)


def test_platt_kept_only_where_it_helps_and_lowers_held_out_nll():
  logits, t = _multilabel(8000, [3.0, 3.0, 1.0, 1.0, 0.4], seed=1)
  fit, test = slice(0, 4000), slice(4000, None)
  scaling = cal.fit_platt_where_it_helps(logits[fit], t[fit])
  assert scaling.kept[[0, 1, 4]].all()  # mis-scaled classes keep their map
  raw = cal.binary_nll(logits[test], t[test])
  calibrated = cal.binary_nll(cal.apply_platt(logits[test], scaling), t[test])
  assert np.all(calibrated[[0, 1, 4]] < raw[[0, 1, 4]] - 0.01)
  assert np.all(calibrated <= raw + 2e-3)  # the calibrated classes lose (almost) nothing
  np.testing.assert_array_equal(scaling.a[~scaling.kept], 1.0)
  np.testing.assert_array_equal(scaling.b[~scaling.kept], 0.0)
  again = cal.PlattScaling.from_dict(scaling.to_dict())
  np.testing.assert_array_equal(again.a, scaling.a)
  np.testing.assert_array_equal(again.kept, scaling.kept)


def test_platt_stays_finite_on_separable_classes():
  t = np.array([[0, 1], [0, 1], [1, 0], [1, 0]])
  a, b = cal.fit_platt(np.where(t, 4.0, -4.0), t)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  with pytest.raises(UserError, match='multi-hot'):
    cal.fit_platt(np.zeros((4, 2)), np.full((4, 2), 0.5))
