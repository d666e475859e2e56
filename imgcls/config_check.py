"""Config validation: checks a config against the schema (imgcls.config.defaults()), in
stages that each import more, so a typo'd key is reported in a fraction of a second and a
model name after JAX and Flax load; TensorFlow is never imported. Users call
imgcls.config.validate, which passes the schema in.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections

from imgcls.errors import ConfigError

_MODEL_META_KEYS = {'name'}


def suggest(key: str, options) -> str:
  close = difflib.get_close_matches(key, list(options), n=1)
  return f" Did you mean '{close[0]}'?" if close else ''


def _check_tree(cfg, ref, prefix: str, errors: list[str], removed: Mapping[str, str]) -> None:
  """Keys the schema `ref` lacks (with what replaced a removed one) and values of the wrong
  type; the model's arguments and the evaluators are checked by their owners."""
  for key in cfg.keys():
    path = f'{prefix}{key}'
    if key not in ref:
      moved = f" It was replaced by {removed[path]}." if path in removed else ''
      errors.append(f"unknown key '{path}'.{moved or suggest(key, ref.keys())}")
      continue
    value, expected = cfg[key], ref[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        errors.append(f"'{path}' must be a group of settings, got {value!r}.")
      elif path not in ('model', 'evals'):
        _check_tree(value, expected, path + '.', errors, removed)
      continue
    want = ref.get_type(key) if hasattr(ref, 'get_type') else type(expected)
    if value is None or expected is None:
      continue
    ok = isinstance(value, want) or (want is float and isinstance(value, int))
    if isinstance(value, bool) and want is not bool:
      ok = False
    if not ok:
      errors.append(
          f"'{path}' must be {want.__name__}, got {type(value).__name__} {value!r}.")


def _get(cfg, dotted: str):
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg


def _check_numbers(cfg, errors: list[str]) -> None:
  """Values that need nothing but the config."""
  positive = ['batch_size', 'eval_batch_size', 'log_every_steps', 'dataset.num_classes',
              'grad_accum_steps', 'keep_checkpoints']
  for key in positive:
    if _get(cfg, key) <= 0:
      errors.append(f"'{key}' must be positive, got {_get(cfg, key)}.")
  if cfg.total_steps <= 0 and cfg.num_epochs <= 0:
    errors.append("set 'num_epochs' or 'total_steps' to a positive number.")
  for key in ('eval_every_steps', 'checkpoint_every_steps', 'total_steps', 'lr.warmup_steps',
              'profile_steps', 'sharding_min_bytes'):
    if _get(cfg, key) < 0:
      errors.append(f"'{key}' must be >= 0, got {_get(cfg, key)}.")
  if not 0.0 <= cfg.optimizer.layer_decay <= 1.0:
    errors.append(f'optimizer.layer_decay must be in [0, 1] (0: off), got '
                  f'{cfg.optimizer.layer_decay}.')
  if not 0.0 <= cfg.label_smoothing < 1.0:
    errors.append(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}.")
  for key in ('mixup.mixup_alpha', 'mixup.cutmix_alpha'):
    if _get(cfg, key) < 0:
      errors.append(f"'{key}' must be >= 0 (0: off), got {_get(cfg, key)}.")
  for key in ('mixup.switch_prob', 'mixup.prob'):
    if not 0.0 <= _get(cfg, key) <= 1.0:
      errors.append(f"'{key}' must be a probability in [0, 1], got {_get(cfg, key)}.")
  if cfg.skip_nonfinite_steps < 0:
    errors.append(f'skip_nonfinite_steps must be >= 0 (0: stop at the first NaN/inf step), '
                  f'got {cfg.skip_nonfinite_steps}.')
  if not 0.0 <= cfg.ema_decay < 1.0:
    errors.append(f'ema_decay must be in [0, 1) (0: off, e.g. 0.9999), got {cfg.ema_decay}.')
  _check_imbalance(cfg, errors)


SAMPLINGS = ('uniform', 'balanced')


def _check_imbalance(cfg, errors: list[str]) -> None:
  """dataset.sampling, dataset.imbalance_ratio and the imbalance group."""
  imb = cfg.imbalance
  _one_of(errors, 'dataset.sampling', cfg.dataset.sampling, SAMPLINGS)
  if not cfg.dataset.imbalance_ratio >= 1:
    errors.append(f'dataset.imbalance_ratio must be >= 1 (1: balanced), got '
                  f'{cfg.dataset.imbalance_ratio}.')
  w = imb.class_weights
  if isinstance(w, str) and w not in ('', 'balanced', 'effective_number'):
    errors.append(f"imbalance.class_weights must be '' (none), 'balanced', 'effective_number' "
                  f'or {cfg.dataset.num_classes} numbers, got {w!r}.'
                  f"{suggest(w, ('balanced', 'effective_number'))}")
  elif not isinstance(w, str) and (
        not isinstance(w, (list, tuple)) or len(w) != cfg.dataset.num_classes
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                   for x in w)):
    errors.append(f"imbalance.class_weights must be '', 'balanced', 'effective_number' or "
                  f'{cfg.dataset.num_classes} non-negative numbers (one per class), got {w!r}.')
  if not 0.0 <= imb.class_weights_beta < 1.0:
    errors.append(f'imbalance.class_weights_beta must be in [0, 1) (e.g. 0.999), got '
                  f'{imb.class_weights_beta}.')
  for key in ('logit_adjust_tau', 'posthoc_tau'):
    if imb[key] < 0:
      errors.append(f'imbalance.{key} must be >= 0 (0: off, 1: the prior itself), got '
                    f'{imb[key]}.')
  uses = [k for k, on in (('imbalance.class_weights', w not in ('', None)),
                          ('imbalance.logit_adjust_tau', imb.logit_adjust_tau > 0),
                          ('imbalance.posthoc_tau', imb.posthoc_tau > 0),
                          ("dataset.sampling='balanced'", cfg.dataset.sampling == 'balanced'))
          if on]
  if uses and cfg.loss != 'softmax_xent':
    errors.append(f"{', '.join(uses)} need loss='softmax_xent' (single-label), got loss="
                  f'{cfg.loss!r}: turn them off for multi-label runs.')


