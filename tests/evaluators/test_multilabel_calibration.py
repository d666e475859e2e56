"""Multi-label calibration in the reports: per-class Platt scaling lowers each mis-scaled
class's binary ECE and NLL on held-out data, the report shows both before and after, and a
class Platt does not help is left as is and named so."""

import json

import numpy as np
import pytest

from imgcls.evaluators import calibrated, calibration as cal, reports


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


def _multilabel(n, scales, seed=0):
  """Calibrated logits per class, their 0/1 targets, and the model's logits: the calibrated
  ones times `scales` (3: over-confident; 1: already calibrated)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, len(scales))) * 2.0 + rng.normal(size=len(scales))
  t = (rng.random(z.shape) < _sigmoid(z)).astype(np.int32)
  return z * np.asarray(scales), t


def _fit(logits, targets):
  record = calibrated.fit(logits, targets, multilabel=True, split='val', step=7, weights='raw')
  return json.loads(json.dumps(record))  # as stored with the checkpoint


def test_binary_ece_by_hand_and_as_the_single_label_definition():
  # Class 0, two bins: (0, .5] holds .2 (absent) and .4 (present): |0.5 - 0.3| * 2;
  # (.5, 1] holds .9 (present): |1 - .9| * 1; total / 3. Class 1: all in one bin.
  p = np.array([[.2, .6], [.4, .6], [.9, .6]])
  t = np.array([[0, 1], [1, 0], [1, 1]])
  np.testing.assert_allclose(cal.binary_ece(p, t, 2), [(0.4 + 0.1) / 3, abs(2 / 3 - 0.6)])
  rng = np.random.default_rng(1)
  p, t = rng.random((300, 2)), rng.random((300, 2)) < 0.5
  assert cal.binary_ece(p, t)[1] == cal.ece(p[:, 1], t[:, 1], 15)


def test_platt_lowers_per_class_ece_and_nll_on_held_out_data_and_the_report_shows_both():
  logits, t = _multilabel(6000, [3.0, 3.0, 3.0], seed=2)
  fit, test = slice(0, 3000), slice(3000, None)
  record = _fit(logits[fit], t[fit])
  assert all(record['platt']['kept'])
  summary = record['summary']
  assert summary['ece_after'] < summary['ece_before'] and summary['nll_after'] < summary['nll_before']
  r = reports.multi_label_report(_sigmoid(logits[test]), t[test], ['a', 'b', 'c'],
                                 calibration=record)
  fitted = r.json['calibration_fit']
  per_class = fitted['per_class']
  for k in ('ece', 'nll'):
    before, after = np.array(per_class[f'{k}_before']), np.array(per_class[f'{k}_after'])
    assert np.all(after < before), k  # every class, on data the fit never saw
    assert fitted[f'{k}_before'] == pytest.approx(before.mean())
    assert fitted[f'{k}_after'] == pytest.approx(after.mean())
    assert r.scalars[k] == pytest.approx(after.mean())  # the served (calibrated) scores
    assert r.scalars[f'{k}_uncalibrated'] == pytest.approx(before.mean())
    np.testing.assert_allclose(r.json['per_class'][k], after)
  assert fitted['ece_after'] < 0.5 * fitted['ece_before']
  # the raw numbers are the report's own numbers without a calibration
  raw = reports.multi_label_report(_sigmoid(logits[test]), t[test])
  assert raw.scalars['ece'] == pytest.approx(r.scalars['ece_uncalibrated'])
  assert raw.scalars['nll'] == pytest.approx(r.scalars['nll_uncalibrated'])
  assert 'calibration_fit' not in raw.json and 'ece_uncalibrated' not in raw.scalars
  assert fitted['classes_kept'] == ['a', 'b', 'c'] and fitted['classes_left_as_is'] == []
  assert fitted['split'] == 'val' and fitted['num_bins'] == 15
  # AP is a per-class ranking: a monotone map per class leaves it as it was
  assert r.scalars['map'] == pytest.approx(raw.scalars['map'])
  json.dumps(r.json, allow_nan=False)


def test_a_class_platt_does_not_help_is_left_as_is_and_the_report_says_so():
  logits, t = _multilabel(4000, [3.0, 1.0], seed=3)
  # class 1 is calibrated already: out of fold, its fitted Platt map does no better than the
  # raw sigmoid (for this seed; for about 3 seeds in 4), so it is not kept
  record = _fit(logits, t)
  kept = record['platt']['kept']
  assert kept[0] and not kept[1], kept
  assert record['platt']['a'][1] == 1.0 and record['platt']['b'][1] == 0.0
  r = reports.multi_label_report(_sigmoid(logits), t, ['over', 'fine'], calibration=record)
  fitted = r.json['calibration_fit']
  assert fitted['classes_kept'] == ['over'] and fitted['classes_left_as_is'] == ['fine']
  assert fitted['per_class']['platt_kept'] == [True, False]
  assert 'left as is' in fitted['rule']
  pc = fitted['per_class']
  assert pc['ece_after'][1] == pc['ece_before'][1]  # its scores are served unchanged
  assert pc['nll_after'][1] == pytest.approx(pc['nll_before'][1], abs=1e-9)
  assert pc['nll_after'][0] < pc['nll_before'][0]


def test_report_calibration_errors():
  logits, t = _multilabel(200, [2.0, 2.0])
  record = _fit(logits, t)
  with pytest.raises(Exception, match='recalibrate'):
    reports.multi_label_report(_sigmoid(logits[:, :1]), t[:, :1], calibration=record)
  with pytest.raises(ValueError, match='num_bins'):
    reports.multi_label_report(_sigmoid(logits), t, num_bins=0)
