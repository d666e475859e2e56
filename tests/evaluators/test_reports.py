"""Evaluation reports: numbers against hand and brute-force values, files on disk."""

import json
import os

import numpy as np
import pytest

from imgcls.evaluators import reports

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _onehot_probs(pred, c, p=0.9):
  """[N, C] probabilities putting p on `pred` and the rest evenly elsewhere."""
  probs = np.full((len(pred), c), (1 - p) / (c - 1))
  probs[np.arange(len(pred)), pred] = p
  return probs


def _brute_ap(scores, targets):
  """AP straight from the definition: mean over positives of precision at score >= theirs."""
  precisions = []
  for i in range(len(scores)):
    if targets[i]:
      above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
      precisions.append(sum(targets[j] for j in above) / len(above))
  return np.mean(precisions) if precisions else np.nan


def _brute_f1(pred, targets):
  tp = fp = fn = 0
  per_class = []
  for k in range(pred.shape[1]):
    a = sum(pred[i, k] and targets[i, k] for i in range(len(pred)))
    b = sum(pred[i, k] and not targets[i, k] for i in range(len(pred)))
    d = sum(not pred[i, k] and targets[i, k] for i in range(len(pred)))
    tp, fp, fn = tp + a, fp + b, fn + d
    if a + b + d:
      per_class.append(2 * a / (2 * a + b + d))
  return 2 * tp / (2 * tp + fp + fn), np.mean(per_class)


# ------------------------------------------------------------------ single-label

def test_confusion_matrix_and_per_class_accuracy():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
  pred = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2, 3])
  r = reports.single_label_report(_onehot_probs(pred, 4), labels, ['a', 'b', 'c', 'd'])
  assert r.json['confusion_matrix'] == [[2, 1, 0, 0],   # rows: true, columns: predicted
                                        [0, 1, 1, 0],
                                        [1, 0, 3, 0],
                                        [0, 0, 0, 1]]
  assert r.json['per_class']['count'] == [3, 2, 4, 1]
  np.testing.assert_allclose(r.json['per_class']['accuracy'], [2 / 3, 1 / 2, 3 / 4, 1])
  assert r.scalars['top1'] == pytest.approx(0.7)
  assert r.scalars['mean_class_accuracy'] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4 + 1) / 4)
  assert 'top5' not in r.scalars  # only 4 classes
  assert r.images['confusion_matrix'].dtype == np.uint8
  assert r.images['confusion_matrix'].ndim == 3 and r.images['confusion_matrix'].shape[2] == 3


def test_class_without_examples_is_none_not_zero():
  r = reports.single_label_report(_onehot_probs([0, 1], 3), np.array([0, 1]))
  assert r.json['per_class']['accuracy'] == [1.0, 1.0, None]
  assert r.scalars['mean_class_accuracy'] == 1.0


def test_top5_by_hand():
  probs = np.array([[.30, .20, .15, .12, .10, .08, .05],   # label 4: rank 5 -> in top 5
                    [.30, .20, .15, .12, .10, .08, .05],   # label 5: rank 6 -> out
                    [.05, .08, .10, .12, .15, .20, .30]])  # label 6: rank 1
  r = reports.single_label_report(probs, np.array([4, 5, 6]))
  assert r.scalars['top1'] == pytest.approx(1 / 3)
  assert r.scalars['top5'] == pytest.approx(2 / 3)


@pytest.mark.parametrize('num_correct, expected', [(9, 0.0), (6, 0.3), (10, 0.1)])
def test_ece_single_bin(num_correct, expected):
  labels = np.zeros(10, int)
  pred = np.array([0] * num_correct + [1] * (10 - num_correct))
  r = reports.single_label_report(_onehot_probs(pred, 2, p=0.9), labels)
  assert r.scalars['ece'] == pytest.approx(expected, abs=1e-12)
  cal = r.json['calibration']
  (b,) = [i for i, n in enumerate(cal['count']) if n]
  assert cal['count'][b] == 10 and cal['edges'][b] < 0.9 <= cal['edges'][b + 1]
  assert cal['accuracy'][b] == pytest.approx(num_correct / 10)
  assert cal['accuracy'][0] is None  # empty bin


