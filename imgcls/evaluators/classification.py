"""The classification evaluator: loss, top-1 and top-5 over every example of a split, for
the raw weights and (when the run keeps one) the EMA, with the reports of `reports.py`.

Single-label runs get the confusion matrix, per-class accuracy and recall, balanced accuracy,
macro-F1, calibration (ECE and a reliability diagram), the risk-coverage curve and AURC, and the
most confidently wrong images, with the saliency of their predicted class drawn over them
(the model family's default method, evaluators/explain.py); with a stored calibration
(`imgcls eval` of a calibrated checkpoint) the numbers are of the calibrated model, with
ECE/NLL before and after and the conformal sets' coverage and size; multi-label runs
(loss='sigmoid_xent') per-class AP, mAP, F1, ECE and NLL, the threshold tuned on `val_split`,
and with a stored per-class Platt scaling each class's ECE/NLL before and after it.
"""

from __future__ import annotations

from typing import Any

from etils import epath
import jax
import numpy as np

from imgcls import step
from imgcls.evaluators import metrics, reports
from imgcls.evaluators.base import EVALUATORS, Evaluator


@EVALUATORS.register('classification')
class Classification(Evaluator):
  """Scores a split; options: split ('' = dataset.eval_split), pp ('' = pp_eval), reports
  (write the figures and add their numbers), val_split (multi-label: where the F1 threshold
  is tuned; '' = dataset.val_split, none when that is ''), keep_images (confidently wrong
  images in the report), tta
  ('flip': score each image with its left-right mirror, probabilities averaged)."""
  OPTIONS = dict(split='', pp='', reports=True, val_split='', keep_images=16, tta='')

  def __init__(self, name, context, *, split: str = '', pp: str = '', reports: bool = True,
               val_split: str = '', keep_images: int = 16, tta: str = ''):
    super().__init__(name, context)
    config = context.config
    self.split = split or config.dataset.eval_split
    self.data = context.eval_data(self.split, pp)
    val_split = val_split or config.dataset.val_split
    self.val_data = (context.eval_data(val_split, pp)
                     if val_split and context.multilabel and reports else None)
    self.eval_fn = context.eval_fn_for(tta, self.data.value_range)
    self.reports = reports
    self.keep_images = keep_images
    self._report = None

  @classmethod
  def check(cls, options, config):
    keep = options.get('keep_images', 16)
    errors = []
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
      errors.append(f'keep_images must be an int >= 0, got {keep!r}.')
    if options.get('tta', '') not in step.TTA:
      errors.append(f"tta must be 'flip' or '' (none), got {options['tta']!r}.")
    return errors

  def _score(self, state, **collect):
    result, outputs = metrics.evaluate(self.eval_fn, state, self.data,
                                        self.context.mesh, **collect)
    if state.ema_params is not None:
      ema, _ = metrics.evaluate(self.eval_fn, state.ema(), self.data,
                                 self.context.mesh)
      result.update({f'ema_{k}': v for k, v in ema.items() if k != 'examples'})
    return result, outputs

  @property
  def calibration(self) -> dict[str, Any] | None:
    """The checkpoint's stored calibration (set on the context by `imgcls eval`), or None."""
    return getattr(self.context, 'calibration', None)

  def __call__(self, state) -> dict[str, Any]:
    calibration = self.calibration
    result, outputs = self._score(state, collect=self.reports or calibration is not None,
                                  keep_images=self.keep_images)
    self._report = None
    if outputs is None:
      return result
    names = self.context.label_names
    if self.context.multilabel:
      val = None
      if self.val_data is not None:
        val = metrics.evaluate(self.eval_fn, state, self.val_data, self.context.mesh,
                                collect=True)[1]
      report = reports.multi_label_report(
          outputs.probs, outputs.labels, names,
          val_scores=None if val is None else val.probs,
          val_targets=None if val is None else val.labels, calibration=calibration)
    else:
      images = {index: image for _, index, image in outputs.mistakes}
      report = reports.single_label_report(
          outputs.probs, np.argmax(outputs.labels, -1), names, images=images,
          calibration=calibration, saliency=self._saliency(state, images, outputs.probs))
    result.update({k: v for k, v in report.scalars.items() if k not in result})
    if calibration is not None:  # the numbers of the calibrated model imgcls.load serves
      result.update({k: report.scalars[k] for k in ('ece', 'nll') if k in report.scalars})
    self._report = report
    return result

  def _saliency(self, state, images: dict[int, np.ndarray], probs: np.ndarray):
    """{index: map of the predicted class} for the confident-error grid's few images, by the
    model family's default method (evaluators.explain), or None."""
    if not images:
      return None
    from imgcls.evaluators import explain  # pylint: disable=import-outside-toplevel
    index = sorted(images)
    value_range = self.data.value_range
    x = step.device_value_range(np.stack([images[i] for i in index]), value_range)
    black = (None if value_range is None else
             step.device_value_range(np.zeros_like(images[index[0]]), value_range))
    maps = explain.grid_maps(self.context.model, self.context.config.model.name,
                             {'params': state.params, 'batch_stats': state.batch_stats}, x,
                             probs[index].argmax(-1), black=black, pad_to=self.keep_images)
    return None if maps is None else dict(zip(index, maps))

  def write(self, workdir: str, step: int, writer: Any) -> None:
    """WORKDIR/reports/ (the `eval` evaluator) or WORKDIR/reports/PREFIX/: PNG + JSON, and
    the figures to TensorBoard's images tab."""
    if self._report is None or jax.process_index() != 0:
      return
    if writer is None:  # `imgcls eval` of a calibrated checkpoint: files only
      reports.write_report(self._report, epath.Path(workdir), step)
      return
    outdir = epath.Path(workdir) / 'reports'
    if self.prefix != 'eval':
      outdir = outdir / self.prefix
    reports.write_report(self._report, outdir, step)
    writer.write_images(step, {f'{self.prefix}_{k}': v[None]
                               for k, v in self._report.images.items()})
