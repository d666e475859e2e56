"""`imgcls predict`: classify files, folders (recursively) and globs; write CSV or JSON lines.

  predict(workdir, ['photos/', 'extra/*.jpg'], 'out.csv', top_k=5)  -> a summary dict

One row per file, in the order found (folders sorted, recursively; globs as matched):
path, the top-k labels with their probabilities and, for a multi-label run, the labels at or
above the run's decision threshold (Classifier.decision_threshold: the tuned one when the
checkpoint saved it, else 0.5). A file that does not decode or does not fit the model gets a
row with an `error` and no labels; it never stops the batch. Images are decoded as the image
folder preparation decodes them (imgcls.data.decode) and preprocessed by pp_eval, through
imgcls.load's Classifier, with the weights imgcls.load and `imgcls eval` use.

--tta=flip averages the probabilities of each model input and its left-right mirror (the
mirror of the preprocessed image, after pp_eval's crop).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from imgcls import inference, step
from imgcls.evaluators import calibrated
from imgcls.data.folder_layout import EXTENSIONS
from imgcls.errors import UserError

TTA = step.TTA  # '' or 'flip', as the classification evaluator's option


class PredictError(UserError):
  """Bad arguments to `imgcls predict` (no inputs, an unknown output format)."""


def expand(inputs: list[str]) -> Iterator[tuple[str, str | None]]:
  """(path, None) for each file to classify, or (input, why) for an input that names none.

  A folder gives its image files (EXTENSIONS), recursively and sorted; a pattern with * ? [
  gives every file it matches (recursively with **); a file is taken whatever its extension.
  """
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(root, f) for root, _, files in os.walk(item)
                     for f in files if f.lower().endswith(EXTENSIONS))
      if not found:
        yield item, f'no image files ({", ".join(EXTENSIONS)}) in this folder'
      yield from ((path, None) for path in found)
    elif os.path.isfile(item):
      yield item, None
    elif glob.has_magic(item):
      found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
      if not found:
        yield item, 'the pattern matches no file'
      yield from ((path, None) for path in found)
    else:
      yield item, 'no such file or folder'


class _Writer:
  """Rows to CSV (label lists joined by ';') or JSON lines."""

  def __init__(self, f: TextIO, fmt: str, top_k: int, multilabel: bool,
               set_column: str | None = None, selective: bool = False):
    self.f, self.fmt, self.multilabel = f, fmt, multilabel
    self.set_column, self.selective = set_column, selective
    if fmt == 'csv':
      self.csv = csv.writer(f)
      header = (['path'] + ([set_column] if set_column else []) +
                (['abstain'] if selective else []) +
                [x for k in range(1, top_k + 1) for x in (f'label_{k}', f'prob_{k}')])
      self.csv.writerow(header + (['labels'] if multilabel else []) + ['error'])
      self.width = 2 * top_k

  def write(self, path: str, top: list[tuple[str, float]], labels: list[str] | None,
            error: str | None, label_set: list[str] | None = None,
            abstain: bool | None = None) -> None:
    """label_set: the conformal set (label names); abstain: True where the model routes the
    image to a person (its top-1 is still written, as the would-be label)."""
    if self.fmt == 'jsonl':
      row: dict[str, Any] = {'path': path}
      if self.set_column:
        row[self.set_column] = label_set
      if self.selective:
        row['abstain'] = abstain
      row['top_k'] = [{'label': l, 'prob': round(p, 6)} for l, p in top]
      if self.multilabel:
        row['labels'] = labels
      row['error'] = error
      self.f.write(json.dumps(row) + '\n')
      return
    cells = [x for l, p in top for x in (l, f'{p:.6f}')]
    cells += [''] * (self.width - len(cells))
    lead = ([';'.join(label_set or [])] if self.set_column else []) + (
        [('abstain' if abstain else 'no') if abstain is not None else ''] if self.selective
        else [])
    self.csv.writerow([path] + lead + cells +
                      ([';'.join(labels or [])] if self.multilabel else []) + [error or ''])


def _output_format(out: str) -> str:
  ext = os.path.splitext(out)[1].lower()
  if ext not in ('.csv', '.jsonl', '.json'):
    raise PredictError(f'--out must end in .csv or .jsonl (JSON lines), got {out!r}.')
  return 'csv' if ext == '.csv' else 'jsonl'


def predict(workdir: str, inputs: list[str], out: str, *, step: str | int = 'best',
            weights: str = 'auto', top_k: int = 5, batch_size: int = 64, tta: str = '',
            min_confidence: float | None = None, max_risk: float | None = None,
            conformal: float | None = None, progress: TextIO | None = sys.stderr
            ) -> dict[str, Any]:
  """Classifies every file of `inputs` and writes one row each to `out`; returns a summary.

  Probabilities are calibrated when the checkpoint has a calibration (`imgcls calibrate`).
  min_confidence / max_risk: abstain (column `abstain` = 'abstain', the would-be labels kept)
  where the top-1 probability is below C, or below the threshold whose error rate on the
  calibration split is at most R; the summary's `coverage` is the fraction answered.
  conformal=alpha: a column `set_{100(1-alpha)}` with each image's conformal label set
  (';'-joined in CSV), calibrated on the checkpoint's held-out split.
  """
  fmt = _output_format(out)
  if not inputs:
    raise PredictError('no inputs: name image files, folders or globs after the flags.')
  if tta not in TTA:
    raise PredictError(f'--tta must be one of: flip (or empty for none), got {tta!r}.')
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise PredictError(f'--top_k must be a positive integer, got {top_k!r}.')
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise PredictError(f'--batch_size must be a positive integer, got {batch_size!r}.')
  if min_confidence is not None and max_risk is not None:
    raise PredictError('give --min_confidence or --max_risk, not both.')
  if min_confidence is not None and not 0 <= min_confidence <= 1:
    raise PredictError(f'--min_confidence must be a probability in [0, 1], got {min_confidence}.')
  clf = inference.load(workdir, step, weights)
  if clf.multilabel and (min_confidence is not None or max_risk is not None or conformal):
    raise PredictError('--min_confidence, --max_risk and --conformal are for single-label '
                       '(softmax) models; this one is multi-label.')
  threshold, threshold_source = min_confidence, 'min_confidence'
  if max_risk is not None:
    chosen = calibrated.risk_threshold(clf.calibration, max_risk)
    threshold = chosen.threshold
    threshold_source = (f'max_risk={max_risk}: risk {chosen.risk:.4f} at coverage '
                        f'{chosen.coverage:.4f} on {clf.calibration["split"]!r}')
  sets = calibrated.conformal_for(clf.calibration, conformal) if conformal else None
  set_column = calibrated.set_column(conformal) if conformal else None
  top_k = min(top_k, clf.num_classes)
  thr, thr_source = clf.decision_threshold() if clf.multilabel else (None, None)
  counts = {'images': 0, 'errors': 0, 'answered': 0}
  set_sizes: list[int] = []
  start = time.perf_counter()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w', newline='', encoding='utf-8') as f:
    writer = _Writer(f, fmt, top_k, clf.multilabel, set_column, threshold is not None)
    pending: list[tuple[str, np.ndarray | None, str | None]] = []

    def flush():
      inputs_ = [x for _, x, _ in pending if x is not None]
      scored = _scores(clf, np.stack(inputs_), batch_size, tta) if inputs_ else np.zeros((0, 1))
      masks = iter(calibrated.prediction_sets(scored, sets) if sets and len(scored) else [])
      probs = iter(scored)
      for path, x, error in pending:
        if x is None:
          writer.write(path, [], None, error)
          counts['errors'] += 1
          continue
        p = next(probs)
        order = np.argsort(-p, kind='stable')[:top_k]
        labels = ([clf.label_names[c] for c in np.flatnonzero(p >= thr)]
                  if clf.multilabel else None)
        label_set = abstain = None
        if sets is not None:
          mask = next(masks)
          members = np.argsort(-np.where(mask, p, -1), kind='stable')[:int(mask.sum())]
          label_set = [clf.label_names[c] for c in members]  # most probable first
          set_sizes.append(len(label_set))
        if threshold is not None:
          abstain = bool(p.max() < threshold)
        counts['answered'] += not abstain
        writer.write(path, [(clf.label_names[c], float(p[c])) for c in order], labels, None,
                     label_set, abstain)
        counts['images'] += 1
      pending.clear()
      _progress(progress, counts, time.perf_counter() - start)

    for path, problem in expand(inputs):
      x = None
      if problem is None:
        try:
          x = clf.preprocess(path)[0]
        except (ValueError, OSError) as e:  # unreadable, or not the model's size or channels
          problem = str(e)
        except Exception as e:  # pylint: disable=broad-except  # one bad file never stops the batch
          problem = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
      pending.append((path, x, problem))
      if sum(x is not None for _, x, _ in pending) == batch_size:
        flush()
    flush()
  if progress is not None:
    progress.write('\n')
  summary = {'rows': counts['images'] + counts['errors'], **counts, 'out': out,
             'weights': clf.weights, 'step': clf.step, 'tta': tta or 'none',
             'seconds': round(time.perf_counter() - start, 2)}
  if clf.multilabel:
    summary.update(threshold=thr, threshold_source=thr_source)
  summary['calibration'] = calibrated.describe(clf.calibration)
  if threshold is not None:
    summary.update(coverage=counts['answered'] / max(counts['images'], 1),
                   abstained=counts['images'] - counts['answered'],
                   confidence_threshold=threshold, threshold_source=threshold_source)
  if sets is not None:
    summary.update({'set_column': set_column, 'conformal_alpha': conformal,
                    'conformal_method': sets.method,
                    'mean_set_size': float(np.mean(set_sizes)) if set_sizes else float('nan')})
  return summary


def _scores(clf: inference.Classifier, x: np.ndarray, batch_size: int, tta: str) -> np.ndarray:
  probs = clf.scores(x, batch_size)
  if tta == 'flip':
    probs = (probs + clf.scores(x[:, :, ::-1], batch_size)) / 2
  return probs


def _progress(stream: TextIO | None, counts: dict[str, int], seconds: float) -> None:
  if stream is None:
    return
  done = counts['images'] + counts['errors']
  stream.write(f'\rpredict: {done} files, {counts["images"]} classified, {counts["errors"]} '
               f'unreadable, {counts["images"] / max(seconds, 1e-9):.0f} img/s')
  stream.flush()
