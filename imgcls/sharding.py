"""Where each array of the train state lives: replicated, or sharded over the data axis (FSDP).

'fsdp' splits every array of `min_bytes` or more along its largest dimension that the device
count divides, as big_vision's `fsdp` rule does; smaller arrays stay replicated. The rule reads
only shapes, so a parameter, its gradient, its Adam moments and its EMA copy are split alike,
and a checkpoint restores onto any mesh given the new run's target shardings.

The step stays per-device code under `jax.shard_map` (parallel.data_parallel): each sharded
parameter is all-gathered where a module reads it (`gather_on_read`), inside its
rematerialised or scanned block, so the backward pass gathers a block's parameters again
instead of keeping every whole parameter alive, and the all-gather's transpose reduce-scatters
each gradient onto its shard as soon as it is computed; optax updates the shards.
"""

from __future__ import annotations

import math
from typing import Any

from flax import struct
from flax.core import meta
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from imgcls.errors import ConfigError
from imgcls.parallel import AXIS

STRATEGIES = ('replicated', 'fsdp')
MIN_BYTES = 4 * 2**20  # big_vision's fsdp default (min_size_to_shard_mb=4)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def spec_for(shape: tuple[int, ...], dtype: Any, num_devices: int, strategy: str = 'fsdp',
             min_bytes: int = MIN_BYTES) -> P:
  """The PartitionSpec of one array: split on AXIS along its largest dimension that
  `num_devices` divides (the first of equals), or P() (replicated)."""
  if strategy not in STRATEGIES:
    raise ConfigError(f'sharding must be one of {", ".join(STRATEGIES)}, got {strategy!r}: set '
                      "--config.sharding=fsdp or --config.sharding=replicated.")
  if (strategy == 'replicated' or num_devices == 1 or jax.dtypes.issubdtype(
      dtype, jax.dtypes.extended) or math.prod(shape) * jnp.dtype(dtype).itemsize < min_bytes):
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_devices == 0:
      return P(*(None,) * dim, AXIS)
  return P()


def state_specs(tree: Any, num_devices: int, strategy: str = 'fsdp',
                min_bytes: int = MIN_BYTES) -> Any:
  """The tree's PartitionSpecs under `strategy` (arrays or jax.ShapeDtypeStructs in)."""
  return jax.tree.map(
      lambda x: spec_for(jnp.shape(x), jnp.result_type(x), num_devices, strategy, min_bytes),
      tree)


def named(specs: Any, mesh: Mesh) -> Any:
  """PartitionSpecs -> NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def state_shardings(tree: Any, mesh: Mesh, strategy: str = 'fsdp',
                    min_bytes: int = MIN_BYTES) -> Any:
  """The tree's NamedShardings on `mesh` under `strategy`."""
  return named(state_specs(tree, mesh.size, strategy, min_bytes), mesh)


def abstract_state_with_shardings(state_shapes: Any, mesh: Mesh, strategy: str = 'fsdp',
                                  min_bytes: int = MIN_BYTES) -> Any:
  """jax.ShapeDtypeStructs carrying this mesh's shardings: the target an Orbax restore needs
  to place a checkpoint (written on any mesh, under either strategy) onto this run's mesh."""
  shardings = state_shardings(state_shapes, mesh, strategy, min_bytes)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
      state_shapes, shardings)


def _sharded_dim(spec: P) -> int | None:
  return next((d for d, name in enumerate(spec) if name is not None), None)


# shard_map FSDP rather than jit with in/out shardings: step.train_step stays per-device code
# (gathers inside its loss, a norm and a clip that read shards), its replicated path unchanged.
def gather(tree: Any, specs: Any, axis_name: str = AXIS) -> Any:
  """Per-device code: this device's shards -> whole arrays (replicated leaves, or every leaf
  when specs is None, as they are), all at once (the BatchNorm statistics, read and written
  whole). Differentiating through it reduce-scatters the gradients (all_gather's transpose)."""
  if specs is None:
    return tree
  def one(x, spec):
    dim = _sharded_dim(spec)
    return x if dim is None else lax.all_gather(x, axis_name, axis=dim, tiled=True)
  return jax.tree.map(one, tree, specs)


# A Flax metadata box rather than a gather written into each model: every family gathers
# where it reads (a ViT block inside its remat and scan, a ResNet block inside its remat).
class Shard(struct.PyTreeNode, meta.AxisMetadata):
  """A parameter as this device's shard, split along `dim` (counted from the end, so that the
  leading layer axis nn.scan stacks and slices leaves it as it is). Flax unboxes a parameter
  where a module reads it (`self.param`), and unboxing a Shard all-gathers the whole array."""
  value: Any
  dim: int = struct.field(pytree_node=False)
  axis_name: str = struct.field(pytree_node=False)

  def unbox(self) -> jax.Array:
    return lax.all_gather(self.value, self.axis_name, axis=self.value.ndim + self.dim,
                          tiled=True)

  def replace_boxed(self, val: Any) -> 'Shard':
    return self.replace(value=val)

  def add_axis(self, index: int, params: dict[Any, Any]) -> 'Shard':
    return self

  def remove_axis(self, index: int, params: dict[Any, Any]) -> 'Shard':
    return self


