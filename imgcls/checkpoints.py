"""Orbax checkpoints of the train state: save, resume, keep the latest and the best.

Each checkpoint holds the state (params, batch_stats, opt_state, step, rng) and a
JSON `meta` item: the config that wrote it and the eval metrics. Restoring uses an
abstract target carrying the current shardings, so a checkpoint written on N devices
restores onto M.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(ValueError):
  """A checkpoint that cannot be used with this run; the message says what to do."""


BEST_METRIC = 'top1'


def absolute(path: str) -> epath.Path:
  """Orbax needs absolute paths (a relative one fails at save time, not set-up)."""
  p = epath.Path(path)
  return p if '://' in str(path) else epath.Path(p.expanduser().resolve())


def checkpoint_dir(workdir: str) -> epath.Path:
  return absolute(workdir) / 'checkpoints'


class Checkpointer:
  """An orbax CheckpointManager keeping the latest checkpoint and the best by eval top-1."""

  def __init__(self, workdir: str, *, asynchronous: bool = True, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m[BEST_METRIC], best_mode='max',
        # best_fn with max_to_keep would delete the latest checkpoint: keep both.
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=1),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only,
        read_only=read_only, create=not read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None = None, force: bool = True) -> None:
    meta = dict(meta, metrics=metrics)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=force)

  def resolve(self, which: str | int) -> int:
    """'latest', 'best' or a step number -> a step that exists."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}. Train first, or pass '
                            'the workdir of a finished run.')
    if which == 'latest':
      return self.latest_step()
    if which == 'best':
      return self.best_step() or self.latest_step()
    step = int(which)
    if step not in steps:
      raise CheckpointError(f'no checkpoint at step {step} in {self.directory}; '
                            f'saved steps: {sorted(steps)}.')
    return step

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, target: Any) -> Any:
    """Restores the state at `step` onto the shapes and shardings of `target`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    try:
      return self._restore(step, abstract)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'the checkpoint at step {step} in {self.directory} does not fit this model '
          f'({str(e).splitlines()[0][:300]}). It was written by a different model or '
          'config: use a new --workdir, or the config that wrote it.') from e

  def _restore(self, step: int, abstract: Any) -> Any:
    # The state is restored field by field as a dict, so that a field that is None in the
    # target (the EMA copy when ema_decay is 0) may be missing on disk: checkpoints written
    # before TrainState had the EMA fields lack them, and Orbax wants the trees equal.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      on_disk = set(handler.metadata(self.directory / str(step) / 'state').tree)
    finally:
      handler.close()
    fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
    item = {k: v for k, v in fields.items() if v is not None or k in on_disk}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(item)))['state']
    return abstract.replace(**restored)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a saved step (without creating anything)."""
  directory = checkpoint_dir(workdir)
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def read_workdir_config(workdir: str) -> dict[str, Any] | None:
  """The config.json a previous run left in the workdir, if any."""
  path = absolute(workdir) / 'config.json'
  return json.loads(path.read_text()) if path.exists() else None


def check_compatible(workdir: str, config: dict[str, Any]) -> None:
  """Refuses to resume a workdir whose checkpoints come from another model."""
  old = read_workdir_config(workdir)
  if old is None or not checkpoint_dir(workdir).exists():
    return
  def model_of(c):
    return (c.get('model'), c.get('dataset', {}).get('num_classes'))
  if model_of(old) != model_of(config):
    raise CheckpointError(
        f'workdir {workdir} holds checkpoints of model {old.get("model")} with '
        f'{old.get("dataset", {}).get("num_classes")} classes, but this config trains '
        f'{config.get("model")} with {config.get("dataset", {}).get("num_classes")} '
        'classes. Use a new --workdir, or the config that wrote this one.')
  old_ema, new_ema = old.get('ema_decay', 0.0), config.get('ema_decay', 0.0)
  if bool(old_ema) != bool(new_ema):  # the train state has (or lacks) the EMA copy
    raise CheckpointError(
        f'workdir {workdir} holds checkpoints {"with" if old_ema else "without"} an EMA of '
        f'the weights (ema_decay={old_ema}), but this config sets ema_decay={new_ema}. '
        f'Resume with --config.ema_decay={old_ema}, or use a new --workdir.')
  logging.info('workdir %s: resuming a run of the same model.', workdir)
