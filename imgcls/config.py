"""The experiment schema: every knob a config may turn, its default, and validation.

Config files start from `defaults()` and change fields; `validate()` rejects any key
that is not in the schema (a typo must not become a silent default), any value of the
wrong type, and values that cannot work. It runs before anything is written.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any

import ml_collections

from imgcls.errors import ConfigError

__all__ = ['ConfigError', 'apply_model_overrides', 'defaults', 'flatten_dict', 'parse_arg',
           'split_model_overrides', 'upgrade', 'validate']


def defaults() -> ml_collections.ConfigDict:
  """Every field of an experiment with its documented default."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: any TFDS dataset by name; pp strings are chains of registered ops
  # (see `imgcls.data.list_ops()`).
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'fashion_mnist'
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.num_classes = 10
  c.dataset.shuffle_buffer = 50_000
  c.dataset.cache = True  # cache encoded records in memory (small datasets)
  c.dataset.prepare = True  # prepare/download the dataset when it is missing
  # Your own images: name = 'folder:/path/to/root' with root/{train,val,test}/CLASS/* or
  # root/CLASS/* split by folder_split (stratified, seeded). See imgcls/data/folder.py.
  c.dataset.folder_split = 'train=0.8,validation=0.1,test=0.1'
  c.dataset.folder_seed = 0
  c.dataset.skip_corrupt = False  # leave out (and count) files that are not readable images
  # Multi-label: a split to choose the F1-maximising threshold on ('' none), e.g. 'train[90%:]'.
  c.dataset.val_split = ''
  # 'uniform' (each epoch a permutation) | 'balanced': every class equally often (classes drawn
  # uniformly, then an image of the class; single-label only; imgcls/data/pipeline.py).
  c.dataset.sampling = 'uniform'
  # fashion_mnist_lt only: n_max / n_min of its long-tailed train split (exponential profile).
  c.dataset.imbalance_ratio = 100.0
  c.pp_train = 'decode|value_range(-1, 1)|onehot(10)'
  c.pp_eval = 'decode|value_range(-1, 1)|onehot(10)'
  # When pp_train (or an evaluator's pp, pp_eval by default) ends in value_range(...) (label
  # ops aside), tf.data keeps the images uint8 and the train (eval) step applies that
  # value_range on the device, with the same bits: 4x fewer bytes per batch. The input
  # pipelines (imgcls.data) read this switch and tell the step (`.value_range`).
  c.value_range_on_device = True

  # Model: `name` from the registry (`imgcls.models.list_models()`), the other keys
  # are that model's constructor arguments. num_classes comes from dataset.num_classes.
  c.model = ml_collections.ConfigDict({'name': 'resnet18'})
  # Start from pretrained weights (a new run only; a workdir with checkpoints resumes):
  # an official ViT/BiT .npz, a timm/torchvision state dict (.safetensors, .npz, .pth), or
  # another run's workdir or Orbax checkpoint folder (its best step).
  # The merge report goes to the log and WORKDIR/model_init_report.json.
  c.model_init = ''
  c.model_load = ml_collections.ConfigDict()
  c.model_load.format = ''  # '' guesses; vit_npz | bit_npz | timm_vit | timm_resnet | timm_bit
  c.model_load.ignore = ''  # regexes (comma-separated) of parameters to keep from the fresh init
  c.model_load.posemb_resize = 'bilinear'  # bilinear | bicubic, when the patch grid differs
  c.model_load.strict = True  # missing or unused parameters are an error

  # Optimisation (built in imgcls/optim.py).
  c.batch_size = 128  # global, over all devices of all processes
  # Split each device's batch into this many microbatches, gradients averaged, one update
  # (big batches on few devices; BatchNorm statistics per microbatch: imgcls/step.py).
  c.grad_accum_steps = 1
  c.eval_batch_size = 500
  c.num_epochs = 10.0  # or set total_steps > 0, which wins
  c.total_steps = 0
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'  # sgd | adamw
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # Fine-tuning rules on parameter paths ('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel',
  # 'stage1_block1/conv1/kernel'; regexes use re.search): frozen parameters get no update and no
  # optimizer state; ('regex', multiplier) pairs scale the lr or weight decay, first match wins;
  # layer_decay (ViT, e.g. 0.75) scales block i's lr by layer_decay ** (depth - i).
  c.optimizer.freeze = ()
  c.optimizer.lr_mults = ()
  c.optimizer.wd_mults = ()
  c.optimizer.layer_decay = 0.0
  c.lr = ml_collections.ConfigDict()
  c.lr.base = 0.1
  c.lr.schedule = 'warmup_cosine'  # warmup_cosine | warmup_linear | warmup_step | constant
  c.lr.decay_boundaries = (0.3, 0.6, 0.9)  # warmup_step: fractions of the post-warmup steps
  c.lr.decay_factor = 0.1  # warmup_step: multiplier at each boundary
  c.lr.warmup_steps = 500
  c.lr.end_factor = 0.0
  c.weight_decay = 5e-4
  c.weight_decay_mask = 'no_bias_norm'  # no_bias_norm | all
  c.grad_clip_norm = 0.0  # 0 disables global-norm clipping
  # A step whose loss or gradient is NaN/inf stops the run (the last good checkpoint is kept).
  # N > 0 skips up to N consecutive such updates instead (optax.apply_if_finite; counted as
  # train_skipped_steps) and stops past N.
  c.skip_nonfinite_steps = 0
  # Where the train state lives (imgcls/sharding.py): 'replicated' on every device, or 'fsdp':
  # params, gradients, optimizer state and EMA split over the devices, each array of
  # sharding_min_bytes or more along its largest dimension the device count divides.
  c.sharding = 'replicated'
  c.sharding_min_bytes = 4 * 2**20
  c.label_smoothing = 0.0
  # 'softmax_xent' (single-label) or 'sigmoid_xent' (multi-label: multi-hot labels from the
  # pp string, e.g. multihot(K); eval reports mAP and F1 instead of a confusion matrix).
  c.loss = 'softmax_xent'
  # Class imbalance (softmax_xent; the class prior = the train split's label frequencies,
  # counted once and kept in WORKDIR/class_counts.json). class_weights: '' (none) | 'balanced'
  # (n / (K n_c)) | 'effective_number' (Cui et al., with class_weights_beta) | K floats.
  # logit_adjust_tau: the logit-adjusted loss (Menon et al.; 0: off, 1: the paper's).
  # posthoc_tau: logits - tau * log(prior) at eval and prediction (0: off; imgcls.load and
  # predict read it from the run's config too). imgcls/evaluators/imbalance.py has the math.
  c.imbalance = ml_collections.ConfigDict()
  c.imbalance.class_weights = ml_collections.FieldReference('', field_type=object)
  c.imbalance.class_weights_beta = 0.999
  c.imbalance.logit_adjust_tau = 0.0
  c.imbalance.posthoc_tau = 0.0
  # Batch-level mixup / CutMix on device (imgcls/augment.py, timm's semantics): alphas of the
  # Beta distributions (0: off), the chance of CutMix when both are on, and of mixing at all.
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0
  c.mixup.cutmix_alpha = 0.0
  c.mixup.switch_prob = 0.5
  c.mixup.prob = 1.0
  # Exponential moving average of the weights (0: off; e.g. 0.9999). Kept in the train state,
  # checkpointed, evaluated beside the raw weights (eval_ema_*) and preferred by imgcls.load.
  # The decay warms up as min(ema_decay, (1 + t) / (10 + t)) (imgcls.step.ema_decay_at).
  c.ema_decay = 0.0

  # Loop and outputs.
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: once per epoch
  c.checkpoint_every_steps = 0  # 0: at every eval
  c.async_checkpoints = True
  c.keep_checkpoints = 1  # the latest N checkpoints are kept, and the best by best_metric
  # N > 0: a jax.profiler trace of N train steps (after 5 warm-up steps) in WORKDIR/profile,
  # for TensorBoard's Profile tab (`tensorboard --logdir WORKDIR`); process 0 only.
  c.profile_steps = 0
  # Evaluators (imgcls/evaluators/): {name: dict(type=..., options)}; metrics are written as
  # NAME_KEY (eval_top1, val_top1). The default: `eval`, a classification of dataset.eval_split
  # whose reports (confusion matrix, per-class accuracy, calibration, the most confidently
  # wrong images; for sigmoid_xent per-class AP, mAP and F1) go to WORKDIR/reports/ and
  # TensorBoard at each eval (turn them off with evals.eval.reports=False). Add more, e.g.
  #   c.evals.val = dict(type='classification', split='validation')
  #   c.evals.fewshot = dict(type='fewshot', shots=(1, 5, 10))  # ridge probe, frozen features
  # or replace the list: c.evals = ml_collections.ConfigDict({...}).
  c.evals = ml_collections.ConfigDict({'eval': {'type': 'classification', 'reports': True}})
  # The metric that ranks checkpoints ('best' keeps the highest); one an evaluator writes.
  c.best_metric = 'eval_top1'
  return c


