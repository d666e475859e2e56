"""The few-shot evaluator: the ridge probe (`ridge.py`) on a model's frozen pre-logits features.

`FewShot` runs at every eval of a training run (`type='fewshot'` in config.evals) and, with
a checkpoint's weights, for `imgcls fewshot` (`checkpoint.fewshot_checkpoint`). Features come
from the exact eval pipeline, every process reading the whole split (no gather needed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from imgcls import data, parallel
from imgcls.data import preprocess
from imgcls.evaluators.base import EVALUATORS, Evaluator
from imgcls.evaluators.ridge import (DEFAULT_L2_REGS, DEFAULT_SEEDS, DEFAULT_SHOTS,
                                     DEFAULT_VAL_PER_CLASS, FewShotError, check_ints,
                                     ridge_fewshot)
from imgcls.models import weights

DEFAULT_CACHE_BYTES = 1 << 30

ApplyFeatures = Callable[[np.ndarray], Any]  # images [B, H, W, C] -> features [B, D]

# ------------------------------------------------------------------ features

Batch = tuple[np.ndarray | None, np.ndarray, np.ndarray]  # images, int labels, bool mask


def stream_split(builder, split: str, pp: str, batch_size: int, label_key: str) -> Iterator[Batch]:
  """The whole split in file order, as padded batches from the exact eval pipeline.

  Read as one process (process_count=1): every process of a multi-host run reads the whole
  split and computes the same few-shot result, with no gather.
  """
  batches = data.eval_data(builder, split=split, pp=pp, global_batch_size=batch_size,
                            process_index=0, process_count=1)
  for batch in batches:
    if label_key not in batch:
      raise FewShotError(f'the pp {pp!r} leaves no {label_key!r} in the examples of '
                         f'{builder.name} {split} (keys: {sorted(batch)}): drop keep(...) from '
                         'it, or pass label_key= naming the integer class label.')
    yield (batch.get('image'), np.asarray(batch[label_key]).astype(np.int64),
           np.asarray(batch['mask']) > 0)


def apply_checked(apply_features: ApplyFeatures, images: np.ndarray) -> np.ndarray:
  feats = np.asarray(apply_features(images), np.float32)
  if feats.ndim != 2 or len(feats) != len(images):
    raise FewShotError(f'apply_features must map images [B, ...] to features [B, D]; for '
                       f'{images.shape} it returned {feats.shape}.')
  return feats


def collect(batches: Iterable[Batch], apply_features: ApplyFeatures | None = None, *,
             max_examples: int | None = None, max_per_class: int | None = None,
             num_classes: int | None = None, cache_bytes: int = 0):
  """(labels, features, images) of the real examples in order; stops reading when enough.

  max_examples keeps the first examples; max_per_class the first ones of each of num_classes
  classes, stopping once all are full. Features are None without apply_features; images are
  kept (for a cache) while they fit in cache_bytes, else None.
  """
  labels, feats, images, seen, nbytes = [], [], [], 0, 0
  counts = np.zeros(num_classes or 0, np.int64)
  for x, y, mask in batches:
    keep = mask.copy()
    if max_examples is not None:
      keep &= np.cumsum(mask) <= max_examples - seen
    if max_per_class is not None:
      if np.any(y[mask] >= num_classes) or np.any(y[mask] < 0):
        raise FewShotError(f'labels {sorted(set(y[mask].tolist()))[:5]}... lie outside the '
                           f'{num_classes} classes: pass the dataset\'s num_classes.')
      for i in np.flatnonzero(keep):  # a host loop over one batch: cheap
        keep[i] = counts[y[i]] < max_per_class
        counts[y[i]] += keep[i]
    seen += int(mask.sum())
    if keep.any():
      labels.append(y[keep])
      if apply_features is not None:
        feats.append(apply_checked(apply_features, x)[keep])
      if images is not None and cache_bytes:
        images.append(np.asarray(x)[keep])
        nbytes += images[-1].nbytes
        images = images if nbytes <= cache_bytes else None  # too big: stream every time
    if ((max_examples is not None and seen >= max_examples) or
        (max_per_class is not None and np.all(counts >= max_per_class))):
      break
  if not labels:
    raise FewShotError('no examples were read: the split is empty or max_examples is 0.')
  return (np.concatenate(labels), np.concatenate(feats) if feats else None,
          np.concatenate(images) if images and cache_bytes else None)


def extract_features(apply_features: ApplyFeatures, builder, split: str, pp: str,
                     batch_size: int, max_examples: int | None = None, *,
                     max_per_class: int | None = None, num_classes: int | None = None,
                     label_key: str = 'label') -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D] float32, labels [N] int64) of a split's examples, in file order.

  apply_features(images [batch_size, ...]) -> [batch_size, D] sees the padded batches of the
  exact eval pipeline (`eval_data` with pp); the padding is dropped by the mask. max_examples
  reads only the first examples; max_per_class (with num_classes) keeps the first
  max_per_class of each class and stops reading once every class has them.
  """
  if max_per_class is not None and not num_classes:
    raise FewShotError('max_per_class needs num_classes (the classes to fill).')
  labels, feats, _ = collect(stream_split(builder, split, pp, batch_size, label_key), apply_features,
                              max_examples=max_examples, max_per_class=max_per_class,
                              num_classes=num_classes)
  return feats, labels


