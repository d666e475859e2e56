"""Sweeps: the variants a config file's `get_sweep(arg)` lists, checked, printed and run.

A config file that defines `get_sweep(arg=None)` returns a list of dicts of dotted
overrides, e.g. `[{'name': 'w16', 'model.width': 16}, {'model.width': 32}]`. Each variant
is the file's `get_config(arg)` with its overrides, trained in ROOT/NAME (NAME from the
'name' key or built from the overrides). Every variant is validated before any runs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import os
import re
import shlex
from typing import Any, Callable

import ml_collections

from imgcls import checkpoints, config as config_lib, config_check

_NAME_OK = re.compile(r'[^A-Za-z0-9_.,=+-]+')


@dataclasses.dataclass
class Variant:
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict


def load_module(config_string: str):
  """The config module of 'path.py[:arg]' and the arg (None when absent)."""
  path, sep, arg = config_string.partition(':')
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f'no config file {path}.')
  spec = importlib.util.spec_from_file_location('imgcls_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (arg if sep else None)


def _call(fn: Callable, arg: str | None):
  return fn(arg) if arg is not None else fn()


def config_from_file(config_string: str) -> ml_collections.ConfigDict:
  """get_config(arg) of the file 'path.py[:arg]' (for configs that build on another)."""
  module, arg = load_module(config_string)
  return _call(module.get_config, arg)


def format_value(value: Any) -> str:
  """A value as `--config.KEY=VALUE` parses it back (before shell quoting)."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def variant_name(overrides: dict[str, Any]) -> str:
  """A short folder name from the overrides: 'width=16,base=0.1' (hashed when long)."""
  parts = [f'{k.split(".")[-1]}={format_value(v)}' for k, v in overrides.items()]
  name = _NAME_OK.sub('_', ','.join(parts) or 'base').strip('_')
  if len(name) > 48:
    digest = hashlib.sha1(repr(sorted(overrides.items())).encode()).hexdigest()[:6]
    name = f'{name[:40].rstrip("_")}-{digest}'
  return name


def _apply(config: ml_collections.ConfigDict, key: str, value: Any) -> str | None:
  """Sets a dotted key in place; returns an error message instead of raising."""
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      return f"unknown key '{'.'.join(parents[:i + 1])}' in override '{key}'."
    node = node[part]
  if leaf not in node and parents != ['model']:  # model.* keys are checked by validate()
    return f"unknown key '{key}'.{config_check.suggest(leaf, node.keys())}"
  if isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    return f"'{key}' = {value!r}: {str(e).splitlines()[0]}"
  return None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ({'lr.base': 0.1}) in place, as a sweep variant does; returns config."""
  errors = [e for k, v in overrides.items() if k != 'name' and (e := _apply(config, k, v))]
  if errors:
    raise config_lib.ConfigError('Invalid overrides:\n  - ' + '\n  - '.join(errors))
  return config


def variants(config_string: str, base: ml_collections.ConfigDict | None = None
             ) -> list[Variant]:
  """Every variant of the file's sweep, validated; one ConfigError lists all problems.

  base: the config to start from (default: the file's get_config(arg)); `imgcls sweep`
  passes the --config flag's value, so --config.KEY=VALUE applies to every variant.
  """
  module, arg = load_module(config_string)
  if not callable(getattr(module, 'get_sweep', None)):
    raise config_lib.ConfigError(
        f'{config_string} has no get_sweep(arg=None): a sweep config returns a list of dicts '
        "of dotted overrides, e.g. [{'name': 'w16', 'model.width': 16}, ...].")
  if base is None:
    base = _call(module.get_config, arg)
  sweep = _call(module.get_sweep, arg)
  if not isinstance(sweep, (list, tuple)) or not sweep:
    raise config_lib.ConfigError(f'{config_string}: get_sweep() must return a non-empty list '
                                 f'of dicts, got {sweep!r}.')
  out, errors = [], []
  for i, item in enumerate(sweep):
    if not isinstance(item, dict):
      errors.append(f'variant {i}: expected a dict of overrides, got {item!r}.')
      continue
    overrides = {k: v for k, v in item.items() if k != 'name'}
    name = str(item.get('name') or variant_name(overrides))
    if _NAME_OK.search(name) or name in ('.', '..'):
      errors.append(f"variant {i}: name {name!r} must use only letters, digits and _.,=+-.")
      continue
    config = copy.deepcopy(base)
    config.unlock()
    problems = [p for k, v in overrides.items() if (p := _apply(config, k, v))]
    if not problems:
      try:
        config_lib.validate(config)
      except config_lib.ConfigError as e:
        problems = [l.strip()[2:] for l in str(e).splitlines() if l.strip().startswith('- ')]
    errors += [f'variant {name!r}: {p}' for p in problems]
    out.append(Variant(name, overrides, config))
  names = [v.name for v in out]
  errors += [f'two variants are named {n!r}: give them distinct names.'
             for n in sorted({n for n in names if names.count(n) > 1})]
  if errors:
    raise config_lib.ConfigError(f'Invalid sweep {config_string}:\n  - ' +
                                 '\n  - '.join(errors) + '\nNothing was run.')
  return out


def command_line(config_string: str, workdir: str, overrides: dict[str, Any]) -> str:
  """The `imgcls train` command that trains one variant (for launching elsewhere)."""
  args = ['imgcls', 'train', f'--config={config_string}', f'--workdir={workdir}']
  args += [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]
  return ' '.join(shlex.quote(a) for a in args)


def is_finished(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether the workdir's last checkpoint is the run's last step."""
  from imgcls import data, train  # pylint: disable=import-outside-toplevel  (TF: not for --dry_run)
  latest = checkpoints.latest_step(workdir)
  return latest is not None and latest >= train.total_steps(
      config, data.builder_for(config.dataset))[1]


def run(config_string: str, root: str, *, base: ml_collections.ConfigDict | None = None,
        extra_overrides: dict[str, Any] | None = None, dry_run: bool = False,
        echo: Callable[[str], None] = print) -> list[Variant]:
  """Validates the sweep, prints each variant's command, trains the unfinished ones in turn.

  extra_overrides: the --config.KEY=VALUE given to `imgcls sweep` (already in `base`),
  repeated in each printed command. Returns the variants; compare with imgcls.compare.
  """
  from imgcls import train  # pylint: disable=import-outside-toplevel  (TF: not for --dry_run)
  found = variants(config_string, base)
  echo(f'# {len(found)} variants of {config_string} in {root}:')
  for v in found:
    echo(command_line(config_string, os.path.join(root, v.name),
                      {**(extra_overrides or {}), **v.overrides}))
  if dry_run:
    return found
  for i, v in enumerate(found):
    workdir = os.path.join(root, v.name)
    if is_finished(v.config, workdir):
      echo(f'# [{i + 1}/{len(found)}] {v.name}: finished, skipped.')
      continue
    echo(f'# [{i + 1}/{len(found)}] {v.name}: training in {workdir}')
    train.train_and_evaluate(v.config, workdir)
  return found
