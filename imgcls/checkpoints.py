"""Every read and write of a workdir's checkpoints, in one place.

A workdir holds `config.json` (the config of the run) and `checkpoints/STEP/` folders
written by Orbax, each with two items: `state` (the train state: params, batch_stats,
opt_state, step, rng and, with an EMA, ema_params / ema_batch_stats) and `meta` (JSON:
the config, the image shape, the label names, the eval metrics and the metric that ranks
them).

Two kinds of reader:
- `find(path, step)` -> `Checkpoint`: a saved step resolved from a workdir, its
  checkpoints/ folder or a step folder ('best' | 'latest' | N), with its metadata and
  `weights(which)`: params and BatchNorm statistics (raw or EMA, by `weights_used`, the
  one rule for which) as host numpy arrays, no optimizer, so a checkpoint written on N devices loads anywhere (imgcls.load,
  `imgcls eval`, few-shot, model_init, sweeps).
- `Checkpointer`: the training run's Orbax CheckpointManager (save asynchronously, keep
  the latest and the best, restore the whole train state onto the current shardings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from imgcls.errors import UserError


class CheckpointError(UserError):
  """A checkpoint that cannot be used; the message says what to do."""


DEFAULT_BEST_METRIC = 'eval_top1'
_LEGACY_BEST_METRIC = 'top1'  # checkpoints written before evaluators had prefixes
WEIGHTS = ('auto', 'raw', 'ema')
_WHERE = ('Pass a training workdir (the --workdir of `imgcls train`), its checkpoints/ '
          'folder, or one step folder such as WORKDIR/checkpoints/1000.')


def absolute(path: str | os.PathLike) -> epath.Path:
  """Orbax needs absolute paths (a relative one fails at save time, not set-up)."""
  p = epath.Path(path)
  return p if '://' in os.fspath(path) else epath.Path(p.expanduser().resolve())


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return absolute(workdir) / 'checkpoints'


def ranking_value(metrics: dict[str, Any] | None, best_metric: str) -> float | None:
  """The number that ranks a checkpoint (higher is better); None when it has none.

  A non-finite value never ranks: a diverged eval must not become the best checkpoint.
  """
  if not metrics:
    return None
  value = metrics.get(best_metric, metrics.get(_LEGACY_BEST_METRIC))
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


# ------------------------------------------------------------------ reading

def _is_step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and (path / 'state').is_dir() and (path / 'meta').is_dir()


def step_dirs(path: str | os.PathLike) -> dict[int, epath.Path]:
  """{step: folder} of the finished checkpoints under a workdir or its checkpoints/ folder
  (Orbax's unfinished `*.orbax-checkpoint-tmp` folders are not steps); {} when none."""
  root = absolute(path)
  directory = root / 'checkpoints' if (root / 'checkpoints').is_dir() else root
  if not directory.is_dir():
    return {}
  return {int(d.name): d for d in directory.iterdir() if _is_step_dir(d)}


def has_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether WORKDIR/checkpoints holds a saved step (without creating anything)."""
  return bool(step_dirs(checkpoint_dir(workdir)))


def latest_step(workdir: str | os.PathLike) -> int | None:
  steps = step_dirs(checkpoint_dir(workdir))
  return max(steps) if steps else None


def _first_line(e: BaseException) -> str:
  text = str(e)
  return f'{type(e).__name__}: {text.splitlines()[0][:200] if text else ""}'


def read_meta(step_dir: epath.Path) -> dict[str, Any]:
  """A step's JSON metadata, checked for what every reader needs (config, image shape)."""
  try:
    meta = ocp.JsonCheckpointHandler().restore(step_dir / 'meta')
    config = meta['config']
    _ = (config['model']['name'], config['dataset']['num_classes'], config['pp_eval'],
         meta['image_shape'])
  except Exception as e:  # corrupt JSON, missing file or key: all mean "unusable"
    raise CheckpointError(
        f'cannot read the metadata of the checkpoint {step_dir} ({_first_line(e)}). The '
        'checkpoint is incomplete or corrupt: use another step (--step / step=...).') from e
  return meta


def _best(steps: dict[int, epath.Path]) -> int:
  """The step whose eval ranks highest (ties: the later); the latest when none was ranked.
  A step whose metadata does not read is left out of the ranking."""
  scored = []
  for step, path in steps.items():
    try:
      meta = read_meta(path)
    except CheckpointError:
      continue
    value = ranking_value(meta.get('metrics'), meta.get('best_metric', DEFAULT_BEST_METRIC))
    if value is not None:
      scored.append((value, step))
  return max(scored)[1] if scored else max(steps)


def check_step_arg(step: Any) -> str | int:
  """'best', 'latest' or a step number (as int); anything else is a CheckpointError."""
  if isinstance(step, bool) or not (step in ('best', 'latest') or str(step).isdigit()):
    raise CheckpointError(f"the step must be 'best', 'latest' or a step number, got {step!r}.")
  return step if step in ('best', 'latest') else int(step)


def _candidates(path: str | os.PathLike, step: str | int) -> list[epath.Path]:
  """The step folders to try, in order: one for a step number or a step folder; for
  'latest' the newest first, for 'best' the best first, then the others newest first."""
  step = check_step_arg(step)
  root = absolute(path)
  if not root.exists():
    raise CheckpointError(f'{path} does not exist. {_WHERE}')
  if not root.is_dir():
    raise CheckpointError(f'{path} is a file, not a checkpoint folder. {_WHERE}')
  if _is_step_dir(root):
    if isinstance(step, int) and step != int(root.name):
      raise CheckpointError(f'{path} is the checkpoint of step {root.name}, not {step}: pass '
                            f'its parent folder {root.parent} to choose a step.')
    return [root]
  steps = step_dirs(root)
  if not steps:
    raise CheckpointError(f'no checkpoint in {path}. {_WHERE} Train first if it is empty.')
  if isinstance(step, int):
    if step not in steps:
      raise CheckpointError(f'no checkpoint at step {step} in {path}; saved steps: '
                            f'{sorted(steps)}.')
    return [steps[step]]
  first = _best(steps) if step == 'best' else max(steps)
  return [steps[first]] + [steps[s] for s in sorted(steps, reverse=True) if s != first]


def _state_tree(step_dir: epath.Path) -> dict[str, Any]:
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return dict(handler.metadata(step_dir / 'state').tree)
  finally:
    handler.close()


def intact(step_dir: epath.Path) -> bool:
  """Whether every array of a saved state reads back (its metadata included)."""
  try:
    restore_arrays(step_dir, [k for k in _state_tree(step_dir) if k != 'step'])
  except Exception:  # pylint: disable=broad-except  (any failure means damage)
    return False
  return True


def restore_arrays(step_dir: epath.Path, names: list[str]) -> dict[str, Any]:
  """The named fields of a saved state (and its step) as host numpy arrays."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = _state_tree(step_dir)
    item = {name: tree[name] for name in names + ['step']}
    return handler.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=item, partial_restore=True,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))
  finally:
    handler.close()


WEIGHT_FIELDS = ('params', 'batch_stats', 'ema_params', 'ema_batch_stats')


@dataclasses.dataclass
class Checkpoint:
  """One saved step: its folder, step number and metadata, and its weights (read once)."""
  path: epath.Path
  step: int
  meta: dict[str, Any]
  _arrays: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

  @property
  def config(self) -> dict[str, Any]:
    return self.meta['config']

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(int(d) for d in self.meta['image_shape'])

  @property
  def label_names(self) -> list[str]:
    """The class names saved with the run, or '0', '1', ... when it had none."""
    n = self.config['dataset']['num_classes']
    names = self.meta.get('label_names')
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]

  @property
  def workdir(self) -> epath.Path | None:
    """The training workdir this step lies in (None for a step folder moved elsewhere)."""
    return self.path.parent.parent if self.path.parent.name == 'checkpoints' else None

  def arrays(self) -> dict[str, Any]:
    """Every weight field the state holds (raw and EMA; never the optimizer state) as host
    numpy arrays, read once; CheckpointError when they do not read (a damaged step)."""
    if self._arrays is None:
      try:
        tree = _state_tree(self.path)
        names = [n for n in WEIGHT_FIELDS if tree.get(n)]
        if 'params' not in names:
          raise KeyError(f'no params in the saved state (it holds {sorted(tree)})')
        self._arrays = {k: v for k, v in restore_arrays(self.path, names).items()
                        if k != 'step'}
      except Exception as e:
        raise CheckpointError(
            f'cannot read the weights of the checkpoint {self.path} ({_first_line(e)}). The '
            'checkpoint is incomplete or corrupt: use another step (--step / step=...).'
        ) from e
    return self._arrays

  def has_ema(self) -> bool:
    return 'ema_params' in self.arrays()

  def weights_used(self, which: str = 'auto') -> str:
    """'ema' or 'raw': what `which` ('auto' | 'raw' | 'ema') means for this checkpoint. The
    one rule every reader follows: 'auto' is the EMA when the run kept one, else raw."""
    if which not in WEIGHTS:
      raise CheckpointError(f'weights must be one of {", ".join(WEIGHTS)}, got {which!r}.')
    if which == 'ema' and not self.has_ema():
      raise CheckpointError(f'the checkpoint {self.path} keeps no EMA of the weights (its run '
                            "had ema_decay=0): use weights='raw' (--weights=raw).")
    return 'ema' if which == 'ema' or (which == 'auto' and self.has_ema()) else 'raw'

  def weights(self, which: str = 'auto') -> dict[str, Any]:
    """{'params', 'batch_stats'?} of the weights `which` names (weights_used); an EMA field
    missing on disk falls back to the raw one."""
    arrays, use_ema = self.arrays(), self.weights_used(which) == 'ema'
    out = {}
    for n in ('params', 'batch_stats'):
      source = f'ema_{n}' if use_ema and f'ema_{n}' in arrays else n
      if source in arrays:
        out[n] = arrays[source]
    return out

  def all_weights(self) -> dict[str, Any]:
    """Raw and (when kept) EMA weights, for scoring both; no optimizer state."""
    return dict(self.arrays())

  @property
  def calibration(self) -> dict[str, Any] | None:
    """The post-hoc calibration fitted on held-out data for this step (`imgcls calibrate`,
    or the end of training on dataset.val_split), or None when it has none."""
    return read_calibration(self.path)

  def write_calibration(self, calibration: dict[str, Any]) -> epath.Path:
    """Stores (replaces) this step's calibration; see `write_calibration`."""
    return write_calibration(self.path, calibration)


CALIBRATION_FILE = 'calibration.json'  # beside `state` and `meta` in a step folder


def read_calibration(step_dir: epath.Path) -> dict[str, Any] | None:
  """A step's calibration JSON (None: never calibrated); CheckpointError when unreadable."""
  path = epath.Path(step_dir) / CALIBRATION_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read {path} ({_first_line(e)}): recalibrate with `imgcls '
                          f'calibrate --workdir=W --split=S`, or delete it.') from e


def write_calibration(step_dir: epath.Path, calibration: dict[str, Any]) -> epath.Path:
  """Writes a step's calibration atomically (a temporary file renamed over the old one), so a
  reader sees the old calibration or the new one, never half of one."""
  path = epath.Path(step_dir) / CALIBRATION_FILE
  tmp = path.parent / f'.{CALIBRATION_FILE}.tmp-{os.getpid()}'
  tmp.write_text(json.dumps(calibration, allow_nan=False))
  tmp.replace(path)  # overwrites: a recalibration replaces the old one
  return path


def find(path: str | os.PathLike, step: str | int = 'best') -> Checkpoint:
  """The checkpoint at `path` (workdir, checkpoints folder or step folder) and `step`, with
  its weights read. For 'best' and 'latest' a step that does not read (a truncated file, a
  deleted _METADATA) is skipped with a warning naming it and why, for the next intact one."""
  problems = []
  for step_dir in _candidates(path, step):
    try:
      ckpt = Checkpoint(path=step_dir, step=int(step_dir.name), meta=read_meta(step_dir))
      ckpt.arrays()
    except CheckpointError as e:
      problems.append(f'step {step_dir.name}: {_first_line(e.__cause__ or e)}')
      logging.warning('%s', e)
      continue
    if problems:
      logging.warning('using the checkpoint of step %d: %s did not read.', ckpt.step,
                      '; '.join(problems))
    return ckpt
  if len(problems) == 1 and step not in ('best', 'latest'):
    raise CheckpointError(f'the checkpoint {path} (step {step}) does not read: {problems[0]}.')
  raise CheckpointError(f'no intact checkpoint in {path}: ' + '; '.join(problems) +
                        '. The files are damaged: train again in a new --workdir.')


# ------------------------------------------------------------------ training

class Checkpointer:
  """An Orbax CheckpointManager keeping the latest checkpoint and the best by `best_metric`."""

  def __init__(self, workdir: str, *, asynchronous: bool = True, read_only: bool = False,
               best_metric: str = DEFAULT_BEST_METRIC, keep: int = 1):
    self.best_metric = best_metric

    def rank(metrics):  # Orbax keeps the largest; unranked steps (None) are never "best"
      value = ranking_value(metrics, best_metric)
      return -math.inf if value is None else value

    options = ocp.CheckpointManagerOptions(
        best_fn=rank, best_mode='max',
        # best_fn with max_to_keep would delete the latest checkpoint: keep both.
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False),
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
    meta = dict(meta, metrics=metrics, best_metric=self.best_metric)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=force)

  def restore(self, step: int, target: Any) -> Any:
    """Restores the whole state at `step` onto the shapes and shardings of `target`."""
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
    on_disk = set(_state_tree(self.directory / str(step)))
    fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
    item = {k: v for k, v in fields.items() if v is not None or k in on_disk}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(item)))['state']
    return abstract.replace(**restored)

  def restore_newest(self, target: Any) -> tuple[int, Any]:
    """(step, state) from the newest step that restores onto `target`, falling back past
    damaged steps with a warning each. Damaged steps are moved aside (never deleted) to
    WORKDIR/checkpoints_broken/; when none is intact, (0, target) comes back: a fresh start.

    A step that reads but does not fit the target (another model or optimizer) is an error,
    not damage: nothing is moved then.
    """
    broken = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        if intact(self.directory / str(step)):
          raise
        logging.warning('the checkpoint of step %d does not restore (%s): trying an older one.',
                        step, _first_line(e.__cause__ or e))
        broken.append(step)
        continue
      if broken:  # out of the way of the saves to come, kept for inspection
        logging.warning('resuming from step %d: the newer step(s) %s are damaged; moved to %s.',
                        step, broken, self.move_aside(broken))
      return step, state
    if broken:
      moved = self.move_aside(broken)
      logging.warning('no intact checkpoint: the damaged steps %s were moved to %s; training '
                      'starts over.', broken, moved)
    return 0, target

  def move_aside(self, steps: list[int]) -> epath.Path:
    """Renames step folders into WORKDIR/checkpoints_broken/ (kept for inspection)."""
    aside = self.directory.parent / 'checkpoints_broken'
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target, n = aside / str(step), 1
      while target.exists():
        target, n = aside / f'{step}-{n}', n + 1
      (self.directory / str(step)).rename(target)
    self.manager.reload()
    return aside

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
