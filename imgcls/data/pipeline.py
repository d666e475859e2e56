"""Train and eval tf.data pipelines: per-process parts, exact resume, exact padded eval.

Records are read with images still encoded and decoded by the pp string's `decode` op.

Train order: every process walks the same global order of the split's N examples and keeps
its contiguous slice of each global batch (process p of P: rows p*B/P .. (p+1)*B/P - 1).
Epoch e cuts the split, in file order, into windows of W = min(shuffle_buffer, N) records
and permutes each window with a stateless seed from (seed, e, window), which also draws one
seed per position for the random pp ops. Epochs follow one another without a gap; batches
may straddle them. So global batch k is a pure function of (seed, k), whatever the process
and device counts (a run resumes on another topology with the same data), and starting at
step s costs reading at most one epoch of raw records: no decoding and no iterator state to
checkpoint. W >= N gives a full permutation of the split every epoch.

sampling='balanced' (single-label) holds the split's encoded records in memory instead and
draws each global position i.i.d.: a class uniformly, then one of its records (`_balanced`).

Both pipelines take the full pp string and own its device-side tail: with
value_range_on_device, a final value_range leaves tf.data (images stay uint8) and the
returned object's `value_range` tells the train or eval step to apply it on the device.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from imgcls.data import preprocess
from imgcls.data.base import DataError
from imgcls.data.sources import num_examples

Batch = dict[str, np.ndarray]


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return index, count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f'Global batch size {global_batch_size} must be a positive multiple of the '
                    f'process count {process_count}: change the batch size.')
  return global_batch_size // process_count


def _key(*data: int | tf.Tensor) -> tf.Tensor:
  """A stateless seed (int64 [2]) folded from integers."""
  key = tf.constant([0, 0], tf.int64)
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def _read(builder: tfds.core.DatasetBuilder, split: Any) -> tf.data.Dataset:
  """The split's records in file order, images still encoded."""
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  return builder.as_dataset(split=split, decoders=decoders, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))


def _public(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: v for k, v in features.items() if not k.startswith('_')}


def _checked(ds: tf.data.Dataset, pp: str, threads: int | None = None) -> tf.data.Dataset:
  """Fails fast if the pp string left encoded images; makes the order deterministic.

  threads: the size of a private thread pool for this pipeline (None: TF's shared pool, one
  thread per core).
  """
  encoded = [k for k, spec in ds.element_spec.items() if spec.dtype == tf.string]
  if encoded:
    raise DataError(f'pp {pp!r} leaves encoded bytes in {encoded}: start it with '
                    "'decode' (or drop the key with keep(...)).")
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return ds.with_options(options)


class TrainBatches:
  """An iterator of train batches and the value_range the train step applies to them (None:
  the images are final as they come)."""

  def __init__(self, batches: Iterator[Batch], value_range: dict[str, float] | None = None):
    self._batches = batches
    self.value_range = value_range

  def __iter__(self) -> 'TrainBatches':
    return self

  def __next__(self) -> Batch:
    return next(self._batches)


