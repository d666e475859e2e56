"""The `imgcls` command: train (default), eval, prepare, sweep, compare, predict and export.
Flags only.

  imgcls train   --config=configs/default.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
  imgcls eval    --workdir=DIR [--step=best|latest|N] [--split=test] [--weights=auto|raw|ema]
  imgcls prepare fashion_mnist [--data_dir=DIR] [--manual_dir=DIR]
  imgcls prepare --config=configs/image_folder.py:root=DIR,classes=N [--config.dataset.KEY=V]
  imgcls fewshot --workdir=DIR [--dataset=NAME] [--shots=1,5,10,25] [--step=best]
  imgcls sweep   --config=configs/fashion_mnist_sweep.py[:ARG] --workdir=ROOT [--dry_run]
  imgcls compare ROOT [--out=DIR]
  imgcls predict --workdir=DIR --out=FILE.csv|FILE.jsonl [--step=best] [--weights=auto]
                 [--top_k=5] [--batch_size=64] [--tta=flip] PATH|FOLDER|GLOB ...
  imgcls export  --workdir=DIR --format=onnx|stablehlo --out=PATH [--step=best] [--weights=auto]
"""

from __future__ import annotations

import errno
import logging as logging_std
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from imgcls.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/default.py or configs/f.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics '
                               '(local or gs://). Rerunning on it resumes.')
_STEP = flags.DEFINE_string('step', 'best', 'eval, fewshot, predict, export: checkpoint to use: '
                            'best, latest or a step.')
_WEIGHTS = flags.DEFINE_enum('weights', 'auto', ['auto', 'raw', 'ema'], 'eval, predict, '
                             'export: auto (the EMA when the run kept one, else raw), raw or ema.')
_FORMAT = flags.DEFINE_string('format', None, 'export: onnx or stablehlo.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'predict: labels (with probabilities) per image.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'predict: images per model call.')
_TTA = flags.DEFINE_string('tta', '', 'predict: flip = average with the mirrored image.')
_SPLIT = flags.DEFINE_string('split', None, 'eval: split to score (default: the config\'s).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS\'s own).')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'prepare: folder holding the '
                                  'dataset\'s downloaded files.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'sweep: validate and print the commands only.')
_OUT = flags.DEFINE_string('out', None, 'compare: folder for compare.md/.csv and curves.png '
                           '(default: ROOT); predict: FILE.csv or FILE.jsonl; export: the file.')
_DATASET = flags.DEFINE_string('dataset', None, 'fewshot: TFDS name or folder:/path to probe '
                               '(default: the checkpoint\'s own dataset and splits).')
_SHOTS = flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'fewshot: examples per class.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port '
                                   'of process 0 (jax.distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this process\'s index.')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'train: resume a workdir although the config changes the '
    "run's math (schedule, batch, optimizer, data, pp, seed); recorded in the workdir.")

_MODEL_ARGS: dict[str, str] = {}  # --config.model.ARG=V the config file lacks (for sweeps)

COMMANDS = ('train', 'eval', 'fewshot', 'prepare', 'sweep', 'compare', 'predict', 'export')
MODEL_COMMANDS = ('train', 'eval', 'fewshot', 'sweep', 'predict', 'export')  # these run models


def _fail(message: str) -> None:
  print(f'imgcls: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _require(flag, name: str, command: str) -> str:
  if not flag.value:
    _fail(f'`imgcls {command}` needs --{name}.')
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
    _fail(f'unknown command {command!r}; use one of: {", ".join(COMMANDS)}.')

  if command == 'compare':  # needs neither JAX nor TF
    from imgcls import compare  # pylint: disable=g-import-not-at-top
    if len(rest) != 1:
      _fail('usage: imgcls compare ROOT [--out=DIR]')
    try:
      print(compare.compare(rest[0], _OUT.value), end='')
    except compare.CompareError as e:
      _fail(str(e))
    return
  try:
    _run(command, rest)
  except UserError as e:  # bad input: one message, no traceback
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    message = readable_error(e)
    if message is None or flags.FLAGS.verbosity > 0:  # --verbosity=1 shows the traceback
      raise
    _fail(message)


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


def _single_process() -> bool:
  """Whether this launch is plainly one process (no multi-process flags, no cluster
  environment that jax.distributed would join): only then may it check the workdir's lock
  before JAX starts. Other processes of a relaunched multi-host run must not refuse the
  lock their own dead process 0 left on another host."""
  cluster = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS',
             'OMPI_COMM_WORLD_SIZE')
  return (_NUM_PROCESSES.value in (None, 1) and _COORDINATOR.value is None and
          not any(k in os.environ for k in cluster))


def _print_result(result: dict) -> None:
  print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                 for k, v in result.items()))


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
      _fail('usage: imgcls prepare DATASET_NAME [--data_dir=DIR] [--manual_dir=DIR], or '
            'imgcls prepare --config=CONFIG [--config.dataset.KEY=VALUE ...] (the dataset a '
            'training config names, with the same options)')
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
        batch_size=_BATCH_SIZE.value, tta=_TTA.value))
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
    _fail(f'unexpected arguments {rest}.')
  workdir = _require(_WORKDIR, 'workdir', command)
  if command in ('train', 'sweep'):
    if config is None:
      _fail(f'`imgcls {command}` needs --config, e.g. --config=configs/'
            f'{"fashion_mnist_sweep" if command == "sweep" else "default"}.py')
    if command == 'sweep':
      _sweep(config, workdir)
      return
    if _single_process():  # process 0 of a multi-host run takes the lock in train itself
      from imgcls.lock import WorkdirLock
      WorkdirLock(workdir).check_free()  # a second launch is refused before JAX or TF loads
    config_lib.validate(config)
  from imgcls import checkpoints, parallel
  if command in ('eval', 'fewshot'):
    checkpoints.check_step_arg(_STEP.value)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  if command == 'eval':
    from imgcls.evaluators import checkpoint
    _print_result(checkpoint.evaluate_checkpoint(workdir, _STEP.value, _SPLIT.value,
                                                 _DATA_DIR.value, weights=_WEIGHTS.value))
  elif command == 'fewshot':
    from imgcls.evaluators import checkpoint
    try:
      shots = [int(k) for k in _SHOTS.value]
    except ValueError:
      _fail(f'--shots must be integers, e.g. --shots=1,5,10,25; got {_SHOTS.value}.')
    _print_result(checkpoint.fewshot_checkpoint(workdir, _DATASET.value,
                                                data_dir=_DATA_DIR.value, step=_STEP.value,
                                                shots=shots))
  else:
    from imgcls import train
    train.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
  # pylint: enable=g-import-not-at-top


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
    _fail(f'bad flag or config override: {message.rstrip(".")}. See `imgcls --helpshort`; config '
          'keys are listed in imgcls/config.py. An override sets a key the config has, or any '
          'argument of the configured model (--config.model.dtype=bfloat16).')
    raise  # unreachable: _fail exits
  if model_args:  # checked against the model's signature by config.validate, as file keys are
    config_lib.apply_model_overrides(_CONFIG.value, model_args)
    _MODEL_ARGS.update({f'model.{k}': v for k, v in model_args.items()})
  return rest


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
