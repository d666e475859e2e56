"""Calibration wired end to end on a tiny trained run: `imgcls calibrate` stores a temperature
with the step (never fitted on the training split) and imgcls.load, predict, export and the
eval reports apply it; predict abstains and writes conformal sets; `imgcls explain` writes maps
at each image's size; an uncalibrated checkpoint behaves as before."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import onnxruntime as ort
from PIL import Image
import pytest

import imgcls
from imgcls import checkpoints, export, predict, train
from imgcls.errors import UserError
from imgcls.evaluators import calibrated
from imgcls.evaluators.checkpoint import (CalibrationError, calibrate_checkpoint,
                                          evaluate_checkpoint)

from helpers import NUM_TEST, make_tiny_config, write_test_split_pngs

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  """The tiny config trained 12 steps (no val_split: nothing calibrated at the end)."""
  workdir = str(tmp_path_factory.mktemp('calib') / 'run')
  train.train_and_evaluate(make_tiny_config(data_dir), workdir)
  return workdir


@pytest.fixture(scope='module')
def pngs(data_dir, tmp_path_factory):
  """The synthetic test split as PNGs, LABEL/i.png."""
  root = tmp_path_factory.mktemp('calib_pngs')
  write_test_split_pngs(data_dir, root)
  return sorted(str(p) for p in root.glob('*/*.png'))


def _cli(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'imgcls.main', *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=300)


def _raw_softmax(clf, files):
  logits = clf.model.apply(clf.variables, clf.preprocess(files), train=False)
  return np.asarray(jax.nn.softmax(np.asarray(logits, np.float64), -1))


def test_uncalibrated_checkpoint_is_served_as_before(run, pngs, tmp_path):
  clf = imgcls.load(run)
  assert clf.calibration is None
  np.testing.assert_allclose(clf.probabilities(pngs[:5]), _raw_softmax(clf, pngs[:5]),
                             atol=1e-5)
  with pytest.raises(UserError, match='imgcls calibrate'):
    predict.predict(run, pngs[:3], str(tmp_path / 'p.csv'), conformal=0.1, progress=None)
  proc = _cli('predict', f'--workdir={run}', f'--out={tmp_path / "q.csv"}', '--conformal=0.1',
              pngs[0])
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith('imgcls: error:')]
  assert len(lines) == 1 and 'imgcls calibrate' in lines[0], proc.stderr[-2000:]


def test_calibrate_refuses_the_training_split(run):
  for split in ('train', 'train[:50%]'):
    with pytest.raises(CalibrationError, match='training split'):
      calibrate_checkpoint(run, split=split)
  with pytest.raises(CalibrationError, match='--split'):
    calibrate_checkpoint(run)  # no val_split in the run: name one


@pytest.fixture(scope='module')
def calibrated_run(run, pngs):
  del pngs  # made before the calibration: the uncalibrated tests above ran on the same run
  first = calibrate_checkpoint(run, split='test[:20]')
  assert first['split'] == 'test[:20]' and first['examples'] == 20
  result = calibrate_checkpoint(run, split='test')  # a recalibration replaces the first
  assert result['split'] == 'test' and result['examples'] == NUM_TEST
  return run, result


def test_stored_temperature_is_applied_by_load_predict_and_export(calibrated_run, pngs,
                                                                   tmp_path):
  run, result = calibrated_run
  ckpt = checkpoints.find(run)
  stored = ckpt.calibration
  assert stored['kind'] == 'temperature' and stored['split'] == 'test'
  assert (ckpt.path / checkpoints.CALIBRATION_FILE).exists()
  t = stored['temperature']
  assert t == result['temperature'] and t != 1.0
  clf = imgcls.load(run)
  assert clf.calibration['temperature'] == t
  logits = np.asarray(clf.model.apply(clf.variables, clf.preprocess(pngs), train=False),
                      np.float64)
  expected = np.asarray(jax.nn.softmax(logits / t, -1))
  probs = clf.probabilities(pngs)
  np.testing.assert_allclose(probs, expected, atol=1e-5)
  np.testing.assert_allclose(clf.probabilities(pngs, calibrated=False),
                             np.asarray(jax.nn.softmax(logits, -1)), atol=1e-5)
  assert (probs.argmax(-1) == logits.argmax(-1)).all()  # top-1 unchanged
  # predict's probabilities are the calibrated ones
  out = tmp_path / 'p.csv'
  summary = predict.predict(run, pngs, str(out), top_k=1, progress=None)
  assert 'temperature' in summary['calibration']
  rows = list(csv.DictReader(out.open()))
  np.testing.assert_allclose([float(r['prob_1']) for r in rows], probs.max(-1), atol=1e-6)
  # the exported graph divides by T: ONNX equals imgcls.load within 1e-5
  meta = export.export_classifier(clf, 'onnx', str(tmp_path / 'm.onnx'))
  assert meta['verification']['max_abs_diff'] <= 1e-5
  assert 'temperature' in meta['output']['calibration']
  images = np.stack([np.asarray(Image.open(p))[..., None] for p in pngs])
  session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(session.run(None, {'images': images})[0], probs, atol=1e-5)


def test_predict_abstains_and_writes_conformal_sets(calibrated_run, pngs, tmp_path):
  run, _ = calibrated_run
  clf = imgcls.load(run)
  conf = clf.probabilities(pngs).max(-1)
  c = float(np.median(conf))
  out = tmp_path / 'abstain.csv'
  summary = predict.predict(run, pngs, str(out), min_confidence=c, progress=None)
  rows = list(csv.DictReader(out.open()))
  assert list(rows[0])[:3] == ['path', 'abstain', 'label_1']
  abstained = [r for r in rows if r['abstain'] == 'abstain']
  assert len(abstained) == int(np.sum(conf < c)) > 0
  assert all(r['label_1'] for r in abstained)  # the would-be label stays for the reviewer
  assert summary['coverage'] == pytest.approx(np.mean(conf >= c))
  assert summary['abstained'] == len(abstained)
  # max_risk: the threshold chosen on the calibration split
  chosen = calibrated.risk_threshold(clf.calibration, 1.0)
  summary = predict.predict(run, pngs, str(tmp_path / 'r.csv'), max_risk=1.0, progress=None)
  assert summary['confidence_threshold'] == chosen.threshold and summary['coverage'] == 1.0
  assert 'max_risk=1.0' in summary['threshold_source']
  # conformal sets beside the path column; coverage on the (here: same) held-out split
  out = tmp_path / 'sets.csv'
  summary = predict.predict(run, pngs, str(out), conformal=0.1, progress=None)
  rows = list(csv.DictReader(out.open()))
  assert list(rows[0])[:2] == ['path', 'set_90']
  truth = [pathlib.Path(r['path']).parent.name for r in rows]
  sets = [r['set_90'].split(';') if r['set_90'] else [] for r in rows]
  covered = np.mean([t in s for t, s in zip(truth, sets)])
  assert covered >= 0.9  # calibrated on these very examples: at least 1 - alpha
  assert summary['mean_set_size'] == pytest.approx(np.mean([len(s) for s in sets]))
  masks = calibrated.prediction_sets(clf.probabilities(pngs),
                                    calibrated.conformal_for(clf.calibration, 0.1))
  assert [sorted(s) for s in sets] == [sorted(clf.label_names[i] for i in np.flatnonzero(m))
                                       for m in masks]
  jsonl = tmp_path / 'sets.jsonl'
  predict.predict(run, pngs[:2], str(jsonl), conformal=0.1, min_confidence=0.5, progress=None)
  row = json.loads(jsonl.read_text().splitlines()[0])
  assert list(row)[:3] == ['path', 'set_90', 'abstain'] and isinstance(row['set_90'], list)


def test_eval_reports_calibration_selective_and_conformal(calibrated_run):
  run, result = calibrated_run
  scored = evaluate_checkpoint(run, split='test')
  for key in ('aurc', 'balanced_accuracy', 'macro_f1', 'ece', 'ece_uncalibrated', 'nll',
              'nll_uncalibrated', 'set_90_coverage', 'set_90_mean_size'):
    assert key in scored, key
  assert scored['ece'] == pytest.approx(result['ece_after'], abs=1e-4)
  assert scored['ece_uncalibrated'] == pytest.approx(result['ece_before'], abs=1e-4)
  assert scored['set_90_coverage'] >= 0.9
  folder = pathlib.Path(scored['reports'])
  report = json.loads(next(folder.glob('report_*.json')).read_text())
  assert report['conformal']['set_90']['per_class']['coverage']
  assert report['calibration_fit']['split'] == 'test'
  assert len(report['per_class']['recall']) == 4
  assert list(folder.glob('risk_coverage_*.png'))


def test_explain_command_writes_maps_at_the_image_size(calibrated_run, pngs, tmp_path):
  run, _ = calibrated_run
  proc = _cli('explain', f'--workdir={run}', f'--out={tmp_path / "maps"}', pngs[0], pngs[1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'saliency maps of 2 files' in proc.stdout
  for p in pngs[:2]:
    stem = pathlib.Path(p).stem
    saliency = np.load(tmp_path / 'maps' / f'{stem}.npy')
    assert saliency.shape == np.asarray(Image.open(p)).shape[:2]
    assert (tmp_path / 'maps' / f'{stem}.png').exists()
  maps = imgcls.load(run).explain(pngs[:2], method='gradcam')
  assert len(maps) == 2


def test_multilabel_platt_is_stored_and_applied_like_the_temperature():
  rng = np.random.default_rng(0)
  targets = (rng.random((400, 3)) < 0.4).astype(int)
  logits = 3.0 * (2 * targets - 1) + rng.normal(0, 2, (400, 3))  # overconfident scale
  record = calibrated.fit(logits, targets, multilabel=True, split='val', step=1, weights='raw')
  assert record['kind'] == 'platt' and record['summary']['nll_after'] <= record['summary']['nll_before']
  record = json.loads(json.dumps(record))  # as stored
  a, b = (np.asarray(record['platt'][k]) for k in ('a', 'b'))
  np.testing.assert_allclose(calibrated.calibrated_logits(logits, record), logits * a + b,
                             atol=1e-5)  # a, b applied in float32, as in the graph
  assert calibrated.calibrated_logits(logits, None) is logits
  with pytest.raises(UserError, match='single-label'):
    calibrated.conformal_for(record, 0.1)


@pytest.fixture(scope='module')
def multilabel_run(data_dir, tmp_path_factory):
  """The tiny config trained multi-label (sigmoid, one-hot as multi-hot), 12 steps."""
  c = make_tiny_config(data_dir, loss='sigmoid_xent')
  c.pp_train = "decode|flip_lr|value_range(-1, 1)|multihot(4, 'label')"
  c.pp_eval = "decode|value_range(-1, 1)|multihot(4, 'label')"
  workdir = str(tmp_path_factory.mktemp('calib_ml') / 'run')
  train.train_and_evaluate(c, workdir)
  return workdir


def test_multilabel_calibrate_cli_stores_platt_and_the_report_shows_before_and_after(
    multilabel_run, pngs, tmp_path):
  run = multilabel_run
  proc = _cli('calibrate', f'--workdir={run}', '--split=test')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'kind=platt' in proc.stdout and 'ece_after=' in proc.stdout, proc.stdout
  stored = checkpoints.find(run).calibration
  assert stored['kind'] == 'platt' and stored['split'] == 'test'
  assert stored['examples'] == NUM_TEST and len(stored['platt']['a']) == 4
  summary = stored['summary']
  assert summary['nll_after'] <= summary['nll_before'] + 1e-6  # no worse where it was fitted
  assert 0 <= summary['threshold_tuned'] <= 1  # micro-F1 threshold of the calibrated scores
  # `imgcls eval` of the calibrated checkpoint: per-class ECE/NLL before and after
  scored = evaluate_checkpoint(run, split='test')
  assert scored['nll'] == pytest.approx(summary['nll_after'], abs=1e-4)
  assert scored['nll_uncalibrated'] == pytest.approx(summary['nll_before'], abs=1e-4)
  assert scored['ece'] == pytest.approx(summary['ece_after'], abs=1e-4)
  assert scored['ece_uncalibrated'] == pytest.approx(summary['ece_before'], abs=1e-4)
  report = json.loads(next(pathlib.Path(scored['reports']).glob('report_*.json')).read_text())
  fit = report['calibration_fit']
  assert fit['kind'] == 'platt' and fit['split'] == 'test'
  for k in ('ece_before', 'ece_after', 'nll_before', 'nll_after', 'platt_kept'):
    assert len(fit['per_class'][k]) == 4, k
  assert len(fit['classes_kept']) == sum(stored['platt']['kept'])
  assert len(fit['classes_kept']) + len(fit['classes_left_as_is']) == 4
  # labels are cut at the threshold tuned on the calibrated scores, which are what is served
  threshold, source = imgcls.load(run).decision_threshold()
  assert threshold == summary['threshold_tuned'] and "calibration's" in source, source
  # a known Platt map: imgcls.load, predict and the exported graph all apply it
  a, b = [0.5, 2.0, 1.0, 1.5], [0.3, -0.2, 0.0, 0.1]
  ckpt = checkpoints.find(run)
  ckpt.write_calibration(dict(stored, platt={'a': a, 'b': b, 'kept': [1, 1, 0, 1]}))
  clf = imgcls.load(run)
  logits = np.asarray(clf.model.apply(clf.variables, clf.preprocess(pngs), train=False),
                      np.float64)
  probs = clf.probabilities(pngs)
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-(logits * a + b))), atol=1e-5)
  np.testing.assert_allclose(clf.probabilities(pngs, calibrated=False),
                             1 / (1 + np.exp(-logits)), atol=1e-5)
  out = tmp_path / 'p.csv'
  assert 'Platt' in predict.predict(run, pngs, str(out), top_k=4, progress=None)['calibration']
  rows = list(csv.DictReader(out.open()))
  np.testing.assert_allclose([float(r['prob_1']) for r in rows], probs.max(-1), atol=1e-6)
  meta = export.export_classifier(clf, 'onnx', str(tmp_path / 'm.onnx'))
  assert meta['verification']['max_abs_diff'] <= 1e-5 and 'Platt' in meta['output']['calibration']
  images = np.stack([np.asarray(Image.open(p))[..., None] for p in pngs])
  session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(session.run(None, {'images': images})[0], probs, atol=1e-5)


def test_set_column_names():
  assert calibrated.set_column(0.1) == 'set_90'
  assert calibrated.set_column(0.01) == 'set_99'
  assert calibrated.set_column(0.005) == 'set_99_5'

pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
