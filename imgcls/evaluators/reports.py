"""Evaluation reports people read: per-class numbers, calibration, errors, and their figures.

`single_label_report` (softmax classifiers) and `multi_label_report` (sigmoid
classifiers) turn predictions gathered on the host into a `Report`, drawing its figures
with imgcls.evaluators.figures; `write_report` puts it on disk as one JSON file and PNGs.
Pure numpy, so it runs anywhere after `jax.device_get`.
Average precision and F1 are written here because sklearn is not a dependency.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

from etils import epath
from matplotlib import image as mpl_image
import numpy as np

from imgcls.evaluators import calibrated, conformal, figures, imbalance, selective


@dataclasses.dataclass
class Report:
  """One evaluation, ready to log.

  Attributes:
    scalars: headline numbers for TensorBoard (`writer.write_scalars(step, scalars)`).
    json: everything, JSON-serialisable (NaN is stored as None).
    images: uint8 RGB [H, W, 3] renders of the figures. clu's `writer.write_images`
      wants [N, H, W, C]: pass `{k: v[None] for k, v in images.items()}`.
  """
  scalars: dict[str, float]
  json: dict[str, Any]
  images: dict[str, np.ndarray]


# ------------------------------------------------------------------ checks, helpers

def _scores(name: str, a: Any, hint: str) -> np.ndarray:
  """[N, C] finite scores in [0, 1], as float64."""
  a = np.asarray(a)
  if a.ndim != 2 or 0 in a.shape or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
    raise ValueError(f'{name} has shape {a.shape} and dtype {a.dtype}; expected numbers of '
                     'shape [N, C] (examples, classes) with N > 0 and C > 0.')
  a = a.astype(np.float64)
  if not np.all(np.isfinite(a)):
    raise ValueError(f'{name} has {np.sum(~np.isfinite(a))} NaN/inf values; expected finite.')
  if a.min() < -1e-3 or a.max() > 1 + 1e-3:  # slack for low-precision softmax/sigmoid
    raise ValueError(f'{name} lies in [{a.min():.3g}, {a.max():.3g}]; expected values in [0, 1] '
                     f'(these look like logits: {hint}).')
  return np.clip(a, 0.0, 1.0)


def _names(label_names: Sequence[str] | None, c: int) -> list[str]:
  if label_names is None:
    return [str(i) for i in range(c)]
  if len(label_names) != c:
    raise ValueError(f'label_names has {len(label_names)} entries; expected one per class ({c}).')
  return [str(n) for n in label_names]


def _plain(x: Any) -> Any:
  """numpy values to JSON ones; non-finite floats become None."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (np.ndarray, np.generic)):
    x = x.tolist()
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return None if isinstance(x, float) and not math.isfinite(x) else x


# ------------------------------------------------------------------ single-label

def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     num_bins: int) -> tuple[float, dict[str, np.ndarray]]:
  """ECE over equal-width confidence bins (lo, hi]; returns (ece, per-bin arrays)."""
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  idx = np.searchsorted(edges[1:-1], confidence, side='left')  # 0 and edge values go left
  count = np.bincount(idx, minlength=num_bins)
  with np.errstate(invalid='ignore'):  # empty bins: NaN
    acc = np.bincount(idx, weights=correct.astype(np.float64), minlength=num_bins) / count
    conf = np.bincount(idx, weights=confidence, minlength=num_bins) / count
  ece = float(np.nansum(np.abs(acc - conf) * count) / len(confidence))
  return ece, {'edges': edges, 'count': count, 'accuracy': acc, 'confidence': conf}