def train_iterator(builder: tfds.core.DatasetBuilder, *, split: str, pp: str,
                   global_batch_size: int, seed: int, start_step: int = 0,
                   shuffle_buffer: int = 50_000, cache: bool = True, prefetch: int = 2,
                   process_index: int | None = None, process_count: int | None = None,
                   threads: int | None = None,
                   value_range_on_device: bool = False,
                   sampling: str = 'uniform') -> TrainBatches:
  """Infinite stream of this process's share of each global batch, from batch start_step on.

  threads: tf.data's private thread pool size (None: TF's shared pool, one thread per core).
  value_range_on_device: a final value_range of pp is left to the train step (`.value_range`
  of the result; config.value_range_on_device).
  sampling: 'uniform' (epochs of permuted windows) or 'balanced' (config.dataset.sampling).
  """
  index, count = _process(process_index, process_count)
  batch = _local_batch(global_batch_size, count)
  pp, value_range = preprocess.split_value_range(pp, value_range_on_device)
  pp_fn = preprocess.get_pp_fn(pp)
  part = tfds.even_splits(split, count)[index]
  n = num_examples(builder, part)
  if n == 0:
    raise DataError(f'Split {split!r} has no examples for process {index} of {count}.')
  if sampling == 'balanced':
    ds = _balanced(builder, split, seed, start_step, global_batch_size, index, batch)
    ds = _checked(ds.map(lambda f: _public(pp_fn(f)), num_parallel_calls=tf.data.AUTOTUNE), pp,
                  threads)
    return TrainBatches(
        ds.batch(batch, drop_remainder=True).prefetch(prefetch).as_numpy_iterator(), value_range)
  if sampling != 'uniform':
    raise DataError(f"sampling must be 'uniform' or 'balanced', got {sampling!r}.")
  # Elastic: each process reads the whole split (P times the raw reads, decoding only its
  # share) and filters its slice of every global batch out of the one global order.
  n, raw = num_examples(builder, split), _read(builder, split)
  window = max(1, min(shuffle_buffer, n))
  first_epoch, offset = divmod(start_step * global_batch_size, n)
  first_window, skip = divmod(offset, window)
  if cache:  # Filled here in one pass, so no iterator ever leaves it half-written.
    raw = raw.cache()
    raw.reduce(np.int64(0), lambda c, _: c + 1)

  def shuffle_window(epoch, w, records):
    """Window w of the epoch, permuted, with one seed per position for the random pp ops."""
    size = tf.shape(records[next(iter(records))])[0]
    perm = tf.random.experimental.stateless_shuffle(tf.range(size), _key(seed, 0, 0, epoch, w))
    rngs = tf.random.stateless_uniform([size, 2], _key(seed, 0, 1, epoch, w), minval=None,
                                       maxval=None, dtype=tf.int64)
    start = tf.where((epoch == first_epoch) & (w == first_window), skip, 0)
    out = {k: tf.gather(v, perm[start:]) for k, v in records.items()}
    out[preprocess.RNG_KEY] = rngs[start:]
    return out

  def one_epoch(epoch):
    to_skip = tf.where(epoch == first_epoch, tf.constant(first_window, tf.int64), 0)
    # ragged: multi-label records hold a variable-length 'labels' list.
    windows = raw.ragged_batch(window).enumerate().skip(to_skip)
    return windows.map(lambda w, r: shuffle_window(epoch, w, r)).unbatch()

  ds = tf.data.Dataset.counter(first_epoch).flat_map(one_epoch)
  if count > 1:  # global position i (from the start step's first row) -> row i % B
    ds = ds.enumerate().filter(
        lambda i, _: (i % global_batch_size) // batch == index).map(lambda _, f: f)
  ds = _checked(ds.map(lambda f: _public(pp_fn(f)), num_parallel_calls=tf.data.AUTOTUNE), pp,
                threads)
  return TrainBatches(ds.batch(batch, drop_remainder=True).prefetch(prefetch).as_numpy_iterator(),
                      value_range)


def _balanced(builder: tfds.core.DatasetBuilder, split: str, seed: int, start_step: int,
              global_batch: int, index: int, batch: int) -> tf.data.Dataset:
  """This process's rows (index*batch .. of each global batch) of the class-balanced stream
  from step start_step on: global position i draws a class uniformly (among those the split
  holds) and one of its records uniformly, from a stateless seed of (seed, i); its pp seed
  too. So global batch k is a pure function of (seed, k), whatever the process count."""
  from imgcls.data import label_counts  # pylint: disable=g-import-not-at-top
  key, k = label_counts.single_label_key(builder, "dataset.sampling='balanced'")
  n = num_examples(builder, split)
  records = _read(builder, split).batch(n).get_single_element()  # Encoded, in file order.
  labels = tf.cast(records[key], tf.int64)
  order = tf.argsort(labels, stable=True)  # Record ids grouped by class.
  counts = tf.math.bincount(labels, minlength=k, maxlength=k, dtype=tf.int64)
  starts = tf.cumsum(counts, exclusive=True)
  present = tf.reshape(tf.where(counts > 0), [-1])

  def draw(j):
    i = (j // batch) * global_batch + index * batch + j % batch  # j: this process's j-th row
    u = tf.random.stateless_uniform([2], _key(seed, 2, i), dtype=tf.float64)
    c = tf.gather(present, tf.cast(u[0] * tf.cast(tf.size(present), tf.float64), tf.int64))
    r = tf.cast(u[1] * tf.cast(counts[c], tf.float64), tf.int64)  # the class's r-th record
    pos = order[starts[c] + r]
    out = {name: v[pos] for name, v in records.items()}
    out[preprocess.RNG_KEY] = tf.random.stateless_uniform(
        [2], _key(seed, 3, i), minval=None, maxval=None, dtype=tf.int64)
    return out

  return tf.data.Dataset.counter(start_step * batch).map(draw,
                                                         num_parallel_calls=tf.data.AUTOTUNE)


class EvalData:
  """A split for evaluation, re-iterable: each pass yields every example once, padded.
  `value_range`: what the eval step applies to the (uint8) images, or None."""

  def __init__(self, ds: tf.data.Dataset, num_examples: int, num_batches: int,
               value_range: dict[str, float] | None = None):
    self._ds = ds
    self.num_examples = num_examples  # In the split, over all processes.
    self.num_batches = num_batches  # Per pass; the same on every process.
    self.value_range = value_range

  def __iter__(self) -> Iterator[Batch]:
    return self._ds.as_numpy_iterator()

  def __len__(self) -> int:
    return self.num_batches


def eval_data(builder: tfds.core.DatasetBuilder, *, split: str, pp: str,
              global_batch_size: int, process_index: int | None = None,
              process_count: int | None = None, threads: int | None = None,
              value_range_on_device: bool = False) -> EvalData:
  """This process's part of `split`, batched, with mask 1 for examples, 0 for padding.

  threads, value_range_on_device: as for train_iterator (the eval step applies
  `.value_range`)."""
  index, count = _process(process_index, process_count)
  batch = _local_batch(global_batch_size, count)
  pp, value_range = preprocess.split_value_range(pp, value_range_on_device)
  pp_fn = preprocess.get_pp_fn(pp)
  total = num_examples(builder, split)
  if total == 0:
    raise DataError(f'Eval split {split!r} of {builder.name} is empty: pick another split.')
  parts = tfds.even_splits(split, count)
  sizes = [num_examples(builder, p) for p in parts]
  num_batches = math.ceil(max(sizes) / batch)

  def example(i, features):
    features = dict(features, **{preprocess.RNG_KEY: _key(i)})
    return dict(_public(pp_fn(features)), mask=tf.constant(1.0))

  ds = _read(builder, parts[index]).enumerate(sum(sizes[:index]))  # Index in the split.
  ds = _checked(ds.map(example, num_parallel_calls=tf.data.AUTOTUNE), pp, threads)
  # Padding: zeros (mask too) shaped like a real example, so shapes need not be static.
  pad = _read(builder, split).take(1).enumerate().map(example)
  pad = pad.map(lambda f: tf.nest.map_structure(tf.zeros_like, f)).cache()
  ds = ds.concatenate(pad.repeat(num_batches * batch - sizes[index]))
  return EvalData(ds.batch(batch).prefetch(2), total, num_batches, value_range)