def _one_of(errors: list[str], key: str, value: Any, names) -> None:
  if value not in names:
    errors.append(f"{key} must be one of {', '.join(map(str, names))}, got {value!r}."
                  f"{suggest(str(value), names)}")


def _check_pp(cfg, errors: list[str]) -> None:
  """pp strings: op names and arguments (the op registry loads no TensorFlow)."""
  from imgcls.data import preprocess  # pylint: disable=g-import-not-at-top  (fast path)
  for key in ('pp_train', 'pp_eval'):
    try:
      preprocess.get_pp_fn(cfg[key])
    except ValueError as e:
      errors.append(f"'{key}': {e}")


def _check_model(cfg, errors: list[str]) -> None:
  """The model name and its arguments, from the model registry (imports JAX and Flax)."""
  from imgcls import models  # pylint: disable=g-import-not-at-top  (JAX: after the cheap checks)
  name = cfg.model.get('name')
  if name not in models.MODELS:  # loads families only until the name is found
    errors.append(
        f"unknown model.name {name!r}.{suggest(str(name), models.list_models())}"
        f" Known models: {', '.join(models.list_models())}.")
    return
  allowed = models.model_kwargs(name) - {'num_classes'}
  for key in cfg.model.keys():
    if key not in allowed | _MODEL_META_KEYS:
      errors.append(
          f"unknown key 'model.{key}' for model {name!r}.{suggest(key, allowed)}"
          f" Valid keys: {', '.join(sorted(allowed))}.")
  for key in ('dtype', 'param_dtype'):
    if key not in cfg.model or (key == 'dtype' and cfg.model.dtype == 'auto'):
      continue
    if not _is_dtype(cfg.model[key]):
      auto = (", or 'auto' (bfloat16 where this machine computes it fast, else float32)"
              if key == 'dtype' else " ('auto' is for model.dtype only: parameters keep one "
              'dtype on every machine)')
      errors.append(f"model.{key} must be a dtype name such as 'float32' or 'bfloat16'{auto}, "
                    f'got {cfg.model[key]!r}.')


