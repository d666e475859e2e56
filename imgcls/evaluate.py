"""Scoring the whole eval split (every example once) into clu metrics."""

# No `from __future__ import annotations`: clu reads the field annotations as classes.

from typing import Any, Callable, Iterable

from clu import metrics
import flax
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


def evaluate(eval_fn: Callable[[Any, Any], Any], state: Any, batches: Iterable[Any],
             mesh) -> dict[str, float]:
  """Runs `eval_fn` over every batch; returns loss, top1, top5 and examples scored."""
  total = None
  for host_batch in batches:
    sums = eval_fn(state, parallel.shard_batch(host_batch, mesh))
    m = EvalMetrics.from_sums(sums)
    total = m if total is None else total.merge(m)
  if total is None:
    raise ValueError('the eval split yielded no batches')
  out = parallel.to_host(total.compute())
  result = {k: float(v) for k, v in out.items()}
  result['examples'] = int(np.rint(result['examples']))
  return result