_MODEL_META_KEYS = {'name'}


def _suggest(key: str, options) -> str:
  close = difflib.get_close_matches(key, list(options), n=1)
  return f" Did you mean '{close[0]}'?" if close else ''


def _check_tree(cfg, ref, prefix: str, errors: list[str]) -> None:
  for key in cfg.keys():
    path = f'{prefix}{key}'
    if key not in ref:
      moved = f" It was replaced by {REMOVED[path]}." if path in REMOVED else ''
      errors.append(f"unknown key '{path}'.{moved or _suggest(key, ref.keys())}")
      continue
    value, expected = cfg[key], ref[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        errors.append(f"'{path}' must be a group of settings, got {value!r}.")
      elif path not in ('model', 'evals'):
        _check_tree(value, expected, path + '.', errors)
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
                  f"{_suggest(w, ('balanced', 'effective_number'))}")
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
                  f"{_suggest(str(value), names)}")


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
  if name not in models.list_models():
    errors.append(
        f"unknown model.name {name!r}.{_suggest(str(name), models.list_models())}"
        f" Known models: {', '.join(models.list_models())}.")
    return
  allowed = models.model_kwargs(name) - {'num_classes'}
  for key in cfg.model.keys():
    if key not in allowed | _MODEL_META_KEYS:
      errors.append(
          f"unknown key 'model.{key}' for model {name!r}.{_suggest(key, allowed)}"
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
  from imgcls.models import weights
  # pylint: enable=g-import-not-at-top
  _one_of(errors, 'optimizer.name', cfg.optimizer.name, optim.OPTIMIZERS)
  _one_of(errors, 'lr.schedule', cfg.lr.schedule, optim.SCHEDULES)
  _one_of(errors, 'weight_decay_mask', cfg.weight_decay_mask, optim.DECAY_MASKS)
  _one_of(errors, 'loss', cfg.loss, step.LOSSES)
  _one_of(errors, 'sharding', cfg.sharding, sharding.STRATEGIES)
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
  if name not in models.list_models():
    _check_model(cfg, errors)  # the unknown name, with suggestions
    return
  for node, key in todo:
    try:
      node[key] = preprocess.fill_placeholders(node[key], models.pp_values(name),
                                               f'model {name!r}')
    except ValueError as e:
      errors.append(f"'{key}': {e}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError listing every problem; returns the config, the model placeholders of
  its pp strings filled in (_fill_pp_placeholders). A config passed once is not checked
  again, so the CLI's early check and the trainer's are one check."""
  key = repr(cfg.to_dict())  # repr keeps the types (1 vs 1.0, tuple vs list)
  if key in _VALID:
    return cfg
  errors: list[str] = []
  _check_tree(cfg, defaults(), '', errors)  # keys and types: instant
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


# Fields of older configs and where their meaning lives now (`upgrade` maps them).
REMOVED = {'eval_reports': 'evals.eval.reports',
           'fewshot': "an evaluator: c.evals.fewshot = dict(type='fewshot', shots=(1, 5))"}


def _upgrade_legacy_evals(cfg: ml_collections.ConfigDict) -> None:
  """Maps the fields older configs used for evaluation (eval_reports, fewshot.*), with an
  empty `evals`, onto the evaluator list they meant; then drops them."""
  legacy = {k: cfg[k] for k in REMOVED if k in cfg}
  if not legacy:
    return
  if not cfg.get('evals'):
    evals = {'eval': {'type': 'classification',
                      'reports': bool(legacy.get('eval_reports', True))}}
    fs = legacy.get('fewshot') or {}
    if fs.get('shots'):  # written as eval_fewshot_* in those runs
      evals['fewshot'] = {'type': 'fewshot', 'prefix': 'eval', 'shots': tuple(fs['shots']),
                          'seeds': tuple(fs.get('seeds', (0, 1, 2))),
                          'train_split': fs.get('train_split', ''),
                          'test_split': fs.get('test_split', ''),
                          'max_test_examples': fs.get('max_test_examples', 0)}
    with cfg.unlocked(), cfg.ignore_type():
      cfg.evals = ml_collections.ConfigDict(evals)
  with cfg.unlocked():
    for key in legacy:
      del cfg[key]


def upgrade(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Brings, in place, a config written by an older imgcls (a checkpoint's config) to the
  current schema: legacy evaluation fields become `evals`, missing fields get their
  defaults; returns it."""
  _upgrade_legacy_evals(cfg)
  def fill(node, ref):
    for key in ref.keys():
      if key not in node:
        with node.ignore_type():
          node[key] = ref[key]
      elif isinstance(ref[key], ml_collections.ConfigDict) and key not in ('model', 'evals') \
          and isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], ref[key])
  fill(cfg, defaults())
  return cfg


