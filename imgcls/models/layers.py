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
