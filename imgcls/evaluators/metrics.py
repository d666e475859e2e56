"""Scoring the whole eval split (every example once) into clu metrics, and the train metrics
the loop averages between logs."""

# No `from __future__ import annotations`: clu reads the field annotations as classes.

import dataclasses
from typing import Any, Callable, Iterable

from clu import metrics
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from imgcls import parallel


@flax.struct.dataclass
class Count(metrics.Metric):
  """How many examples were scored (a sum, unlike clu's per-call Counter)."""
  total: jnp.ndarray

  @classmethod
  def empty(cls) -> 'Count':
    return cls(total=jnp.array(0, jnp.float32))

  def merge(self, other: 'Count') -> 'Count':
    return type(self)(total=self.total + other.total)

  def compute(self) -> jnp.ndarray:
    return self.total


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average
  top1: metrics.Average
  top5: metrics.Average
  examples: Count

  @classmethod
  def from_sums(cls, sums: dict[str, Any]) -> 'EvalMetrics':
    """From the global sums that `step.eval_step` returns."""
    n = sums['count']
    return cls.empty().replace(loss=metrics.Average(total=sums['loss'], count=n),
                               top1=metrics.Average(total=sums['top1'], count=n),
                               top5=metrics.Average(total=sums['top5'], count=n),
                               examples=Count(total=n))


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average
  top1: metrics.Average

  @classmethod
  def from_step(cls, m: dict[str, Any]) -> 'TrainMetrics':
    """From the metrics of one `step.train_step` (loss is already the batch mean)."""
    return cls.empty().replace(
        loss=metrics.Average(total=m['loss'], count=jnp.ones((), jnp.int32)),
        top1=metrics.Average(total=m['top1_correct'], count=m['count']))


@dataclasses.dataclass
class EvalOutputs:
  """Per-example results of one eval pass (real examples only, in split order), for reports.

  `mistakes` holds up to `keep_images` of the most confidently wrong examples of the whole
  split (every process's, on every process) as (confidence, index in the split, image) with
  the image from the eval pipeline, most confident first.
  """
  probs: np.ndarray  # [N, C] softmax probabilities or sigmoid scores
  labels: np.ndarray  # [N, C] one-hot or multi-hot
  mistakes: list[tuple[float, int, np.ndarray]]


def _gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the whole of it as numpy, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _process_rows(mesh, rows: int) -> dict[int, np.ndarray]:
  """{process: the rows of a batch-sharded global batch of `rows` that hold its host batch, in
  order} (shard_batch lays a host batch over its devices' shards in row order)."""
  sharding = parallel.batch_sharded(mesh)
  out: dict[int, list[int]] = {}
  for device, index in sharding.devices_indices_map((rows,)).items():
    out.setdefault(device.process_index, []).extend(range(*index[0].indices(rows)))
  return {p: np.asarray(sorted(set(r))) for p, r in out.items()}


def _gather_mistakes(mistakes: list[tuple[float, int, np.ndarray]], keep: int, image_shape
                     ) -> list[tuple[float, int, np.ndarray]]:
  """Every process's most confident mistakes, on every process (most confident first)."""
  if jax.process_count() == 1:
    return mistakes
  conf = np.full((keep,), -np.inf, np.float32)
  index = np.full((keep,), -1, np.int64)
  images = np.zeros((keep, *image_shape), np.float32)
  for i, (c, j, image) in enumerate(mistakes):
    conf[i], index[i], images[i] = c, j, image
  conf, index, images = (np.asarray(multihost_utils.process_allgather(x))
                         for x in (conf, index, images))
  found = [(float(c), int(j), im) for c, j, im in zip(conf.ravel(), index.ravel(),
                                                       images.reshape(-1, *image_shape))
           if j >= 0]
  return sorted(found, key=lambda t: -t[0])[:keep]


def evaluate(eval_fn: Callable[[Any, Any], Any], state: Any, batches: Iterable[Any],
             mesh, collect: bool = False, keep_images: int = 0
             ) -> tuple[dict[str, float], EvalOutputs | None]:
  """Runs `eval_fn` over every batch; returns loss, top1, top5 and examples scored, and with
  `collect` the per-example outputs (probabilities, labels, confident mistakes).

  Each process reads a contiguous part of the split (data.eval_data), so the per-example
  outputs are put back in split order (process 0's part, then process 1's, ...) and a
  mistake's index is its example's index in the split, whatever the process count.
  """
  total = None
  probs: dict[int, list[np.ndarray]] = {}  # process -> its real examples' rows, in order
  labels: dict[int, list[np.ndarray]] = {}
  seen = {}  # process -> real examples of its part scored so far
  mistakes, image_shape = [], None
  for host_batch in batches:
    sums, per_example = eval_fn(state, parallel.shard_batch(host_batch, mesh))
    m = EvalMetrics.from_sums(sums)
    total = m if total is None else total.merge(m)
    if not collect:
      continue
    p, y, mask = (_gather(per_example[k]) for k in ('probs', 'labels', 'mask'))
    me = jax.process_index()
    for proc, rows in sorted(_process_rows(mesh, len(mask)).items()):
      real = mask[rows] > 0  # real examples first, padding after (data.eval_data)
      lp, ly = p[rows][real], y[rows][real]
      if proc == me and keep_images:
        wrong = np.flatnonzero(np.argmax(lp, -1) != np.argmax(ly, -1))
        images = np.asarray(host_batch['image'])[real]
        image_shape = images.shape[1:]
        mistakes += [(float(lp[i].max()), (proc, seen.get(proc, 0) + int(i)), images[i])
                     for i in wrong]
        mistakes = sorted(mistakes, key=lambda t: -t[0])[:keep_images]
      probs.setdefault(proc, []).append(lp)
      labels.setdefault(proc, []).append(ly)
      seen[proc] = seen.get(proc, 0) + int(real.sum())
  if total is None:
    raise ValueError('the eval split yielded no batches')
  out = parallel.to_host(total.compute())
  result = {k: float(v) for k, v in out.items()}
  result['examples'] = int(np.rint(result['examples']))
  if not collect:
    return result, None
  order = sorted(probs)
  start = dict(zip(order, np.cumsum([0] + [seen[q] for q in order])))  # part offsets
  mistakes = [(c, int(start[q] + i), image) for c, (q, i), image in mistakes]
  if keep_images:
    shape = image_shape if image_shape is not None else np.asarray(
        next(iter(batches))['image']).shape[1:]
    mistakes = _gather_mistakes(mistakes, keep_images, shape)
  return result, EvalOutputs(np.concatenate([a for q in order for a in probs[q]]),
                             np.concatenate([a for q in order for a in labels[q]]), mistakes)