def test_ece_two_bins_by_hand():
  # 4 at confidence 0.95 (3 right), 4 at 0.55 (1 right), 10 bins:
  # ECE = 4/8 * |0.75 - 0.95| + 4/8 * |0.25 - 0.55| = 0.1 + 0.15.
  probs = np.array([[.95, .05]] * 4 + [[.55, .45]] * 4)
  labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
  r = reports.single_label_report(probs, labels, num_bins=10)
  assert r.scalars['ece'] == pytest.approx(0.25)
  assert r.json['calibration']['count'] == [0, 0, 0, 0, 0, 4, 0, 0, 0, 4]
  _, bins = reports.calibration_bins(np.array([0.0, 0.5, 1.0]), np.ones(3, bool), 2)
  assert bins['count'].tolist() == [2, 1]  # (lo, hi] bins; 0 joins the first


def test_most_confidently_wrong_order_and_grid():
  labels = np.array([0, 1, 2, 0, 1, 2, 0])
  # wrong at 1 (p=.6), 2 (p=.9), 4 (p=.7), 6 (p=.9: ties keep index order); 0, 3, 5 right.
  probs = np.array([[.8, .1, .1], [.6, .3, .1], [.05, .9, .05], [.5, .3, .2],
                    [.1, .2, .7], [.2, .2, .6], [.05, .05, .9]])
  images = np.random.default_rng(0).normal(size=(7, 8, 8, 1)) * 50 + 100  # any range
  r = reports.single_label_report(probs, labels, ['cat', 'dog', 'fox'], images=images,
                                  grid_size=3)
  errors = r.json['confident_errors']
  assert [e['index'] for e in errors] == [2, 6, 4]
  assert errors[0] == {'index': 2, 'true': 2, 'pred': 1, 'prob': pytest.approx(0.9)}
  grid = r.images['confident_errors']
  assert grid.dtype == np.uint8 and grid.shape[2] == 3 and grid.std() > 0
  rgb = reports.single_label_report(probs, labels, images=np.random.default_rng(1).random(
      (7, 6, 6, 3)))
  assert len(rgb.json['confident_errors']) == 4 and 'confident_errors' in rgb.images
  assert 'confident_errors' not in reports.single_label_report(probs, labels).images


def test_confident_error_grid_with_saliency_overlays(tmp_path):
  """A map is drawn over its image where it is above its minimum, and nowhere else; a
  constant map draws nothing (explain.grid_maps gives the maps in a run)."""
  labels, probs = np.array([0, 1]), np.array([[.2, .8], [.9, .1]])  # both wrong
  images = np.random.default_rng(0).random((2, 16, 16, 1))
  right = np.zeros((16, 16))
  right[:, 8:] = 1.0  # the right half of each image only
  full = np.ones((16, 16))
  full[0, 0] = 0.0

  def grid(saliency):
    r = reports.single_label_report(probs, labels, images=images, saliency=saliency)
    return r, r.images['confident_errors'].astype(int)
  _, flat = grid({0: np.zeros((16, 16)), 1: np.full((16, 16), 3.0)})
  report, half = grid({0: right, 1: right})
  _, whole = grid({0: full, 1: full})
  plain = reports.single_label_report(probs, labels, images=images).images['confident_errors']
  assert plain.shape == flat.shape and flat.std() > 0
  cols = np.flatnonzero(np.any(whole != flat, axis=(0, 2)))  # the two images' columns
  changed = np.flatnonzero(np.any(half != flat, axis=(0, 2)))
  gap = np.argmax(np.diff(cols))  # the images stand side by side
  for panel in (cols[:gap + 1], cols[gap + 1:]):
    inside = changed[(changed >= panel.min()) & (changed <= panel.max())]
    assert len(inside) and inside.min() >= (panel.min() + panel.max()) / 2 - 1
  path = reports.write_report(report, tmp_path / 'eval', step=1)['confident_errors']
  _check_png(path)


def test_many_classes_still_render():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 120))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  r = reports.single_label_report(probs, rng.integers(0, 120, 300))
  assert 0 <= r.scalars['top5'] <= 1
  assert np.array(r.json['confusion_matrix']).sum() == 300
  assert r.images['confusion_matrix'].shape[0] > 500  # bigger canvas for more classes


# ------------------------------------------------------------------ multi-label

def test_average_precision_by_hand_with_ties():
  s = np.array([[.9, .5], [.8, .5], [.7, .5], [.6, .1]])
  t = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
  # column 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2
  # column 1: three tied at .5 (one positive) -> 1/3; last positive at 4 -> 2/4
  np.testing.assert_allclose(reports.average_precision(s, t),
                             [(1 + 2 / 3) / 2, (1 / 3 + 2 / 4) / 2])
  ap = reports.average_precision(np.array([[.5], [.5]]), np.array([[0], [1]]))
  assert ap[0] == pytest.approx(0.5)  # a tie does not depend on which comes first
  assert reports.average_precision(np.array([[.5], [.5]]), np.array([[1], [0]]))[0] == 0.5


