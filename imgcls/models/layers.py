"""Small pieces shared by the model families, and the hardware lowering they take.

The lowering pattern (every family follows it): the few ops whose fastest XLA program depends
on the hardware are computed through a `Lowering` the model receives as a field,

  class MyNet(nn.Module):
    ...
    lowering: Lowering = PLAIN      # last field; pass it down to submodules that need it

  y = self.lowering.conv(x, kernel, strides, padding)   # NHWC x HWIO, explicit zero padding
  y = self.lowering.relu(y)
  y = self.lowering.max_pool(y, (3, 3), (2, 2), ((1, 1), (1, 1)))
  y = nn.Dense(n, dot_general=self.lowering.dot_general)(y)   # also attention's qkv/out

never chosen inside the model. PLAIN (the default) is lax's conv, jax.nn.relu, a max-pool made
of strided slices (it exports to ONNX) and lax.dot_general; `imgcls.models.from_config` passes
cpu_kernels.CPU instead when imgcls.hardware says the run computes on a CPU. Both give the same
values; configs cannot set `lowering` (models.model_kwargs leaves it out).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgcls.errors import ConfigError

Padding = tuple[tuple[int, int], tuple[int, int]]


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: Padding) -> jax.Array:
  """NHWC x HWIO convolution with zero padding ((top, bottom), (left, right)): lax's."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = 'VALID') -> jax.Array:
  """flax.linen.max_pool (channels last, -inf padding) as the max of the window's strided
  slices: the same values, element-wise ops only, so it exports to ONNX (jax2onnx's MaxPool
  does not load in onnxruntime). Where inputs tie exactly the gradient is shared among them
  (reduce_window's goes to one): both are valid subgradients with the same total."""
  nd = len(window_shape)
  strides = tuple(strides or (1,) * nd)
  lead = inputs.ndim - nd - 1
  spatial = inputs.shape[lead:lead + nd]
  pads = (jax.lax.padtype_to_pads(spatial, window_shape, strides, padding)
          if isinstance(padding, str) else [tuple(p) for p in padding])
  x = jnp.pad(inputs, [(0, 0)] * lead + list(pads) + [(0, 0)], constant_values=-jnp.inf)
  sizes = [(x.shape[lead + d] - window_shape[d]) // strides[d] + 1 for d in range(nd)]
  out = None
  for offsets in itertools.product(*(range(k) for k in window_shape)):
    index = ((slice(None),) * lead +
             tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offsets, strides, sizes)))
    out = x[index] if out is None else jnp.maximum(out, x[index])
  return out


@dataclasses.dataclass(frozen=True)
class Lowering:
  """How a model computes its hardware-sensitive ops: the same math, as different programs.

  conv(x, kernel, strides, padding), relu(x), max_pool(x, window, strides, padding) and
  dot_general (lax.dot_general's signature: flax's Dense and attention `dot_general` fields).
  """
  conv: Callable[..., jax.Array] = conv2d
  relu: Callable[[jax.Array], jax.Array] = jax.nn.relu
  max_pool: Callable[..., jax.Array] = max_pool
  dot_general: Callable[..., Any] = jax.lax.dot_general


PLAIN = Lowering()  # every model's default: portable (exports as it is), any backend


# model.remat: which activations a rematerialised block keeps for the backward pass (the rest
# are recomputed); '' and 'none' keep everything (no remat). jax.checkpoint_policies' names.
REMAT_POLICIES = {
    '': None,
    'none': None,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str) -> None:
  """A one-line ConfigError unless `policy` is one of REMAT_POLICIES."""
  if policy not in REMAT_POLICIES:
    raise ConfigError(f'model.remat must be one of {", ".join(map(repr, REMAT_POLICIES))}, got '
                      f'{policy!r}: set e.g. --config.model.remat=nothing_saveable.')


def remat(module: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = (),
          prevent_cse: bool = True) -> type[nn.Module]:
  """`module` rematerialised with the named policy (nn.remat: its parameters keep their names),
  or `module` itself when policy is '' or 'none'. static_argnums count `self` as 0: Python
  flags such as `train` / `deterministic` must be passed positionally there."""
  check_remat(policy)
  if REMAT_POLICIES[policy] is None:
    return module
  return nn.remat(module, policy=REMAT_POLICIES[policy], static_argnums=static_argnums,
                  prevent_cse=prevent_cse)


def drop_path(module: nn.Module, y: jax.Array, rate: float | jax.Array,
              deterministic: bool) -> jax.Array:
  """Stochastic depth: zeroes a residual branch for a random subset of examples and rescales
  the rest by 1 / (1 - rate); draws from `module`'s 'dropout' rng. Identity when deterministic.
  `rate` may be traced (a scanned block's per-layer rate): then it always draws."""
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return y
  keep = 1.0 - rate
  shape = (y.shape[0],) + (1,) * (y.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  return jnp.where(mask, y / keep, jnp.zeros_like(y))


def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
  """GELU: the tanh approximation (flax's default) or the exact x * Phi(x) (torch's and timm's).

  The exact form goes through `_gelu_exact`, which states its own derivative: in JAX 0.12 the
  derivative of `lax.erf`/`erfc` fails inside `jax.shard_map` with its default check_vma
  ("Primitive polynomial requires varying manual axes to match"), so the train step could
  not differentiate `nn.gelu(x, approximate=False)` (tests/test_vit.py trains one)."""
  return nn.gelu(x, approximate=True) if approximate else _gelu_exact(x)


@jax.custom_jvp
def _gelu_exact(x: jax.Array) -> jax.Array:
  return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


@_gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  cdf = _normal_cdf(x)
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(0.3989422804014327, x.dtype)  # 1 / sqrt(2 pi)
  return x * cdf, (cdf + x * pdf) * t
