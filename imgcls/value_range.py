"""value_range's arithmetic, shared by the pp op (TensorFlow, on the host) and the train and
eval steps (JAX, on the device). It imports only `math`, so the steps load no TensorFlow."""

from __future__ import annotations

import math
from typing import Any


def value_range_math(x: Any, vmin: float, vmax: float, in_min: float = 0,
                     in_max: float = 255, barrier: Any = None) -> Any:
  """x (float32, a tf.Tensor or a jax.Array) mapped from [in_min, in_max] to [vmin, vmax],
  with the bits of (x - in_min) / (in_max - in_min) * (vmax - vmin) + vmin.

  One formula for both sides, so that the `value_range` op and the train step's on-device
  form (`imgcls.data.preprocess.split_value_range`) give the same bits. barrier (the step
  passes jax.lax.optimization_barrier) rounds each pass on its own, where XLA would fuse
  them (a fused multiply-add rounds once), and divides by a full array, since XLA:CPU
  multiplies by the reciprocal of a scalar divisor instead (1 ulp off for some uint8
  values; tests/test_pipeline.py compares the bits).
  Fewer passes than the formula, same bits: subtracting 0 changes nothing, nor does adding 0
  to a non-negative scale's product, and when |scale| is a power of two (value_range(-1, 1),
  (0, 1)) x / (d / scale) rounds exactly as x / d * scale does.
  """
  keep = barrier or (lambda v: v)
  scale = vmax - vmin
  if in_min != 0:
    x = keep(x - in_min)
  if scale != 0 and math.frexp(abs(scale))[0] == 0.5:
    x = _divide(x, (in_max - in_min) / scale, barrier)
  else:
    x = keep(_divide(x, in_max - in_min, barrier)) * scale
  if vmin != 0 or scale < 0:
    x = vmin + keep(x)
  return x


def _divide(x: Any, d: float, barrier: Any) -> Any:
  """x / d, rounded as IEEE division: with a barrier, d is a hidden array of x's shape."""
  return x / barrier(x * 0 + d) if barrier else x / d
