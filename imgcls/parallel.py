"""Data parallelism: one mesh axis over every device of every process.

Steps are written per device, pmap-style, with collectives over the named axis
`AXIS`, and mapped with `jax.shard_map` (JAX's successor to `jax.pmap`, which has
itself been built on shard_map since JAX 0.8). Several hosts join through
`jax.distributed`, JAX's own multi-process runtime. Where each array of the train state
lives (replicated, or sharded over AXIS: config.sharding='fsdp') is imgcls.sharding's rule.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from imgcls.errors import ConfigError

AXIS = 'batch'


# What JAX's own SLURM detection (jax._src.clusters.SlurmCluster) reads: srun sets them all.
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
              'SLURM_LOCALID')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> str | None:
  """Joins the multi-process runtime when asked to, or when launched by a cluster JAX reads.

  Explicit arguments (the CLI's --coordinator_address/--num_processes/--process_id) win.
  Otherwise `jax.distributed.initialize()` is called with no arguments where JAX finds the
  layout itself: under `srun` (SLURM: coordinator = first node of the step, port from the
  job id, one process per task, each task's GPU = its SLURM_LOCALID), on a Cloud TPU VM
  (every worker of the slice from the metadata server), or with JAX_COORDINATOR_ADDRESS set.
  A single process on one machine needs nothing. Returns how it joined (None: it did not).
  """
  if coordinator_address or num_processes:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    how = 'flags'
  else:
    how = cluster()
    if how is None:
      return None
    jax.distributed.initialize()
  logging.info('jax.distributed (%s): process %d of %d, %d local / %d global devices', how,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return how


def cluster() -> str | None:
  """The launcher JAX can read the process layout from: 'slurm', 'tpu', 'env' or None."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  env = os.environ
  if all(k in env for k in SLURM_VARS):
    return 'slurm'
  if 'JAX_COORDINATOR_ADDRESS' in env:  # with JAX_NUM_PROCESSES / JAX_PROCESS_ID or a cluster
    return 'env'
  on_tpu_vm = bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))
  if 'TPU_WORKER_HOSTNAMES' in env or (on_tpu_vm and importlib.util.find_spec('libtpu')):
    return 'tpu'
  return None


def compilation_cache(enabled: bool = True) -> str | None:
  """Turns JAX's persistent compilation cache on (in JAX_COMPILATION_CACHE_DIR when set, else
  $XDG_CACHE_HOME/imgcls/xla, i.e. ~/.cache/imgcls/xla) or off; returns its folder or None."""
  import os  # pylint: disable=g-import-not-at-top
  if not enabled:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  path = jax.config.jax_compilation_cache_dir or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'imgcls', 'xla')
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  return path


def cache_state() -> str:
  """The compilation cache's folder, or 'off'."""
  path = jax.config.jax_compilation_cache_dir
  return path if path and jax.config.jax_enable_compilation_cache else 'off'


class CacheProbe:
  """Whether the persistent compilation cache served the compiles run inside the block:
  `.result` is 'hit', 'miss' or 'off'."""

  def __enter__(self) -> 'CacheProbe':
    self.events: list[str] = []
    jax.monitoring.register_event_listener(self._listen)
    return self

  def _listen(self, event: str, **_: Any) -> None:
    self.events.append(event)

  def __exit__(self, *exc: Any) -> None:
    jax.monitoring.unregister_event_listener(self._listen)

  @property
  def result(self) -> str:
    if '/jax/compilation_cache/cache_hits' in self.events:
      return 'hit'
    return 'miss' if '/jax/compilation_cache/compile_requests_use_cache' in self.events else 'off'


def make_mesh(devices: list[Any] | None = None) -> Mesh:
  """A one-axis mesh over all devices (of all processes) or the ones given."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'batch_size') -> int:
  """Returns the per-device batch; a clear error when the batch does not divide."""
  n = mesh.size
  if global_batch_size % n or global_batch_size < n:
    lower = max(n, global_batch_size // n * n)
    raise ConfigError(
        f'{what}={global_batch_size} does not divide evenly over the {n} devices '
        f'({jax.process_count()} process(es)). Use a multiple of {n}, e.g. '
        f'--config.{what}={lower} or {lower + n}.')
  return global_batch_size // n


def check_grad_accum(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> int:
  """Returns the microbatch per device; a clear error when grad_accum_steps does not divide
  the per-device batch."""
  per_device = global_batch_size // mesh.size
  if grad_accum_steps < 1 or per_device % grad_accum_steps:
    ok = [k for k in range(1, per_device + 1) if per_device % k == 0]
    raise ConfigError(
        f'grad_accum_steps={grad_accum_steps} must divide the per-device batch of '
        f'{per_device} (batch_size={global_batch_size} over {mesh.size} devices); use one of '
        f'{", ".join(map(str, ok[:12]))}{" ..." if len(ok) > 12 else ""}.')
  return per_device // grad_accum_steps


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def shard_batch(host_batch: Any, mesh: Mesh) -> Any:
  """This process's part of a global batch (numpy) -> global jax.Arrays split on AXIS."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      host_batch)


def data_parallel(fn: Callable[..., Any], mesh: Mesh, *, in_specs: Any,
                  out_specs: Any, donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
  """jit(shard_map(fn)): `fn` sees one device's shard and may use collectives on AXIS."""
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                 donate_argnums=donate_argnums)


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy (works across processes): a replicated array is read from this
  process's first copy, a sharded one (an fsdp state, imgcls.sharding) gathered whole."""
  def one(x):
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)