def gather_on_read(params: Any, specs: Any, axis_name: str = AXIS) -> Any:
  """Per-device code: this device's shards of a model's parameters, each sharded one boxed as
  a `Shard`, for `model.apply`: every module gathers its own parameters where it reads them
  (a ViT block inside its remat and scan), and the gradients come back reduce-scattered onto
  the shards. Replicated leaves, or all of them when specs is None, stay as they are."""
  if specs is None:
    return params
  def one(x, spec):
    dim = _sharded_dim(spec)
    return x if dim is None else Shard(x, dim - jnp.ndim(x), axis_name)
  return jax.tree.map(one, params, specs)


def shard(tree: Any, specs: Any, axis_name: str = AXIS) -> Any:
  """Per-device code: whole arrays, equal on every device -> this device's shards (as they
  are when specs is None)."""
  if specs is None:
    return tree
  def one(x, spec):
    dim = _sharded_dim(spec)
    if dim is None:
      return x
    size = x.shape[dim] // lax.axis_size(axis_name)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * size, size, dim)
  return jax.tree.map(one, tree, specs)


def _varies(x: Any, axis_name: str) -> bool:
  """Whether shard_map types `x` as differing across `axis_name` (its vma, JAX >= 0.12's
  manual_axis_type.varying)."""
  aval = jax.typeof(x)
  mat = getattr(aval, 'manual_axis_type', None)
  return axis_name in (mat.varying if mat is not None else getattr(aval, 'vma', ()))


def global_norm(tree: Any, axis_name: str = AXIS) -> jax.Array:
  """The L2 norm of the whole arrays a tree of shards stands for: a leaf that varies over
  `axis_name` (a shard) has its squares summed over the axis; one that does not (replicated,
  e.g. a gradient already summed by shard_map) counts once. Outside shard_map, optax's norm."""
  squares = [(jnp.sum(jnp.square(x.astype(jnp.float32))), _varies(x, axis_name))
             for x in jax.tree.leaves(tree)]
  total = sum((sq for sq, varies in squares if not varies), jnp.zeros((), jnp.float32))
  shards = [sq for sq, varies in squares if varies]
  if shards:
    total += lax.psum(sum(shards), axis_name)
  return jnp.sqrt(total)


def clip_by_global_norm(max_norm: float, axis_name: str = AXIS) -> optax.GradientTransformation:
  """optax.clip_by_global_norm with the norm of the whole arrays (`global_norm`), so that it
  clips sharded gradients as it clips replicated ones (needs shard_map's check_vma, the
  default, to tell shards from replicated leaves)."""
  def update(updates, state, params=None):
    del params
    norm = global_norm(updates, axis_name)
    return jax.tree.map(lambda u: jnp.where(norm < max_norm, u, (u / norm.astype(u.dtype)) *
                                            max_norm), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def all_finite(tree: Any, axis_name: str = AXIS) -> jax.Array:
  """Whether every whole array a tree of shards stands for is finite: one answer, the same on
  every device (shards are checked together over `axis_name`, as `global_norm` sums them)."""
  bad = [(jnp.sum(~jnp.isfinite(x)), _varies(x, axis_name)) for x in jax.tree.leaves(tree)]
  total = sum((n for n, varies in bad if not varies), jnp.zeros((), jnp.int32))
  shards = [n for n, varies in bad if varies]
  if shards:
    total += lax.psum(sum(shards), axis_name)
  return total == 0


def apply_if_finite(inner: optax.GradientTransformation, max_consecutive_errors: int,
                    axis_name: str = AXIS) -> optax.GradientTransformation:
  """optax.apply_if_finite (same state, so step.skipped_update reads it) deciding on
  `all_finite`: every device skips or applies the same update when the gradients are sharded."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(updates, state, params=None, **extra_args):
    finite = all_finite(updates, axis_name)
    count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
    updates, inner_state = lax.cond(
        finite | (count > max_consecutive_errors),
        lambda: inner.update(updates, state.inner_state, params, **extra_args),
        lambda: (optax.tree.zeros_like(updates), state.inner_state))
    return updates, optax.ApplyIfFiniteState(
        notfinite_count=count, last_finite=finite, inner_state=inner_state,
        total_notfinite=jnp.where(finite, state.total_notfinite,
                                  optax.safe_increment(state.total_notfinite)))

  return optax.GradientTransformationExtraArgs(init, update)