def single_label_report(probs: np.ndarray, labels: np.ndarray,
                        label_names: Sequence[str] | None = None,
                        images: np.ndarray | None = None,
                        num_bins: int = 15, grid_size: int = 16,
                        calibration: dict[str, Any] | None = None,
                        conformal_alphas: Sequence[float] = (0.1, 0.01),
                        saliency: Mapping[int, np.ndarray] | None = None) -> Report:
  """Accuracy, per-class accuracy, confusion matrix, calibration and worst errors.

  Args:
    probs: [N, C] softmax probabilities.
    labels: [N] integer class ids.
    label_names: C display names (default: the ids).
    images: optional [N, H, W, 1|3] (or [N, H, W]) inputs, any value range; when
      given, a grid of the `grid_size` most confidently wrong examples is drawn. A mapping
      {example index: image} works too (the training loop keeps only its worst errors);
      the grid then shows those of the worst errors it holds.
    num_bins: equal-width confidence bins for the ECE and reliability diagram.
    grid_size: how many confidently wrong examples to list and draw.
    calibration: the checkpoint's stored calibration (evaluators.calibrated), or None. When
      given, `probs` are the raw softmax: every number is then of the calibrated
      probabilities (what imgcls.load serves), with NLL and ECE before and after, and the
      conformal sets' coverage and size at each of `conformal_alphas`.
    saliency: {example index: [H, W] map} (evaluators.explain.grid_maps), drawn over those
      images of the grid.
  """
  probs = _scores('probs', probs, 'apply softmax first')
  raw_probs = probs
  if calibration is not None:
    probs = _softmax(calibrated.calibrated_logits(calibrated.logits_from_probs(probs, False),
                                                  calibration))
  n, c = probs.shape
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f'labels has shape {labels.shape}; expected [N] = ({n},) to match probs '
                     f'{probs.shape} (class ids, not one-hot: use argmax(-1)).')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels has dtype {labels.dtype}; expected integer class ids.')
  if labels.min() < 0 or labels.max() >= c:
    raise ValueError(f'labels lie in [{labels.min()}, {labels.max()}]; expected class ids in '
                     f'[0, {c - 1}] for probs with C = {c}.')
  if num_bins < 1 or grid_size < 0:
    raise ValueError(f'num_bins={num_bins}, grid_size={grid_size}; expected >= 1 and >= 0.')
  names = _names(label_names, c)
  if isinstance(images, Mapping):
    images = {int(i): _image(x) for i, x in images.items()}
  elif images is not None:
    images = np.asarray(images, np.float64)
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] not in (1, 3):
      raise ValueError(f'images has shape {images.shape}; expected [N, H, W, 1 or 3] with '
                       f'N = {n} as in probs.')

  pred = probs.argmax(-1)
  correct = pred == labels
  confidence = probs.max(-1)
  count = np.bincount(labels, minlength=c)
  with np.errstate(invalid='ignore'):
    class_acc = np.bincount(labels, weights=correct, minlength=c) / count
  confusion = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c)
  ece, bins = calibration_bins(confidence, correct, num_bins)
  wrong = np.flatnonzero(~correct)
  worst = wrong[np.argsort(-confidence[wrong], kind='stable')][:grid_size]

  balanced = imbalance.balanced_accuracy(labels, pred, c)
  scalars = {'top1': float(correct.mean()), 'ece': ece,
             'nll': _nll(probs, labels),
             'mean_class_accuracy': balanced,  # one definition: imbalance.balanced_accuracy
             'balanced_accuracy': balanced,
             'macro_f1': imbalance.macro_f1(labels, pred, c),
             'aurc': selective.aurc(confidence, correct)}
  if c >= 5:  # stable sort: lower class id wins ties, as lax.top_k does
    top5 = np.argsort(-probs, axis=1, kind='stable')[:, :5]
    scalars['top5'] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
  report_json = {
      'kind': 'single_label', 'num_examples': n, 'num_classes': c, 'label_names': names,
      'scalars': scalars,
      'per_class': {'accuracy': class_acc, 'count': count,
                    'recall': imbalance.per_class_recall(labels, pred, c),
                    'f1': imbalance.per_class_f1(labels, pred, c)},
      'confusion_matrix': confusion,  # rows: true class, columns: predicted class
      'calibration': bins,  # per bin (edges[i], edges[i + 1]]
      'confident_errors': [{'index': i, 'true': labels[i], 'pred': pred[i],
                            'prob': confidence[i]} for i in worst],
  }
  curve = selective.risk_coverage(confidence, correct)
  report_json['risk_coverage'] = _curve_points(curve)
  rendered = {'confusion_matrix': figures.confusion_figure(confusion, names),
              'reliability': figures.reliability_figure(bins, ece),
              'risk_coverage': figures.risk_coverage_figure(curve, scalars['aurc'])}
  if calibration is not None:
    _add_calibration(scalars, report_json, raw_probs, probs, labels, calibration, num_bins,
                     conformal_alphas)
  shown = worst if not isinstance(images, dict) else [i for i in worst if i in images]
  if images is not None and len(shown):
    rendered['confident_errors'] = figures.errors_figure(
        images, np.asarray(shown), labels, pred, confidence, names,
        saliency=None if saliency is None else [saliency.get(int(i)) for i in shown])
  return Report(scalars, _plain(report_json), rendered)


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
  """Mean negative log-likelihood of the labels (probabilities floored at float32's tiny)."""
  return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels],
                                          calibrated.TINY))))


def _curve_points(curve: selective.RiskCoverage, points: int = 200) -> dict[str, Any]:
  keep = np.unique(np.linspace(0, len(curve.coverage) - 1,
                               min(points, len(curve.coverage))).astype(int))
  return {'threshold': curve.threshold[keep], 'coverage': curve.coverage[keep],
          'risk': curve.risk[keep]}


