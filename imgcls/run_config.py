"""The config a workdir's run was started with (WORKDIR/config.json) and what a resume may
change: the same model always; fields that change the run's math only when the user says
so (--allow_config_change), recorded in WORKDIR/config_changes.jsonl."""

from __future__ import annotations

import json
import time
from typing import Any

from absl import logging

from imgcls.checkpoints import (CheckpointError, absolute, checkpoint_dir, has_checkpoints,
                                read_meta, step_dirs)
from imgcls.config import flatten_dict

CONFIG_FILE = 'config.json'


def read(workdir: str) -> dict[str, Any] | None:
  """The config.json a previous run left in the workdir, if any. A damaged one (not JSON, not
  a config) is recovered from the newest checkpoint's metadata, which holds the same config."""
  path = absolute(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or not {'model', 'dataset'} <= set(config):
      raise ValueError('not an imgcls config')
    return config
  except ValueError as e:
    return _recover(workdir, path, f'{type(e).__name__}: {str(e).splitlines()[0][:120]}')


def _recover(workdir: str, path, why: str) -> dict[str, Any]:
  """The config of the newest checkpoint whose metadata reads, written back to `path`."""
  for step, step_dir in sorted(step_dirs(workdir).items(), reverse=True):
    try:
      config = read_meta(step_dir)['config']
    except CheckpointError:
      continue
    write(workdir, config)
    logging.warning('%s was damaged (%s): recovered it from the metadata of the checkpoint of '
                    'step %d, and rewrote it.', path, why, step)
    return config
  raise CheckpointError(f'{path} is damaged ({why}) and no checkpoint holds a copy of the '
                        'config: delete it to start this workdir afresh, or pass a new '
                        '--workdir.')


def write(workdir: str, config: dict[str, Any]) -> None:
  """WORKDIR/config.json, replaced whole (a temporary file, then a rename)."""
  path = absolute(workdir) / CONFIG_FILE
  tmp = path.parent / f'.{CONFIG_FILE}.tmp'
  tmp.write_text(json.dumps(config, indent=2))
  tmp.replace(path)


# Config fields that do not change a run's math: a resume may change them freely.
NOT_MATH = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
            'async_checkpoints', 'keep_checkpoints', 'eval_reports', 'eval_batch_size', 'evals',
            'fewshot',
            'best_metric', 'dataset.data_dir', 'dataset.prepare', 'dataset.cache',
            'dataset.eval_split', 'dataset.val_split', 'model_init', 'model_load',
            'profile_steps', 'sharding', 'sharding_min_bytes')


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'key: old -> new' for each field that changes the run's math (NOT_MATH excepted)."""
  old, new = (flatten_dict(json.loads(json.dumps(c))) for c in (old, new))  # tuples -> lists
  changed = []
  for key in sorted(set(old) | set(new)):
    if any(key == k or key.startswith(k + '.') for k in NOT_MATH):
      continue
    if old.get(key) != new.get(key):
      changed.append(f'{key}: {old.get(key)!r} -> {new.get(key)!r}')
  return changed


def check_resume(workdir: str, config: dict[str, Any], allow_change: bool = False
                 ) -> list[str]:
  """Refuses to resume a workdir with a different model, or (unless allow_change) with a
  config whose math differs; returns the changes allowed. Writes nothing."""
  check_compatible(workdir, config)
  old = read(workdir)
  if old is None or not has_checkpoints(workdir):
    return []
  changes = config_changes(old, config)
  if changes and not allow_change:
    raise CheckpointError(
        f'workdir {workdir} holds a run whose config differs in fields that change its math:'
        '\n  - ' + '\n  - '.join(changes) + '\nResume with the config that wrote it, use a '
        'new --workdir, or pass --allow_config_change to continue with the new values (the '
        'change is recorded in WORKDIR/config_changes.jsonl).')
  return changes


def record_changes(workdir: str, step: int, changes: list[str]) -> None:
  """Appends an allowed change to WORKDIR/config_changes.jsonl (step, time, fields)."""
  path = absolute(workdir) / 'config_changes.jsonl'
  old = path.read_text() if path.exists() else ''
  record = {'step': step, 'time': time.strftime('%Y-%m-%d %H:%M:%S'), 'changes': changes}
  path.write_text(old + json.dumps(record) + '\n')


def check_compatible(workdir: str, config: dict[str, Any]) -> None:
  """Refuses to resume a workdir whose checkpoints come from another model."""
  old = read(workdir)
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