def flatten_dict(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested config dict as {'dataset.name': ..., 'lr.base': ...} (leaves unchanged)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config argument 'key=value,key2=value2' (big_vision style).

  Keys must be among `defaults`; values take the type of the default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ConfigError(f'bad config argument {item!r}: expected KEY=VALUE with KEY one of '
                        f'{", ".join(defaults)}.{_suggest(key, defaults)}')
    kind = type(defaults[key])
    try:
      if kind is bool:
        out[key] = {'true': True, 'false': False, '1': True, '0': False}[value.lower()]
      else:
        out[key] = kind(value)
    except (ValueError, KeyError) as e:
      raise ConfigError(f'config argument {key}={value!r} must be {kind.__name__}.') from e
  return out


_MODEL_FLAG = '--config.model.'


def split_model_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """(argv without them, {KEY: VALUE}) for the `--config.model.KEY=VALUE` overrides whose KEY
  the config file (`--config=PATH[:ARG]` in argv) does not set.

  ml_collections can only override keys a config has; a model's constructor arguments are
  open-ended (`--config.model.dtype=bfloat16` on a ResNet config that never names dtype), so
  those are taken out here and added by `apply_model_overrides` after the flags are parsed;
  `validate` then checks them against the model's signature. When the file cannot be loaded,
  argv is returned unchanged and absl reports the problem.
  """
  items = []  # (index of the flag, index of its value, key, value)
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith(_MODEL_FLAG) and '.' not in arg[len(_MODEL_FLAG):].split('=')[0]:
      key, sep, value = arg[len(_MODEL_FLAG):].partition('=')
      if not sep and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
        items.append((i, i + 1, key, argv[i + 1]))  # --config.model.KEY VALUE
      elif sep:
        items.append((i, i, key, value))
  if not items or path is None:
    return argv, {}
  try:
    known = set(_load_config_file(path).model.keys())
  except Exception:  # pylint: disable=broad-except  (absl reports it when it parses argv)
    return argv, {}
  drop, extra = set(), {}
  for i, j, key, value in items:
    if key not in known:
      drop.update((i, j))
      extra[key] = value
  return [a for i, a in enumerate(argv) if i not in drop], extra


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config(ARG) of 'PATH[:ARG]', as ml_collections' --config flag loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  file, *arg = path.split(':', 1)
  spec = importlib.util.spec_from_file_location('_imgcls_config_probe', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def apply_model_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Adds `split_model_overrides`'s model arguments to cfg.model, values parsed as Python
  literals ('32' -> 32, '(1, 1)' -> a tuple, 'true' -> True) or kept as strings."""
  for key, text in overrides.items():
    text = text.capitalize() if text in ('true', 'false') else text
    try:
      value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
      value = text
    with cfg.unlocked(), cfg.model.ignore_type():
      cfg.model[key] = value