def test_average_precision_matches_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(30):
    n, c = rng.integers(1, 9), rng.integers(1, 5)
    scores = rng.integers(0, 4, (n, c)) / 4 if trial % 2 else rng.random((n, c))  # many ties
    targets = rng.random((n, c)) < 0.4
    got = reports.average_precision(scores, targets)
    want = [_brute_ap(scores[:, k], targets[:, k]) for k in range(c)]
    np.testing.assert_allclose(got, want, err_msg=f'trial {trial}')


def test_map_excludes_classes_without_positives():
  scores = np.array([[.9, .2, .4], [.1, .8, .3], [.7, .6, .2]])
  targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
  r = reports.multi_label_report(scores, targets, ['x', 'y', 'z'])
  assert r.json['per_class']['ap'] == [1.0, 1.0, None]
  assert r.json['ap_classes_excluded'] == 1
  assert r.scalars['map'] == pytest.approx(1.0)
  assert r.json['per_class']['positives'] == [2, 1, 0]


def test_f1_at_threshold_by_hand():
  scores = np.array([[.9, .6, .1], [.4, .7, .2], [.8, .3, .55], [.2, .1, .05]])
  targets = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0]])
  r = reports.multi_label_report(scores, targets, threshold=0.5)
  # >= .5 predicts (0,0) (0,1) (1,1) (2,0) (2,2): TP 4, FP 1, FN 1 -> micro 8/10.
  # class 0: TP 2 FN 1 -> 4/5; class 1: TP 1 FP 1 -> 2/3; class 2: TP 1 -> 1.
  assert r.scalars['f1_micro'] == pytest.approx(0.8)
  assert r.scalars['f1_macro'] == pytest.approx((4 / 5 + 2 / 3 + 1) / 3)
  micro, macro = _brute_f1(scores >= 0.5, targets.astype(bool))
  assert (micro, macro) == pytest.approx((r.scalars['f1_micro'], r.scalars['f1_macro']))
  # A class with no positives and no predictions is left out of the macro mean.
  _, macro2, per_class = reports.f1_scores(np.array([[True, False]]), np.array([[True, False]]))
  assert macro2 == 1.0 and np.isnan(per_class[1])


def test_tuned_threshold_maximises_validation_f1():
  rng = np.random.default_rng(0)
  val_t = rng.random((60, 4)) < 0.3
  val_s = np.clip(np.where(val_t, 0.35, 0.2) + rng.normal(0, 0.15, val_t.shape), 0, 1)
  val_s = np.round(val_s, 2)  # ties among the candidates
  test_t = rng.random((40, 4)) < 0.3
  test_s = np.clip(np.where(test_t, 0.35, 0.2) + rng.normal(0, 0.15, test_t.shape), 0, 1)
  r = reports.multi_label_report(test_s, test_t, val_scores=val_s, val_targets=val_t)
  tuned = r.scalars['threshold_tuned']
  best = _brute_f1(val_s >= tuned, val_t)[0]
  assert r.json['tuned']['val_f1_micro'] == pytest.approx(best)
  candidates = np.concatenate([np.unique(val_s), np.linspace(0, 1, 1001)])
  assert best >= max(_brute_f1(val_s >= c, val_t)[0] for c in candidates) - 1e-12
  assert best > _brute_f1(val_s >= 0.5, val_t)[0]  # 0.5 is a poor threshold for these scores
  assert r.scalars['f1_micro_tuned'] == pytest.approx(_brute_f1(test_s >= tuned, test_t)[0])
  assert r.scalars['f1_macro_tuned'] == pytest.approx(_brute_f1(test_s >= tuned, test_t)[1])


def test_micro_f1_curve_is_exact():
  s = np.array([[.9, .5], [.5, .2], [.2, .9]])
  t = np.array([[1, 0], [1, 0], [0, 1]])
  thresholds, f1 = reports.micro_f1_curve(s, t)
  np.testing.assert_allclose(thresholds, [.9, .5, .2])
  for th, f in zip(thresholds, f1):
    assert f == pytest.approx(_brute_f1(s >= th, t.astype(bool))[0])


# ------------------------------------------------------------------ writing

def _check_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(path) > 5000  # a real figure, not an empty canvas


