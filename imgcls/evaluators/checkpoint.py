"""Evaluating a saved checkpoint: `imgcls eval` (the run's evaluators) and `imgcls fewshot`
(the few-shot probe, on the run's dataset or another). Reads weights through
imgcls.checkpoints only; no training or serving code."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from imgcls import checkpoints, config as config_lib, data, models, parallel, step as step_lib
from imgcls import evaluators
from imgcls.errors import UserError
from imgcls.evaluators import calibrated, metrics, reports
from imgcls.evaluators.fewshot import FewShot
from imgcls.evaluators.ridge import (DEFAULT_L2_REGS, DEFAULT_SEEDS, DEFAULT_SHOTS,
                                     DEFAULT_VAL_PER_CLASS, FewShotError)


def evaluate_checkpoint(workdir: str, which: str = 'best', split: str | None = None,
                        data_dir: str | None = None, weights: str = 'auto') -> dict[str, Any]:
  """Scores a saved checkpoint ('best', 'latest' or a step) with its run's evaluators (or,
  with `split`, the classification evaluator on that split); writes the JSON beside it.

  weights: 'auto' (the EMA when the run kept one, else raw), 'raw' or 'ema', by the rule
  imgcls.load and the exports follow (Checkpoint.weights_used), so `top1` is the number of
  the model they serve; the result's `weights` says which. Only those weights are read.
  Numbers only: the classification evaluators run without their reports.
  """
  ckpt = checkpoints.find(workdir, which)
  used = ckpt.weights_used(weights)
  config = config_lib.upgrade(ml_collections.ConfigDict(ckpt.config))
  if data_dir:
    config.dataset.data_dir = data_dir
  if split:  # one classification evaluator on that split, named as the default one, with
    # the run's test-time augmentation (so that eval_top1 means what it meant in the run)
    tta = evaluators.eval_tta(config)
    config.dataset.eval_split = split
    config.evals = ml_collections.ConfigDict(
        {'eval': dict(type='classification', split=split, tta=tta)})
  for spec in config.evals.values():
    if spec.get('type') == 'classification':
      spec['reports'] = False
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  builder = data.builder_for(config.dataset)
  context, evals = evaluators.from_config(config, models.from_config(config), mesh, builder)
  calibration = ckpt.calibration
  if calibration is not None and calibration.get('weights', used) == used:
    context.calibration = calibration  # the classification reports apply it
  state = step_lib.TrainState.for_eval(jax.device_put(ckpt.weights(used),
                                                      parallel.replicated(mesh)), ckpt.step)
  result = evaluators.as_result(evaluators.run(evals, state))
  split = config.dataset.eval_split
  result.update(step=ckpt.step, split=split, dataset=config.dataset.name, weights=used,
                calibration=calibrated.describe(getattr(context, 'calibration', None)))
  if jax.process_index() == 0:
    out = (ckpt.workdir or ckpt.path) / f'eval_{split}_step{ckpt.step}.json'
    out.write_text(json.dumps(result, indent=2))
    result['written_to'] = str(out)
    if getattr(context, 'calibration', None) is not None:
      reports_dir = (ckpt.workdir or ckpt.path) / 'reports' / _safe(f'eval_{split}')
      for evaluator in evals:
        evaluator.write(str(reports_dir), ckpt.step, None)
      result['reports'] = str(reports_dir)
  return result


def _safe(name: str) -> str:
  """A split name as a folder name: 'test[5000:]' -> 'test_5000_'."""
  return re.sub(r'[^\w.-]+', '_', name)


def _base(split: str) -> str:
  return split.split('[', 1)[0].strip()


def check_held_out(split: str, train_split: str) -> None:
  """Refuses a calibration split the model trained on (the whole train split, or any part of
  it when the run trained on all of it)."""
  if split.strip() == train_split.strip() or (
      _base(split) == _base(train_split) and '[' not in train_split):
    raise CalibrationError(
        f'--split={split!r} is (part of) the training split {train_split!r}: a calibration '
        'fitted on data the model trained on is overconfident. Use held-out data, e.g. '
        "--split='test[:5000]' (then evaluate on 'test[5000:]'), or a validation split.")


class CalibrationError(UserError):
  """A calibration that cannot be fitted as asked; the message says what to do."""


def calibrate_checkpoint(workdir: str, which: str = 'best', split: str | None = None,
                         data_dir: str | None = None, weights: str = 'auto') -> dict[str, Any]:
  """Fits the checkpoint's calibration on a held-out split and stores it with the step
  (checkpoints.write_calibration; a recalibration replaces it): the temperature (or per-class
  Platt for a multi-label run), the selective-prediction and conformal scores
  (evaluators.calibrated). split: default the run's dataset.val_split."""
  ckpt = checkpoints.find(workdir, which)
  used = ckpt.weights_used(weights)
  config = config_lib.upgrade(ml_collections.ConfigDict(ckpt.config))
  if data_dir:
    config.dataset.data_dir = data_dir
  split = split or config.dataset.val_split
  if not split:
    raise CalibrationError(
        'the run has no dataset.val_split to calibrate on: name held-out data with --split, '
        "e.g. `imgcls calibrate --workdir=W --split='test[:5000]'`.")
  check_held_out(split, config.dataset.train_split)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  builder = data.builder_for(config.dataset)
  context = evaluators.Context(config, models.from_config(config), mesh, builder)
  held_out = context.eval_data(split)
  state = step_lib.TrainState.for_eval(jax.device_put(ckpt.weights(used),
                                                      parallel.replicated(mesh)), ckpt.step)
  _, outputs = metrics.evaluate(context.eval_fn_for('', held_out.value_range), state, held_out,
                                mesh, collect=True, keep_images=0)
  multilabel = context.multilabel
  labels = outputs.labels if multilabel else np.argmax(outputs.labels, -1)
  record = calibrated.fit(calibrated.logits_from_probs(outputs.probs, multilabel), labels,
                          multilabel=multilabel, split=split, step=ckpt.step, weights=used)
  if multilabel:  # the run's tuned threshold was chosen on raw scores; this on calibrated ones
    record['summary']['threshold_tuned'] = reports.tune_threshold(
        calibrated.platt_scores(outputs.probs, record), labels.astype(bool))[0]
  result = {'step': ckpt.step, 'split': split, 'examples': record['examples'], 'weights': used,
            'kind': record['kind'], **record['summary']}
  if jax.process_index() == 0:
    result['written_to'] = str(ckpt.write_calibration(record))
  return result


