"""Scoring the whole eval split (every example once) into clu metrics."""

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

  `mistakes` holds up to `keep_images` of this process's most confidently wrong examples
  as (confidence, index, image) with the image from the eval pipeline, most confident first.
  """
  probs: np.ndarray  # [N, C] softmax probabilities or sigmoid scores
  labels: np.ndarray  # [N, C] one-hot or multi-hot
  mistakes: list[tuple[float, int, np.ndarray]]


def _gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the whole of it as numpy, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(eval_fn: Callable[[Any, Any], Any], state: Any, batches: Iterable[Any],
             mesh, collect: bool = False, keep_images: int = 0
             ) -> tuple[dict[str, float], EvalOutputs | None]:
  """Runs `eval_fn` over every batch; returns loss, top1, top5 and examples scored, and with
  `collect` the per-example outputs (probabilities, labels, confident mistakes)."""
  total = None
  probs, labels, mistakes = [], [], []
  seen = 0
  for host_batch in batches:
    sums, per_example = eval_fn(state, parallel.shard_batch(host_batch, mesh))
    m = EvalMetrics.from_sums(sums)
    total = m if total is None else total.merge(m)
    if not collect:
      continue
    p, y, mask = (_gather(per_example[k]) for k in ('probs', 'labels', 'mask'))
    real = mask > 0
    if keep_images:
      # The host batch is this process's slice of the global batch (devices are ordered by
      # process), so its rows start at process_index * local rows.
      local = len(host_batch['image'])
      start = jax.process_index() * local
      lp, ly, lm = p[start:start + local], y[start:start + local], real[start:start + local]
      wrong = (np.argmax(lp, -1) != np.argmax(ly, -1)) & lm
      for i in np.flatnonzero(wrong):
        index = seen + int(np.sum(real[:start])) + int(np.sum(lm[:i]))
        mistakes.append((float(lp[i].max()), index, np.asarray(host_batch['image'][i])))
      mistakes = sorted(mistakes, key=lambda t: -t[0])[:keep_images]
    probs.append(p[real])
    labels.append(y[real])
    seen += int(real.sum())
  if total is None:
    raise ValueError('the eval split yielded no batches')
  out = parallel.to_host(total.compute())
  result = {k: float(v) for k, v in out.items()}
  result['examples'] = int(np.rint(result['examples']))
  if not collect:
    return result, None
  return result, EvalOutputs(np.concatenate(probs), np.concatenate(labels), mistakes)