def _add_calibration(scalars, report_json, raw_probs, probs, labels, calibration, num_bins,
                     alphas) -> None:
  """Before/after calibration numbers and conformal coverage / set size (overall, per class)."""
  raw_conf = raw_probs.max(-1)
  raw_ece, _ = calibration_bins(raw_conf, raw_probs.argmax(-1) == labels, num_bins)
  scalars.update(ece_uncalibrated=raw_ece, nll_uncalibrated=_nll(raw_probs, labels))
  report_json['calibration_fit'] = {
      k: calibration.get(k) for k in ('kind', 'temperature', 'split', 'examples', 'step',
                                      'weights', 'fitted_at', 'summary')}
  sets = {}
  for alpha in alphas:
    try:
      cal = calibrated.conformal_for(calibration, alpha)
    except Exception:  # pylint: disable=broad-except  # too few calibration examples
      continue
    m = conformal.set_metrics(calibrated.prediction_sets(probs, cal), labels)
    name = calibrated.set_column(alpha)
    scalars[f'{name}_coverage'] = m['coverage']
    scalars[f'{name}_mean_size'] = m['mean_set_size']
    sets[name] = dict(m, alpha=alpha, method=cal.method, qhat=cal.qhat)
  report_json['conformal'] = sets


def _image(x: Any) -> np.ndarray:
  """One image as float [H, W, 1|3]."""
  x = np.asarray(x, np.float64)
  x = x[..., None] if x.ndim == 2 else x
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise ValueError(f'an image has shape {x.shape}; expected [H, W, 1 or 3].')
  return x


# ------------------------------------------------------------------ multi-label

def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Per-column non-interpolated AP: mean over positives of the precision at their score.

  Precision at score s counts everything scoring >= s, so tied scores count together
  and the order of ties does not matter. Columns without positives: NaN.
  """
  ap = np.full(scores.shape[1], np.nan)
  for k in range(scores.shape[1]):
    pos = np.sort(scores[targets[:, k].astype(bool), k])
    if len(pos):
      n_above = len(scores) - np.searchsorted(np.sort(scores[:, k]), pos, 'left')
      tp_above = len(pos) - np.searchsorted(pos, pos, 'left')
      ap[k] = np.mean(tp_above / n_above)
  return ap


def f1_scores(pred: np.ndarray, targets: np.ndarray) -> tuple[float, float, np.ndarray]:
  """(micro, macro, per-class) F1 of boolean [N, C] predictions.

  A class with no positives and no predictions has no F1 (NaN) and is left out of macro.
  """
  tp = (pred & targets).sum(0)
  denom = pred.sum(0) + targets.sum(0)  # 2TP + FP + FN
  per_class = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
  micro = 2 * tp.sum() / denom.sum() if denom.sum() else math.nan
  macro = float(np.nanmean(per_class)) if np.any(denom > 0) else math.nan
  return float(micro), macro, per_class


def micro_f1_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Micro F1 of `scores >= t` at every distinct score t (descending); exact, one sort."""
  s, t = scores.ravel(), targets.ravel()
  order = np.argsort(-s, kind='stable')
  s, tp = s[order], np.cumsum(t[order])
  end = np.flatnonzero(np.append(s[:-1] != s[1:], True))  # last index of each tie group
  return s[end], 2 * tp[end] / (end + 1 + t.sum())


def tune_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
  """(threshold, F1): the global threshold maximising micro F1 of `scores >= threshold`.

  The midpoint below the best distinct score: same F1 here, less tied to these scores.
  """
  thresholds, f1 = micro_f1_curve(scores, targets)
  k = int(np.argmax(f1))
  best = thresholds[k]
  if k + 1 < len(thresholds):
    mid = (best + thresholds[k + 1]) / 2
    best = mid if thresholds[k + 1] < mid <= best else best
  return float(best), float(f1[k])


