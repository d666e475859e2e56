"""The experiment schema: every knob a config may turn, its default, and validation.

Config files start from `defaults()` and change fields; `validate()` rejects any key
that is not in the schema (a typo must not become a silent default), any value of the
wrong type, and values that cannot work (the checks: imgcls/config_check.py). It runs
before anything is written.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from imgcls import config_check
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
  # layer_decay (e.g. 0.75) scales a ViT block i's lr by layer_decay ** (depth - i); ConvNeXt's
  # by its group of the official 12 (optim.convnext_layer_id).
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


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError listing every problem; returns the config, the model placeholders of
  its pp strings filled in. A config passed once is not checked again (imgcls.config_check)."""
  return config_check.validate(cfg, defaults(), REMOVED)


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
                        f'{", ".join(defaults)}.{config_check.suggest(key, defaults)}')
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


def finetune_dataset(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  """The fine-tune recipes' data: an image folder (arg.root) or a TFDS dataset (arg.dataset,
  train_split, eval_split), with arg.classes classes."""
  if arg.root:
    from imgcls.data import folder  # pylint: disable=g-import-not-at-top
    c.dataset.name = f'folder:{arg.root}'
    c.dataset.eval_split = arg.eval_split or folder.eval_split(c.dataset.name,
                                                               c.dataset.folder_split)
  else:
    c.dataset.name = arg.dataset
    c.dataset.train_split = arg.train_split
    c.dataset.eval_split = arg.eval_split or 'test'
  c.dataset.num_classes = arg.classes
  c.dataset.shuffle_buffer = 10_000


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