def _is_dtype(value: Any) -> bool:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (loaded by _check_model)
  try:
    jnp.dtype(value)
  except TypeError:
    return False
  return True


def _check_names(cfg, errors: list[str]) -> None:
  """Names the other owners export: optimizers, schedules, losses, weight formats and
  evaluators (these imports load optax, Orbax, clu and matplotlib, never TensorFlow)."""
  # pylint: disable=g-import-not-at-top
  from imgcls import evaluators, optim, sharding, step
  # pylint: enable=g-import-not-at-top
  _one_of(errors, 'optimizer.name', cfg.optimizer.name, optim.OPTIMIZERS)
  _one_of(errors, 'lr.schedule', cfg.lr.schedule, optim.SCHEDULES)
  _one_of(errors, 'weight_decay_mask', cfg.weight_decay_mask, optim.DECAY_MASKS)
  _one_of(errors, 'loss', cfg.loss, step.LOSSES)
  _one_of(errors, 'sharding', cfg.sharding, sharding.STRATEGIES)
  if cfg.model_init:  # model_load configures model_init; the weights code loads only for it
    from imgcls.models import weights  # pylint: disable=g-import-not-at-top
    if cfg.model_load.format:
      _one_of(errors, 'model_load.format', cfg.model_load.format, weights.FORMATS)
    _one_of(errors, 'model_load.posemb_resize', cfg.model_load.posemb_resize,
            weights.POSEMB_RESIZE_METHODS)
  errors.extend(evaluators.check(cfg))


_VALID: set[str] = set()  # the configs (their repr) validate() has passed in this process


def _fill_pp_placeholders(cfg, errors: list[str]) -> None:
  """Fills, in place, the model placeholders of the pp strings ('{resolution}', '{normalize}':
  imgcls.data.preprocess.PLACEHOLDER) from model.name's registry info. Here, after every
  --config override, so `--config.model.name=OTHER` brings OTHER's preprocessing, and the
  config written to the workdir (replayed by imgcls.load, predict, export) has plain strings."""
  from imgcls.data import preprocess  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  keys = [(cfg, 'pp_train'), (cfg, 'pp_eval')] + [
      (ev, k) for ev in cfg.evals.values() if hasattr(ev, 'keys') for k in ev.keys()
      if k.startswith('pp')]
  todo = [(node, k) for node, k in keys
          if isinstance(node[k], str) and preprocess.PLACEHOLDER.search(node[k])]
  if not todo:
    return
  from imgcls import models  # pylint: disable=g-import-not-at-top  (JAX: only when needed)
  name = cfg.model.get('name')
  if name not in models.MODELS:  # loads families only until the name is found
    _check_model(cfg, errors)  # the unknown name, with suggestions
    return
  for node, key in todo:
    try:
      node[key] = preprocess.fill_placeholders(node[key], models.pp_values(name),
                                               f'model {name!r}')
    except ValueError as e:
      errors.append(f"'{key}': {e}")


def validate(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
             removed: Mapping[str, str]) -> ml_collections.ConfigDict:
  """Raises ConfigError listing every problem of cfg against `schema` (imgcls.config.defaults();
  `removed`: old keys and what replaced them); returns the config, the model placeholders of
  its pp strings filled in (_fill_pp_placeholders). A config passed once is not checked
  again, so the CLI's early check and the trainer's are one check."""
  key = repr(cfg.to_dict())  # repr keeps the types (1 vs 1.0, tuple vs list)
  if key in _VALID:
    return cfg
  errors: list[str] = []
  _check_tree(cfg, schema, '', errors, removed)  # keys and types: instant
  if not errors:
    _fill_pp_placeholders(cfg, errors)
  if not errors:
    _check_numbers(cfg, errors)
    _check_pp(cfg, errors)  # no TensorFlow
  # Each stage imports more, so a config stops at the first stage with a problem: a typo'd
  # key costs a fraction of a second, a model name the import of JAX and Flax.
  for stage in (_check_model, _check_names):
    if not errors:
      stage(cfg, errors)
  if errors:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(errors) +
                      '\nFix the config file or the --config.KEY=VALUE override.')
  _VALID.add(repr(cfg.to_dict()))  # with its placeholders filled (another may fill them apart)
  return cfg
