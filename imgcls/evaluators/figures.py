"""The figures of an evaluation report (imgcls.evaluators.reports computes their numbers):
confusion matrix, reliability diagram, risk-coverage curve, confidently wrong examples (saliency
overlaid when given), and for
multi-label AP per class and F1 against the threshold. Each returns a uint8 RGB [H, W, 3]
render; matplotlib's Agg canvas, no pyplot state, so it runs in any thread or process.
"""

from __future__ import annotations

import math
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from imgcls.evaluators import selective

MAX_TICK_LABELS = 40  # beyond this many classes the axes drop their class names


def _figure(w: float, h: float) -> Figure:
  fig = Figure(figsize=(w, h), dpi=100, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _render(fig: Figure) -> np.ndarray:
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _class_ticks(ax, names: list[str], axes: str) -> None:
  if len(names) > MAX_TICK_LABELS:
    return  # 100+ names are unreadable; the JSON has the numbers
  ticks, size = np.arange(len(names)), 8 if len(names) <= 15 else 6
  if 'x' in axes:
    ax.set_xticks(ticks, names, rotation=90, fontsize=size)
  if 'y' in axes:
    ax.set_yticks(ticks, names, fontsize=size)


def risk_coverage_figure(curve: selective.RiskCoverage, area: float) -> np.ndarray:
  """Risk (error rate among answered) against coverage, most confident first."""
  fig = _figure(5, 4)
  ax = fig.subplots()
  ax.plot(curve.coverage, curve.risk, drawstyle='steps-post')
  ax.set(xlim=(0, 1), ylim=(0, max(float(np.nanmax(curve.risk)) * 1.05, 1e-3)),
         xlabel='coverage (fraction answered, most confident first)',
         ylabel='risk (error rate among answered)',
         title=f'risk-coverage (AURC = {area:.4f})')
  ax.grid(alpha=0.3)
  return _render(fig)


def confusion_figure(confusion: np.ndarray, names: list[str]) -> np.ndarray:
  """The row-normalised confusion matrix (rows: true class), with values where they fit."""
  c = len(names)
  rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  side = min(max(5.0, 0.35 * c + 2.5), 12.0)
  fig = _figure(side + 1, side)
  ax = fig.subplots()
  im = ax.imshow(rows, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  fig.colorbar(im, ax=ax, shrink=0.8, label='fraction of the true class')
  _class_ticks(ax, names, 'xy')
  if c <= 12:  # cell values only where they fit
    for (i, j), v in np.ndenumerate(rows):
      if confusion[i, j]:
        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7,
                color='white' if v > 0.5 else 'black')
  ax.set(xlabel='predicted', ylabel='true', title='confusion matrix (row-normalised)')
  return _render(fig)


def reliability_figure(bins: dict[str, np.ndarray], ece: float) -> np.ndarray:
  """Accuracy and mean confidence per confidence bin, over the count per bin."""
  lo, width = bins['edges'][:-1], np.diff(bins['edges'])
  fig = _figure(5, 6)
  ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  ax.bar(lo, np.nan_to_num(bins['accuracy']), width, align='edge', edgecolor='k',
         label='accuracy')
  ax.plot(lo + width / 2, bins['confidence'], 'ro', label='mean confidence')
  ax.plot([0, 1], [0, 1], 'k--', label='perfect calibration')
  ax.set(ylabel='accuracy', xlim=(0, 1), ylim=(0, 1), title=f'reliability (ECE = {ece:.4f})')
  ax.legend(loc='upper left', fontsize='small')
  ax_n.bar(lo, bins['count'], width, align='edge', edgecolor='k', color='gray')
  ax_n.set(xlabel='confidence (max probability)', ylabel='examples')
  return _render(fig)


def errors_figure(images: np.ndarray, idx: np.ndarray, labels: np.ndarray, pred: np.ndarray,
                   confidence: np.ndarray, names: list[str],
                   saliency: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
  """A grid of the images at `idx` (the most confidently wrong), titled true / predicted.
  saliency: one [H, W] map (or None) per shown image, drawn over it in 'jet' with opacity
  rising with the map (0 where the map is at its minimum, so the image shows through)."""
  cols = math.ceil(math.sqrt(len(idx)))
  rows = math.ceil(len(idx) / cols)
  fig = _figure(2.2 * cols, 2.3 * rows)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[len(idx):]:
    ax.axis('off')
  maps = list(saliency) if saliency is not None else [None] * len(idx)
  for ax, i, s in zip(axes, idx, maps):
    ax.set(xticks=[], yticks=[])
    x = images[i]
    span = x.max() - x.min()  # per-image rescale: inputs come in any range
    x = (x - x.min()) / span if span > 0 else np.zeros_like(x)
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap='gray', vmin=0, vmax=1)
    if s is not None and np.ptp(s) > 0:
      s = (np.asarray(s, np.float64) - np.min(s)) / np.ptp(s)
      ax.imshow(s, cmap='jet', vmin=0, vmax=1, alpha=0.6 * s)
    ax.set_title(f'true: {names[labels[i]]} / pred: {names[pred[i]]} (p={confidence[i]:.2f})',
                 fontsize=7, wrap=True)
  fig.suptitle('most confidently wrong' + ('' if saliency is None else
                                           ' (overlay: saliency of the predicted class)'))
  return _render(fig)


def ap_figure(ap: np.ndarray, names: list[str], mean_ap: float) -> np.ndarray:
  """Average precision per class (sorted when there are too many to name), with the mAP."""
  c, few = len(names), len(names) <= MAX_TICK_LABELS
  fig = _figure(min(max(5.0, 0.3 * c + 2), 14.0), 4)
  ax = fig.subplots()  # many classes: sorted, so the shape of the distribution shows
  ax.bar(np.arange(c), np.nan_to_num(ap if few else -np.sort(-ap)), width=0.8 if few else 1)
  ax.axhline(np.nan_to_num(mean_ap), color='r', ls='--', label=f'mAP = {mean_ap:.4f}')
  _class_ticks(ax, names, 'x')
  ax.set(ylim=(0, 1), ylabel='average precision', xlabel='class' if few else 'classes, sorted',
         title=f'AP per class ({int(np.isnan(ap).sum())} without positives excluded)')
  ax.legend(fontsize='small')
  return _render(fig)


def f1_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], threshold: float,
              tuned: float | None) -> np.ndarray:
  """Micro F1 against the threshold: curves are (label, thresholds, F1), e.g. eval and
  validation; `threshold` and the `tuned` one are marked."""
  fig = _figure(6, 4)
  ax = fig.subplots()
  for label, x, y in curves:
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), 2000)).astype(int))
    ax.plot(x[keep], y[keep], drawstyle='steps-post', label=f'{label} micro F1')
  ax.axvline(threshold, color='gray', ls=':', label=f'threshold {threshold:.3g}')
  if tuned is not None:
    ax.axvline(tuned, color='r', ls='--', label=f'tuned on validation {tuned:.3g}')
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel='threshold', ylabel='micro F1',
         title='F1 vs threshold')
  ax.legend(fontsize='small')
  return _render(fig)
