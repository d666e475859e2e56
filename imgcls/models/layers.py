"""Small pieces shared by the model families."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def drop_path(module: nn.Module, y: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Stochastic depth: zeroes a residual branch for a random subset of examples and rescales
  the rest by 1 / (1 - rate); draws from `module`'s 'dropout' rng. Identity when deterministic."""
  if deterministic or rate == 0.0:
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