def make_features_fn(model, mesh=None) -> Callable[[Any, np.ndarray], np.ndarray]:
  """fn(variables, images) -> pre-logits features [B, D] float32 (numpy), jitted once.

  With a mesh (training) the batch is split over its devices, so B must divide by mesh.size
  (the eval batch size does); every process passes the same full batch and gets every row.
  Bind the weights of the moment per eval: functools.partial(fn, {'params': ...,
  'batch_stats': ...}).
  """
  apply = functools.partial(weights.features, model)
  if mesh is None:
    jitted = jax.jit(apply)
    return lambda variables, images: np.asarray(jitted(variables, images), np.float32)
  jitted = jax.jit(apply, out_shardings=parallel.replicated(mesh))
  in_sharding = parallel.batch_sharded(mesh)

  def fn(variables, images):
    images = np.asarray(images)
    parallel.check_batch_size(len(images), mesh, 'the few-shot batch size')
    x = jax.make_array_from_callback(images.shape, in_sharding, lambda idx: images[idx])
    return np.asarray(parallel.to_host(jitted(variables, x)), np.float32)
  return fn


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


@EVALUATORS.register('fewshot')
class FewShot(Evaluator):
  """Few-shot ridge top-1 of the state's frozen pre-logits features (raw weights).

  Options ('' or 0: the run's own): shots, seeds, l2_regs, train_split / test_split (the
  dataset's train_split / eval_split), pp (pp_eval; label ops are dropped), max_test_examples
  (all), pool_per_class (max(shots) + val_per_class), val_per_class, batch_size
  (eval_batch_size), num_classes (dataset.num_classes), cache_bytes (a split's preprocessed
  images stay in host memory between calls when they fit; 0: never), label_key.

  The pool is the first pool_per_class examples of each class of the train split in file
  order. Construction reads its labels (no image is decoded): a class too small fails before
  training starts. image_shape (not a config option): the model's input, checked per batch.
  """
  OPTIONS = dict(shots=DEFAULT_SHOTS, seeds=DEFAULT_SEEDS, l2_regs=DEFAULT_L2_REGS,
                 train_split='', test_split='', pp='', max_test_examples=0, pool_per_class=0,
                 val_per_class=DEFAULT_VAL_PER_CLASS, batch_size=0, num_classes=0,
                 cache_bytes=DEFAULT_CACHE_BYTES, label_key='label')

  def __init__(self, name, context, *, shots: Sequence[int] = DEFAULT_SHOTS,
               seeds: Sequence[int] = DEFAULT_SEEDS,
               l2_regs: Sequence[float] = DEFAULT_L2_REGS, train_split: str = '',
               test_split: str = '', pp: str = '', max_test_examples: int = 0,
               pool_per_class: int = 0, val_per_class: int = DEFAULT_VAL_PER_CLASS,
               batch_size: int = 0, num_classes: int = 0,
               cache_bytes: int = DEFAULT_CACHE_BYTES, label_key: str = 'label',
               image_shape: tuple[int, ...] | None = None):
    super().__init__(name, context)
    config, builder = context.config, context.builder
    ds = config.dataset
    self.train_split = train_split or ds.train_split
    self.test_split = test_split or ds.eval_split
    self.num_classes = num_classes or ds.num_classes
    batch_size = batch_size or config.eval_batch_size
    self.shots = check_ints('shots', shots, 1)
    self.seeds = check_ints('seeds', seeds, 0)
    check_ints('num_classes and batch_size', [self.num_classes, batch_size], 1)
    check_ints('val_per_class', [val_per_class], 0)
    need = max(self.shots) + val_per_class
    self.pool_per_class = pool_per_class or need
    if self.pool_per_class < need:
      raise FewShotError(f'pool_per_class={pool_per_class} is below max(shots) + val_per_class '
                         f'= {need}: raise it or leave it unset.')
    if max_test_examples:
      check_ints('max_test_examples', [max_test_examples], 1)
    self.l2_regs = tuple(float(v) for v in l2_regs)
    self.val_per_class = val_per_class
    self.pp = preprocess.image_only(pp or config.pp_eval)
    self.image_shape = None if image_shape is None else tuple(image_shape)
    data.num_examples(builder, self.test_split)  # a bad split name fails here
    self._check_pool(builder, self.train_split, label_key)
    stream = functools.partial(stream_split, builder, pp=self.pp, batch_size=batch_size,
                               label_key=label_key)
    self.train = _Split(functools.partial(stream, self.train_split), batch_size, cache_bytes,
                        max_per_class=self.pool_per_class, num_classes=self.num_classes)
    self.test = _Split(functools.partial(stream, self.test_split), batch_size, cache_bytes,
                       max_examples=max_test_examples or None)
    self.features_fn = make_features_fn(context.model, context.mesh)
    self.examples: dict[str, int] = {}
    logging.info('few-shot: pool of %d per class of %s %s (%d classes), test %s%s, shots %s, '
                 'seeds %s', self.pool_per_class, builder.name, self.train_split,
                 self.num_classes, self.test_split,
                 f'[:{max_test_examples}]' if max_test_examples else '', self.shots, self.seeds)

  @classmethod
  def check(cls, options, config):
    errors = []
    shots = options.get('shots', DEFAULT_SHOTS)
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
      errors.append(f'shots must be positive ints, e.g. (1, 5, 10, 25), got {shots}.')
    if config.loss != 'softmax_xent':
      errors.append('the few-shot probe needs a single-label dataset (loss softmax_xent).')
    return errors

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

  def __call__(self, state) -> dict[str, float]:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return self.probe(functools.partial(self.features_fn, variables))

  def probe(self, apply_features: ApplyFeatures) -> dict[str, float]:
    """The probe on apply_features(images [batch_size, ...]) -> features [batch_size, D]."""
    if self.image_shape is not None:
      apply_features = functools.partial(self._checked_shape, apply_features)
    train_feats, train_labels = self.train.features(apply_features)
    test_feats, test_labels = self.test.features(apply_features)
    self.examples = {'pool': len(train_labels), 'test': len(test_labels)}
    return ridge_fewshot(train_feats, train_labels, test_feats, test_labels, shots=self.shots,
                         seeds=self.seeds, l2_regs=self.l2_regs,
                         val_per_class=self.val_per_class, num_classes=self.num_classes)

  def _checked_shape(self, apply_features: ApplyFeatures, images: np.ndarray):
    shape = self.image_shape
    if images.shape[1:] != shape:
      raise FewShotError(
          f'the pp {self.pp!r} makes {self.context.builder.name} images {images.shape[1:]}, but '
          f'the model takes {shape}: pass pp= with resize({shape[0]}, {shape[1]})'
          f'{" and to_rgb" if shape[-1] == 3 else ""} before the value ops.')
    return apply_features(images)
