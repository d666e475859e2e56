"""The `imgcls` command: defines and parses the flags, checks them against the command
(imgcls.cli holds the command table and the help drawn from it), and calls the one library
function each command names.
"""

from __future__ import annotations

import errno
import logging as logging_std
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imgcls.cli import (COMMANDS, HELP_FLAGS, MODEL_COMMANDS, check_flags, command_help, fail,
                        overview)
from imgcls.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/default.py or configs/f.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics '
                               '(local or gs://). Rerunning on it resumes.')
_STEP = flags.DEFINE_string('step', 'best', 'Checkpoint to use: best, latest or a step number.')
_WEIGHTS = flags.DEFINE_enum('weights', 'auto', ['auto', 'raw', 'ema'], 'auto (the EMA when '
                             'the run kept one, else raw), raw or ema.')
_FORMAT = flags.DEFINE_string('format', None, 'onnx or stablehlo.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Labels (with probabilities) per image.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per model call.')
_TTA = flags.DEFINE_string('tta', '', 'flip = average with the mirrored image.')
_SPLIT = flags.DEFINE_string('split', None, 'Split to score (default: the config\'s).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS\'s own).')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Folder holding the dataset\'s '
                                  'downloaded files.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Validate and print the commands only.')
_OUT = flags.DEFINE_string('out', None, 'Output: see `imgcls COMMAND --help`.')
_DATASET = flags.DEFINE_string('dataset', None, 'TFDS name or folder:/path to probe '
                               '(default: the checkpoint\'s own dataset and splits).')
_SHOTS = flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'Examples per class.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port '
                                   'of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process\'s index.')
_MIN_CONFIDENCE = flags.DEFINE_float('min_confidence', None, 'Abstain where the top-1 '
                                     'probability is below this.')
_MAX_RISK = flags.DEFINE_float('max_risk', None, 'Abstain below the confidence whose error '
                               'rate on the calibration split is at most this (e.g. 0.02).')
_CONFORMAL = flags.DEFINE_float('conformal', None, 'Write conformal label sets covering the '
                                'true label with probability 1 - alpha (e.g. 0.1).')
_METHOD = flags.DEFINE_string('method', 'auto', 'Saliency method: auto (gradcam for CNNs, '
                              'grad_attention for ViTs), gradcam, attention_rollout, '
                              'grad_attention or integrated_gradients.')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir although the config changes the '
    "run's math (schedule, batch, optimizer, data, pp, seed); recorded in the workdir.")

_COMPILATION_CACHE = flags.DEFINE_bool(
    'compilation_cache', True, "JAX's persistent compilation cache, in JAX_COMPILATION_CACHE_DIR "
    'or ~/.cache/imgcls/xla ($XDG_CACHE_HOME); --nocompilation_cache turns it off.')

_FILTER = flags.DEFINE_string('filter', None, "Only the names matching this glob, e.g. "
                              "'*dinov2*'.")

_MODEL_ARGS: dict[str, str] = {}  # --config.model.ARG=V the config file lacks (for sweeps)


def _given_flags() -> set[str]:
  """The names of the flags set on the command line (--config.KEY=V counts as config)."""
  names = {n.split('.')[0] for n in flags.FLAGS if flags.FLAGS[n].present}
  return names | ({'config'} if _MODEL_ARGS else set())