def multi_label_report(scores: np.ndarray, targets: np.ndarray,
                       label_names: Sequence[str] | None = None, threshold: float = 0.5,
                       val_scores: np.ndarray | None = None,
                       val_targets: np.ndarray | None = None,
                       calibration: dict[str, Any] | None = None,
                       num_bins: int = 15) -> Report:
  """Per-class AP, mAP, micro/macro F1 at `threshold`, calibration, optionally a tuned threshold.

  Args:
    scores: [N, C] sigmoid scores.
    targets: [N, C] multi-hot {0, 1}.
    label_names: C display names (default: the ids).
    threshold: a class is predicted when its score >= threshold.
    val_scores, val_targets: [M, C] validation data; when given, the global threshold
      maximising validation micro F1 is chosen, and F1 on (scores, targets) is
      reported at it too (`*_tuned`).
    calibration: the checkpoint's stored per-class Platt scaling (evaluators.calibrated), or
      None. When given, `scores` (and `val_scores`) are the raw sigmoid: every number is then
      of the calibrated scores (what imgcls.load serves), and `calibration_fit` holds each
      class's ECE and NLL before and after, and which classes kept their Platt map.
    num_bins: equal-width score bins of the per-class calibration error.

  Per class: ECE, the binary ECE of its score as the probability that the class is present
  (calibration.binary_ece), and NLL, the binary cross-entropy; `ece`, `nll`: class means.
  """
  scores = _scores('scores', scores, 'apply sigmoid first')
  targets = _targets(targets, scores)
  raw_logits = calibrated.logits_from_probs(scores, True)
  if calibration is not None:
    scores = calibrated.platt_scores(scores, calibration)
  c = scores.shape[1]
  names = _names(label_names, c)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f'threshold is {threshold}; expected a score in [0, 1].')
  if num_bins < 1:
    raise ValueError(f'num_bins={num_bins}; expected >= 1.')
  if (val_scores is None) != (val_targets is None):
    raise ValueError('pass both val_scores and val_targets, or neither.')
  if val_scores is not None:
    val_scores = _scores('val_scores', val_scores, 'apply sigmoid first')
    if val_scores.shape[1] != c:
      raise ValueError(f'val_scores has {val_scores.shape[1]} classes; expected C = {c} as in '
                       'scores.')
    val_targets = _targets(val_targets, val_scores, 'val_targets')
    if calibration is not None:
      val_scores = calibrated.platt_scores(val_scores, calibration)
  ap = average_precision(scores, targets)
  mean_ap = float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else math.nan
  micro, macro, per_class_f1 = f1_scores(scores >= threshold, targets)
  scalars = {'map': mean_ap, 'f1_micro': micro, 'f1_macro': macro}
  report_json = {
      'kind': 'multi_label', 'num_examples': scores.shape[0], 'num_classes': c,
      'label_names': names, 'threshold': threshold, 'scalars': scalars,
      'ap_classes_excluded': int(np.isnan(ap).sum()),  # no positives: AP undefined
      'per_class': {'ap': ap, 'f1': per_class_f1, 'positives': targets.sum(0)},
  }
  more_scalars, per_class, fit = calibrated.binary_report(raw_logits, targets, calibration,
                                                          names, num_bins)
  scalars.update(more_scalars)
  report_json['per_class'].update(per_class)
  if fit is not None:  # ECE/NLL per class before and after; which classes kept Platt
    report_json['calibration_fit'] = fit
  tuned = None
  if val_scores is not None:
    tuned, val_f1 = tune_threshold(val_scores, val_targets)
    micro_t, macro_t, _ = f1_scores(scores >= tuned, targets)
    scalars.update(threshold_tuned=tuned, f1_micro_tuned=micro_t, f1_macro_tuned=macro_t)
    report_json['tuned'] = {'threshold': tuned, 'val_f1_micro': val_f1,
                            'f1_micro': micro_t, 'f1_macro': macro_t}
  curves = [(label, *micro_f1_curve(s, t)) for label, s, t in
            [('eval', scores, targets), ('validation', val_scores, val_targets)]
            if s is not None]
  rendered = {'ap_per_class': figures.ap_figure(ap, names, mean_ap),
              'f1_threshold': figures.f1_figure(curves, threshold, tuned)}
  return Report(scalars, _plain(report_json), rendered)


def _targets(targets: Any, scores: np.ndarray, name: str = 'targets') -> np.ndarray:
  targets = np.asarray(targets)
  if targets.shape != scores.shape:
    raise ValueError(f'{name} has shape {targets.shape}; expected {scores.shape}, the shape of '
                     f'the scores (multi-hot [N, C]).')
  if not np.all((targets == 0) | (targets == 1)):
    raise ValueError(f'{name} holds values other than 0 and 1; expected multi-hot targets.')
  return targets.astype(bool)


# ------------------------------------------------------------------ writing

def write_report(report: Report, outdir: str | os.PathLike,
                 step: int | None = None) -> dict[str, str]:
  """Writes report[_STEP].json and NAME[_STEP].png into outdir; returns {name: path}.

  The JSON's key is 'json'; it also records the step and the PNG file names.
  """
  outdir = epath.Path(outdir)  # local or cloud (gs://) workdirs alike
  outdir.mkdir(parents=True, exist_ok=True)
  suffix = '' if step is None else f'_{int(step)}'
  paths = {name: outdir / f'{name}{suffix}.png' for name in report.images}
  for name, img in report.images.items():
    buffer = io.BytesIO()
    mpl_image.imsave(buffer, img, format='png')
    paths[name].write_bytes(buffer.getvalue())
  record = dict(report.json, step=None if step is None else int(step),
                images={k: p.name for k, p in paths.items()})
  paths['json'] = outdir / f'report{suffix}.json'
  # No indent: a 1000-class confusion matrix stays small.
  paths['json'].write_text(json.dumps(record, allow_nan=False))
  return {k: os.fspath(p) for k, p in paths.items()}
