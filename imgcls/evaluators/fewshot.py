"""The few-shot evaluator: the ridge probe of imgcls.fewshot on a run's frozen features,
at every eval of a training run (`fewshot` in config.evals) or for any saved checkpoint
(`run_on_checkpoint`, the `imgcls fewshot` command)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from imgcls import checkpoints, data, models
from imgcls.data import preprocess
from imgcls.evaluators.base import EVALUATORS, Evaluator
from imgcls.fewshot import (DEFAULT_CACHE_BYTES, DEFAULT_L2_REGS, DEFAULT_SEEDS, DEFAULT_SHOTS,
                            DEFAULT_VAL_PER_CLASS, ApplyFeatures, Batch, FewShotError, apply_checked,
                            check_ints, collect, stream_split, make_features_fn, ridge_fewshot)

# ----------------------------------------------------------------- evaluator

class _Split:
  """A split's examples for the probe: streamed through tf.data, or, once the first pass
  showed that its preprocessed images fit in cache_bytes, kept in memory."""

  def __init__(self, stream: Callable[[], Iterator[Batch]], batch_size: int, cache_bytes: int,
               **limits):
    self.stream, self.batch_size, self.cache_bytes, self.limits = (
        stream, batch_size, cache_bytes, limits)
    self.images = self.labels = None

  def features(self, apply_features: ApplyFeatures) -> tuple[np.ndarray, np.ndarray]:
    if self.images is not None:
      return self._from_cache(apply_features), self.labels
    labels, feats, images = collect(self.stream(), apply_features,
                                     cache_bytes=self.cache_bytes, **self.limits)
    if images is not None:
      self.images, self.labels = images, labels
    return feats, labels

  def _from_cache(self, apply_features: ApplyFeatures) -> np.ndarray:
    out, b = [], self.batch_size
    for start in range(0, len(self.images), b):
      x = self.images[start:start + b]
      pad = np.zeros((b - len(x), *x.shape[1:]), x.dtype)  # one shape: one compilation
      out.append(apply_checked(apply_features, np.concatenate([x, pad]))[:len(x)])
    return np.concatenate(out)


class FewShotEvaluator:
  """Few-shot ridge top-1 of a model's frozen features, cheap enough for every eval.

  Construction reads the train split's labels (no image is decoded) to check that every class
  has pool_per_class examples (default max(shots) + val_per_class): a bad setting fails before
  training starts. Each call extracts the features of that pool (the first pool_per_class
  examples of each class in file order) and of the test split (its first max_test_examples,
  default all), then runs `ridge_fewshot`. pp's label ops (onehot, keep) are dropped. A
  split's preprocessed images stay in host memory between calls when they fit in cache_bytes
  (0: never cache).
  """

  def __init__(self, builder, train_split: str, test_split: str, pp: str, num_classes: int, *,
               shots: Sequence[int] = DEFAULT_SHOTS, seeds: Sequence[int] = DEFAULT_SEEDS,
               l2_regs: Sequence[float] = DEFAULT_L2_REGS, batch_size: int = 64,
               pool_per_class: int | None = None, val_per_class: int = DEFAULT_VAL_PER_CLASS,
               max_test_examples: int | None = None, label_key: str = 'label',
               cache_bytes: int = DEFAULT_CACHE_BYTES, prefix: str = 'fewshot'):
    self.shots = check_ints('shots', shots, 1)
    self.seeds = check_ints('seeds', seeds, 0)
    check_ints('num_classes and batch_size', [num_classes, batch_size], 1)
    check_ints('val_per_class', [val_per_class], 0)
    need = max(self.shots) + val_per_class
    self.pool_per_class = need if pool_per_class is None else pool_per_class
    if self.pool_per_class < need:
      raise FewShotError(f'pool_per_class={pool_per_class} is below max(shots) + val_per_class '
                         f'= {need}: raise it or leave it unset.')
    if max_test_examples is not None:
      check_ints('max_test_examples', [max_test_examples], 1)
    self.num_classes = num_classes
    self.kwargs = dict(shots=self.shots, seeds=self.seeds, l2_regs=tuple(l2_regs),
                       val_per_class=val_per_class, num_classes=num_classes, prefix=prefix)
    self.pp = preprocess.image_only(pp)
    data.num_examples(builder, test_split)  # a bad split name fails here
    self._check_pool(builder, train_split, label_key)
    stream = functools.partial(stream_split, builder, pp=self.pp, batch_size=batch_size,
                               label_key=label_key)
    self.train = _Split(functools.partial(stream, train_split), batch_size, cache_bytes,
                        max_per_class=self.pool_per_class, num_classes=num_classes)
    self.test = _Split(functools.partial(stream, test_split), batch_size, cache_bytes,
                       max_examples=max_test_examples)
    self.examples: dict[str, int] = {}
    logging.info('few-shot: pool of %d per class of %s %s (%d classes), test %s%s, shots %s, '
                 'seeds %s', self.pool_per_class, builder.name, train_split, num_classes,
                 test_split, f'[:{max_test_examples}]' if max_test_examples else '',
                 self.shots, self.seeds)

  def _check_pool(self, builder, split: str, label_key: str) -> None:
    stream = stream_split(builder, split, f'keep({label_key!r})', 1024, label_key)
    labels, _, _ = collect(stream, max_per_class=self.pool_per_class,
                            num_classes=self.num_classes)
    counts = np.bincount(labels, minlength=self.num_classes)
    short = np.flatnonzero(counts < self.pool_per_class)
    if short.size:
      shown = ', '.join(f'{c} ({counts[c]})' for c in short[:10])
      raise FewShotError(
          f'the few-shot pool needs {self.pool_per_class} examples of every class in '
          f'{builder.name} {split} (max(shots) + val_per_class, or pool_per_class), but '
          f'class(es) {shown}{" ..." if short.size > 10 else ""} have fewer. Lower the shots '
          'or val_per_class, or use a larger train split.')

  def __call__(self, apply_features: ApplyFeatures) -> dict[str, float]:
    """The probe on apply_features(images [batch_size, ...]) -> features [batch_size, D]."""
    train_feats, train_labels = self.train.features(apply_features)
    test_feats, test_labels = self.test.features(apply_features)
    self.examples = {'pool': len(train_labels), 'test': len(test_labels)}
    return ridge_fewshot(train_feats, train_labels, test_feats, test_labels, **self.kwargs)


@EVALUATORS.register('fewshot')
class FewShot(Evaluator):
  """The few-shot ridge probe of the state's raw weights (its frozen pre-logits features).

  Options: shots, seeds, train_split / test_split ('' = the dataset's train_split and
  eval_split), pp ('' = pp_eval; label ops are dropped), max_test_examples (0 = all).
  """
  OPTIONS = dict(shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS, train_split='', test_split='',
                 pp='', max_test_examples=0)

  def __init__(self, name, context, *, shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS,
               train_split: str = '', test_split: str = '', pp: str = '',
               max_test_examples: int = 0):
    super().__init__(name, context)
    config = context.config
    ds = config.dataset
    # Reads the train split's labels now: a class too small fails before any write.
    self.probe = FewShotEvaluator(
        context.builder, train_split or ds.train_split, test_split or ds.eval_split,
        pp or config.pp_eval, ds.num_classes, shots=tuple(shots), seeds=tuple(seeds),
        batch_size=config.eval_batch_size, max_test_examples=max_test_examples or None)
    self.features = make_features_fn(context.model, context.mesh)

  @classmethod
  def check(cls, options, config):
    errors = []
    shots = options.get('shots', DEFAULT_SHOTS)
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
      errors.append(f'shots must be positive ints, e.g. (1, 5, 10, 25), got {shots}.')
    if config.loss != 'softmax_xent':
      errors.append('the few-shot probe needs a single-label dataset (loss softmax_xent).')
    return errors

  def __call__(self, state) -> dict[str, float]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return self.probe(functools.partial(self.features, variables))


# ---------------------------------------------------------------- checkpoint

def run_on_checkpoint(path: str, dataset: str | None = None, train_split: str | None = None,
                      test_split: str | None = None, *, data_dir: str | None = None,
                      step: str | int = 'best', shots: Sequence[int] = DEFAULT_SHOTS,
                      seeds: Sequence[int] = DEFAULT_SEEDS,
                      l2_regs: Sequence[float] = DEFAULT_L2_REGS, pp: str | None = None,
                      batch_size: int = 64, pool_per_class: int | None = None,
                      val_per_class: int = DEFAULT_VAL_PER_CLASS,
                      max_test_examples: int | None = None, num_classes: int | None = None,
                      write: bool = True) -> dict[str, Any]:
  """Few-shot top-1 of a saved checkpoint's features on `dataset` (protocol: module doc).

  path: a workdir, its checkpoints folder or a step folder, as for imgcls.load. dataset: a
  TFDS name or 'folder:/path'; None takes the checkpoint's own dataset, data_dir and splits
  (train_split, eval_split). pp defaults to the checkpoint's pp_eval (image ops only): pass
  one that resizes (and to_rgb) when the dataset's images differ from the model's. When the
  checkpoint lies in a workdir, the result is also written to WORKDIR/fewshot_{dataset}.json.
  """
  ckpt = checkpoints.find(path, step)
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
  pp = preprocess.image_only(pp or ckpt.config['pp_eval'])
  model = models.from_config(ckpt.config)
  variables = ckpt.weights('auto')
  image_shape = ckpt.image_shape
  features_fn = make_features_fn(model)

  def apply_features(images):
    if images.shape[1:] != image_shape:
      raise FewShotError(
          f'the pp {pp!r} makes {dataset} images {images.shape[1:]}, but the model takes '
          f'{image_shape}: pass pp= with resize({image_shape[0]}, {image_shape[1]})'
          f'{" and to_rgb" if image_shape[-1] == 3 else ""} before the value ops.')
    return features_fn(variables, images)

  # No cache: each split is read once.
  evaluator = FewShotEvaluator(builder, train_split, test_split, pp, num_classes, shots=shots,
                               seeds=seeds, l2_regs=l2_regs, batch_size=batch_size,
                               pool_per_class=pool_per_class, val_per_class=val_per_class,
                               max_test_examples=max_test_examples, cache_bytes=0)
  result: dict[str, Any] = evaluator(apply_features)
  result.update(step=ckpt.step, checkpoint=str(ckpt.path), dataset=dataset, train_split=train_split,
                test_split=test_split, pp=pp, num_classes=num_classes,
                pool_per_class=evaluator.pool_per_class, val_per_class=val_per_class,
                seeds=list(evaluator.seeds), l2_regs=list(evaluator.kwargs['l2_regs']),
                test_examples=evaluator.examples['test'])
  if write and ckpt.workdir is not None and jax.process_index() == 0:
    name = re.sub(r'[^\w.-]+', '_', dataset).strip('_')  # 'folder:/a/b' -> 'folder_a_b'
    out = ckpt.workdir / f'fewshot_{name}.json'
    out.write_text(json.dumps(result, indent=2))
    result['written_to'] = str(out)
  return result