def test_write_report_single_label(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(10), 50)
  r = reports.single_label_report(probs, rng.integers(0, 10, 50), [f'c{i}' for i in range(10)],
                                  images=rng.random((50, 8, 8, 1)))
  paths = reports.write_report(r, tmp_path / 'eval', step=np.int64(100))  # as from a loop
  assert set(paths) == {'json', 'confusion_matrix', 'reliability', 'confident_errors',
                        'risk_coverage'}
  assert paths['json'].endswith('report_100.json')
  for name in r.images:
    assert paths[name].endswith(f'{name}_100.png')
    _check_png(paths[name])
  with open(paths['json']) as f:
    loaded = json.load(f)
  assert loaded['step'] == 100
  assert loaded['images']['reliability'] == 'reliability_100.png'
  assert {k: v for k, v in loaded.items() if k not in ('step', 'images')} == r.json


def test_write_report_multi_label(tmp_path):
  rng = np.random.default_rng(0)
  targets = rng.random((30, 5)) < 0.3
  targets[:, 4] = False  # a class with no positives: None in the JSON
  r = reports.multi_label_report(rng.random((30, 5)), targets, val_scores=rng.random((20, 5)),
                                 val_targets=rng.random((20, 5)) < 0.3)
  paths = reports.write_report(r, tmp_path)
  assert set(paths) == {'json', 'ap_per_class', 'f1_threshold'}
  for name in r.images:
    _check_png(paths[name])
  with open(paths['json']) as f:
    loaded = json.load(f)
  assert loaded['step'] is None and loaded['per_class']['ap'][4] is None
  assert loaded['scalars'] == pytest.approx(r.scalars)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize('probs, labels, kw, match', [
    (np.zeros((0, 3)), np.zeros(0, int), {}, r'shape \(0, 3\).*expected.*\[N, C\].*N > 0'),
    (np.full(3, 1 / 3), np.zeros(3, int), {}, r'probs has shape \(3,\).*expected.*\[N, C\]'),
    (np.array([['a', 'b']]), np.zeros(1, int), {}, r'dtype <U1; expected numbers'),
    (np.full((4, 3), 1 / 3), np.zeros(5, int), {}, r'labels has shape \(5,\); expected \[N\]'),
    (np.full((4, 3), 1 / 3), np.eye(3)[[0, 1, 2, 0]], {}, r'labels has shape \(4, 3\).*one-hot'),
    (np.full((2, 3), 1 / 3), np.array([0, 3]), {}, r'labels lie in \[0, 3\].*\[0, 2\]'),
    (np.full((2, 3), 1 / 3), np.array([0., 1.]), {}, 'expected integer class ids'),
    (np.array([[2., -1.]]), np.array([0]), {}, 'look like logits: apply softmax'),
    (np.array([[np.nan, .5]]), np.array([0]), {}, 'NaN/inf'),
    (np.full((2, 2), .5), np.array([0, 1]), {'label_names': ['a']}, 'label_names has 1'),
    (np.full((2, 2), .5), np.array([0, 1]), {'images': np.zeros((3, 4, 4, 1))},
     r'images has shape \(3, 4, 4, 1\).*N = 2'),
    (np.full((2, 2), .5), np.array([0, 1]), {'num_bins': 0}, 'num_bins=0'),
])
def test_single_label_bad_input(probs, labels, kw, match):
  with pytest.raises(ValueError, match=match):
    reports.single_label_report(probs, labels, **kw)


@pytest.mark.parametrize('kw, match', [
    ({'targets': np.ones((4, 2))}, r'targets has shape \(4, 2\); expected \(4, 3\)'),
    ({'targets': np.full((4, 3), 2)}, 'other than 0 and 1'),
    ({'threshold': 1.5}, r'threshold is 1.5; expected a score in \[0, 1\]'),
    ({'val_scores': np.zeros((2, 3))}, 'both val_scores and val_targets'),
    ({'val_scores': np.zeros((2, 2)), 'val_targets': np.zeros((2, 2))},
     'val_scores has 2 classes; expected C = 3'),
    ({'val_scores': np.zeros((2, 3)), 'val_targets': np.zeros((3, 3))},
     r'val_targets has shape \(3, 3\); expected \(2, 3\)'),
    ({'scores': np.full((4, 3), 3.0)}, 'apply sigmoid'),
])
def test_multi_label_bad_input(kw, match):
  args = {'scores': np.full((4, 3), .5), 'targets': np.zeros((4, 3))} | kw
  with pytest.raises(ValueError, match=match):
    reports.multi_label_report(**args)