def _require(flag, name: str, command: str) -> str:
  if not flag.value:
    fail(f'`imgcls {command}` needs --{name}.')
  return flag.value


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter from orbax and tfds (one line per save); warnings stay."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets'))
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  command, *rest = argv[1:] or ['train']
  if command not in COMMANDS:
    fail(f'unknown command {command!r}; use one of: {", ".join(COMMANDS)} '
         '(`imgcls --help` says what each does).')
  check_flags(command, _given_flags())
  if command == 'compare':  # needs neither JAX nor TF
    from imgcls import compare  # pylint: disable=g-import-not-at-top
    if len(rest) != 1:
      fail(f'usage: {COMMANDS["compare"].usage}')
    try:
      print(compare.compare(rest[0], _OUT.value), end='')
    except compare.CompareError as e:
      fail(str(e))
    return
  if command == 'models':  # the registry and jax.eval_shape: no TensorFlow, no devices
    if rest:
      fail(f'usage: {COMMANDS["models"].usage}')
    _list_models(_FILTER.value or '*', _FORMAT.value or 'table')
    return
  try:
    _run(command, rest)
  except UserError as e:  # bad input: one message, no traceback
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    message = readable_error(e)
    if message is None or flags.FLAGS.verbosity > 0:  # --verbosity=1 shows the traceback
      raise
    fail(message)


def _chain(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def readable_error(e: BaseException) -> str | None:
  """One line for the environment's failures a person fixes outside imgcls (a full disk,
  a denied permission, cloud storage without credentials or network); None otherwise."""
  for err in _chain(e):
    text = str(err)
    if 'Failed loading config file' in text:  # config_flags defers a bad --config to here
      path = re.search(r'Attempted \[[^\]]*\]:\s*\n\s*(\S+)', text)
      last = [l.strip() for l in text.splitlines() if l.strip()][-1]
      return (f'cannot load the config file {path[1] if path else ""} ({last}): check the '
              '--config path, e.g. --config=configs/default.py.')
    if getattr(err, 'errno', None) == errno.ENOSPC or 'No space left on device' in text:
      where = getattr(err, 'filename', None) or 'the workdir or data dir'
      return (f'disk full: no space left on the device holding {where}. Free space there '
              '(or use another --workdir) and rerun the same command: it resumes from the '
              'last complete checkpoint.')
    if isinstance(err, PermissionError):
      return (f'permission denied: {err.filename or text}. Use a --workdir / --data_dir you '
              'can write, or fix its permissions.')
    if 'gs://' in text and any(w in text.lower() for w in (
        'credential', 'unauthenticated', 'permission', 'could not resolve', 'connect',
        'timed out', '401', '403')):
      return ('cannot reach Google Cloud Storage for a gs:// path (no credentials or no '
              f'network): {text.splitlines()[0][:200]}. Run `gcloud auth application-default '
              'login` (or set GOOGLE_APPLICATION_CREDENTIALS) on a machine that reaches '
              'storage.googleapis.com, or use local paths.')
  return None


def _print_result(result: dict) -> None:
  print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                 for k, v in result.items()))


MODEL_COLUMNS = ('name', 'family', 'params', 'resolution', 'normalize', 'formats')