def calibrate_after_training(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The end of `imgcls train`: calibrates the best step on dataset.val_split when the run has
  one (held out from training), else logs how to calibrate it afterwards."""
  split = config.dataset.get('val_split', '')
  if not split:
    logging.info('calibration skipped: the run has no dataset.val_split. Fit it on held-out '
                 "data with `imgcls calibrate --workdir=%s --split='test[:5000]'` (any split "
                 'the model did not train on).', workdir)
    return
  try:
    result = calibrate_checkpoint(workdir, 'best', split)
  except UserError as e:
    logging.warning('calibration on %r skipped: %s', split, e)
    return
  logging.info('calibrated step %d on %r: %s', result['step'], split, result)


def fewshot_checkpoint(path: str, dataset: str | None = None, train_split: str | None = None,
                       test_split: str | None = None, *, data_dir: str | None = None,
                       step: str | int = 'best', shots: Sequence[int] = DEFAULT_SHOTS,
                       seeds: Sequence[int] = DEFAULT_SEEDS,
                       l2_regs: Sequence[float] = DEFAULT_L2_REGS, pp: str | None = None,
                       batch_size: int = 64, pool_per_class: int | None = None,
                       val_per_class: int = DEFAULT_VAL_PER_CLASS,
                       max_test_examples: int | None = None, num_classes: int | None = None,
                       write: bool = True) -> dict[str, Any]:
  """Few-shot top-1 of a saved checkpoint's features on `dataset` (the protocol: ridge.py).

  path: a workdir, its checkpoints folder or a step folder, as for imgcls.load. dataset: a
  TFDS name or 'folder:/path'; None takes the checkpoint's own dataset, data_dir and splits
  (train_split, eval_split). pp defaults to the checkpoint's pp_eval (image ops only): pass
  one that resizes (and to_rgb) when the dataset's images differ from the model's. When the
  checkpoint lies in a workdir, the result is also written to WORKDIR/fewshot_{dataset}.json.
  """
  ckpt = checkpoints.find(path, step)
  config = config_lib.upgrade(ml_collections.ConfigDict(ckpt.config))
  own = ckpt.config['dataset']
  if dataset is None:
    dataset = own['name']
    train_split = train_split or own.get('train_split') or 'train'
    test_split = test_split or own.get('eval_split') or 'test'
    builder = data.builder_for(own, data_dir)
  else:
    train_split, test_split = train_split or 'train', test_split or 'test'
    builder = data.get_builder(dataset, data_dir)
  if num_classes is None:
    found = data.class_label(builder)
    if found is None or found[0] != 'label':  # multi-label 'labels' cannot be probed
      raise FewShotError(f'{dataset} has no ClassLabel feature "label": pass num_classes=.')
    num_classes = found[1].num_classes
  context = evaluators.Context(config, models.from_config(ckpt.config), None, builder)
  # No cache: each split is read once.
  probe = FewShot('fewshot', context, shots=shots, seeds=seeds, l2_regs=l2_regs,
                  train_split=train_split, test_split=test_split, pp=pp or '',
                  max_test_examples=max_test_examples or 0, pool_per_class=pool_per_class or 0,
                  val_per_class=val_per_class, batch_size=batch_size, num_classes=num_classes,
                  cache_bytes=0, image_shape=ckpt.image_shape)
  result: dict[str, Any] = probe(step_lib.TrainState.for_eval(ckpt.weights('auto'), ckpt.step))
  result.update(step=ckpt.step, checkpoint=str(ckpt.path), dataset=dataset,
                train_split=train_split, test_split=test_split, pp=probe.pp,
                num_classes=num_classes, pool_per_class=probe.pool_per_class,
                val_per_class=val_per_class, seeds=list(probe.seeds),
                l2_regs=list(probe.l2_regs), test_examples=probe.examples['test'])
  if write and ckpt.workdir is not None and jax.process_index() == 0:
    name = re.sub(r'[^\w.-]+', '_', dataset).strip('_')  # 'folder:/a/b' -> 'folder_a_b'
    out = ckpt.workdir / f'fewshot_{name}.json'
    out.write_text(json.dumps(result, indent=2))
    result['written_to'] = str(out)
  return result
