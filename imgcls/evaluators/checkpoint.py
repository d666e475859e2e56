"""Evaluating a saved checkpoint: `imgcls eval` (the run's evaluators) and `imgcls fewshot`
(the few-shot probe, on the run's dataset or another). Reads weights through
imgcls.checkpoints only; no training or serving code."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from imgcls import checkpoints, config as config_lib, data, models, parallel, step as step_lib
from imgcls import evaluators
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
  _, evals = evaluators.from_config(config, models.from_config(config), mesh, builder)
  state = step_lib.TrainState.for_eval(jax.device_put(ckpt.weights(used),
                                                      parallel.replicated(mesh)), ckpt.step)
  result = evaluators.as_result(evaluators.run(evals, state))
  split = config.dataset.eval_split
  result.update(step=ckpt.step, split=split, dataset=config.dataset.name, weights=used)
  if jax.process_index() == 0:
    out = (ckpt.workdir or ckpt.path) / f'eval_{split}_step{ckpt.step}.json'
    out.write_text(json.dumps(result, indent=2))
    result['written_to'] = str(out)
  return result


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