def _list_models(pattern: str, fmt: str) -> None:
  """`imgcls models`: imgcls.models.list_model_info as an aligned table, CSV or JSON."""
  import csv, io, json  # pylint: disable=g-import-not-at-top,g-multiple-import
  if fmt not in ('table', 'csv', 'json'):
    fail(f'`imgcls models` --format is table, csv or json, not {fmt!r}.')
  from imgcls import models  # pylint: disable=g-import-not-at-top
  rows = models.list_model_info(pattern)
  if not rows:
    fail(f'no model name matches --filter={pattern!r}; `imgcls models` lists them all.')
  if fmt == 'json':
    print(json.dumps(rows, indent=1))
    return
  text = [{k: ('' if r[k] is None else ' '.join(r[k]) if k == 'formats' else
               f'{r[k]:,}' if k == 'params' and fmt == 'table' else str(r[k]))
           for k in MODEL_COLUMNS} for r in rows]
  if fmt == 'csv':
    out = io.StringIO()
    writer = csv.DictWriter(out, MODEL_COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(text)
    print(out.getvalue(), end='')
    return
  widths = {k: max(len(k), *(len(t[k]) for t in text)) for k in MODEL_COLUMNS}
  right = ('params', 'resolution')
  for t in [dict(zip(MODEL_COLUMNS, MODEL_COLUMNS)), *text]:
    print('  '.join(t[k].rjust(widths[k]) if k in right else t[k].ljust(widths[k])
                    for k in MODEL_COLUMNS).rstrip())


def _run(command: str, rest: list[str]) -> None:
  """One subcommand. Configs are validated before TensorFlow or the trainer is imported,
  so a bad key, value, model or op name is reported in seconds."""
  # pylint: disable=g-import-not-at-top
  from imgcls import config as config_lib
  if command in MODEL_COMMANDS:
    _set_xla_flags()
  config = _CONFIG.value
  if config is not None and _DATA_DIR.value:
    with config.unlocked():
      config.dataset.data_dir = _DATA_DIR.value
  if command == 'prepare':
    from imgcls import data
    if len(rest) > 1 or (not rest and config is None):
      fail(f'usage: {COMMANDS["prepare"].usage} (the dataset a training config names, with '
           'its --config.dataset.KEY=VALUE options).')
    if rest:
      path = data.prepare(rest[0], data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value)
    else:
      config_lib.validate(config)
      path = data.prepare_for(config.dataset, data_dir=_DATA_DIR.value,
                              manual_dir=_MANUAL_DIR.value)
    print(f'{rest[0] if rest else config.dataset.name} is prepared in {path}')
    return
  if command == 'predict':  # one CPU/GPU process; PATHs are the positional arguments
    from imgcls import predict
    _print_result(predict.predict(
        _require(_WORKDIR, 'workdir', command), rest, _require(_OUT, 'out', command),
        step=_STEP.value, weights=_WEIGHTS.value, top_k=_TOP_K.value,
        batch_size=_BATCH_SIZE.value, tta=_TTA.value, min_confidence=_MIN_CONFIDENCE.value,
        max_risk=_MAX_RISK.value, conformal=_CONFORMAL.value))
    return
  if command == 'explain':
    from imgcls import inference
    from imgcls.evaluators import explain
    if not rest:
      fail(f'usage: {COMMANDS["explain"].usage}')
    classifier = inference.load(_require(_WORKDIR, 'workdir', command), _STEP.value)
    written = explain.explain_files(classifier, _require(_OUT, 'out', command), rest,
                                    method=_METHOD.value)
    print(_explain_summary(written, _OUT.value))
    return
  if command == 'export' and not rest:
    from imgcls import export
    meta = export.export(_require(_WORKDIR, 'workdir', command),
                         _require(_FORMAT, 'format', command), _require(_OUT, 'out', command),
                         step=_STEP.value, weights=_WEIGHTS.value)
    print(f'wrote {_OUT.value} ({meta["bytes"] / 1e6:.2f} MB in {meta["export_seconds"]} s, '
          f'weights {meta["weights"]}, step {meta["step"]}); max |diff| from imgcls.load '
          f'{meta["verification"]["max_abs_diff"]:.2g}; metadata in {_OUT.value}.json')
    return
  if rest:
    fail(f'unexpected arguments {rest}.')
  workdir = _require(_WORKDIR, 'workdir', command)
  if command in ('train', 'sweep'):
    if config is None:
      fail(f'`imgcls {command}` needs --config, e.g. --config=configs/'
           f'{"fashion_mnist_sweep" if command == "sweep" else "default"}.py')
    if command == 'sweep':
      _sweep(config, workdir)
      return
    config_lib.validate(config)  # before TF and the trainer load (train reuses the check)
  from imgcls import checkpoints, parallel
  if command == 'train':
    parallel.compilation_cache(_COMPILATION_CACHE.value)
  if command in ('eval', 'fewshot', 'calibrate'):
    checkpoints.check_step_arg(_STEP.value)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  if command == 'eval':
    from imgcls.evaluators import checkpoint
    _print_result(checkpoint.evaluate_checkpoint(workdir, _STEP.value, _SPLIT.value,
                                                 _DATA_DIR.value, weights=_WEIGHTS.value))
  elif command == 'calibrate':
    from imgcls.evaluators import checkpoint
    _print_result(checkpoint.calibrate_checkpoint(workdir, _STEP.value, _SPLIT.value,
                                                  _DATA_DIR.value, weights=_WEIGHTS.value))
  elif command == 'fewshot':
    from imgcls.evaluators import checkpoint
    try:
      shots = [int(k) for k in _SHOTS.value]
    except ValueError:
      fail(f'--shots must be integers, e.g. --shots=1,5,10,25; got {_SHOTS.value}.')
    _print_result(checkpoint.fewshot_checkpoint(workdir, _DATASET.value,
                                                data_dir=_DATA_DIR.value, step=_STEP.value,
                                                shots=shots))
  else:
    from imgcls import train
    train.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
  # pylint: enable=g-import-not-at-top


def _explain_summary(written, out: str) -> str:
  count = sum(str(p).endswith('.png') for p in written)
  return f'wrote saliency maps of {count} files to {out} (NAME.png overlays, NAME.npy maps)'


def _set_xla_flags() -> None:
  """imgcls.hardware's XLA flags, set before anything starts JAX's backends (the first
  jax.devices() or computation reads XLA_FLAGS, once); imgcls.hardware imports no JAX."""
  from imgcls import hardware  # pylint: disable=g-import-not-at-top
  before = os.environ.get('XLA_FLAGS', '')
  after = hardware.set_xla_flags()
  if after != before:
    added = after[len(before):].strip() if after.startswith(before) else after
    logging.info('XLA_FLAGS: added %s (imgcls.hardware.set_xla_flags; %s=0 turns it off)',
                 added, hardware.OFF_ENV)


def _sweep(base, root: str) -> None:
  from imgcls import compare, sweep  # pylint: disable=g-import-not-at-top
  flag = flags.FLAGS['config']
  # The variants start from `base`, which has every override; these are for the printed
  # commands: config_flags' own overrides and the model arguments taken out before them.
  overrides = {**dict(config_flags.get_override_values(flag)), **_MODEL_ARGS}
  if _DATA_DIR.value:
    overrides['dataset.data_dir'] = _DATA_DIR.value
  sweep.run(config_flags.get_config_filename(flag), root, base=base,
            extra_overrides=overrides, dry_run=_DRY_RUN.value)
  if not _DRY_RUN.value:
    print(compare.compare(root), end='')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config override errors (a typo'd key, a bad type) made readable, and
  `--config.model.ARG=VALUE` for any model argument, set in the config file or not."""
  _answer_help(argv)
  from imgcls import config as config_lib  # pylint: disable=g-import-not-at-top
  argv, model_args = config_lib.split_model_overrides(argv)
  if model_args:  # ml_collections reads its overrides from sys.argv itself
    sys.argv = list(argv)
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace('\\n', '\n').replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # a repr's quotes
      text = text[1:-1]
    # A failing get_config() arrives with its traceback; its last line is the message.
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    message = lines[-1] if 'Traceback' in text else ' '.join(lines)
    fail(f'bad flag or config override: {message.rstrip(".")}. See `imgcls COMMAND --help`; config '
         'keys are listed in imgcls/config.py. An override sets a key the config has, or any '
         'argument of the configured model (--config.model.dtype=bfloat16).')
    raise  # unreachable: fail exits
  if model_args:  # checked against the model's signature by config.validate, as file keys are
    config_lib.apply_model_overrides(_CONFIG.value, model_args)
    _MODEL_ARGS.update({f'model.{k}': v for k, v in model_args.items()})
  return rest


def _answer_help(argv: list[str]) -> None:
  """Bare `imgcls` and `imgcls [COMMAND] --help` print the overview or the command's help and
  exit; --helpfull stays absl's (every flag)."""
  words = [a for a in argv[1:] if not a.startswith('-')]
  if len(argv) == 1 or any(a in HELP_FLAGS for a in argv[1:]):
    print(command_help(words[0]) if words and words[0] in COMMANDS else overview(), end='')
    sys.exit(0)


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
