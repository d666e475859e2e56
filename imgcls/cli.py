"""The `imgcls` commands: the table of subcommands (a summary, the flags each takes, an
example) and the help text and flag checks drawn from it. The flags themselves are defined
in imgcls.main, which parses them and calls each command's library function."""

from __future__ import annotations

import dataclasses
import sys

from absl import flags


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: a line for `imgcls --help`, the flags it takes (names without dashes;
  'config' also covers --config.KEY=VALUE overrides) and a command line that works."""
  summary: str
  flags: frozenset[str]
  example: str
  usage: str = ''
  flag_help: tuple[tuple[str, str], ...] = ()  # this command's reading of a shared flag


_MULTI = ('coordinator_address', 'num_processes', 'process_id')
COMMANDS: dict[str, Command] = {
    'train': Command(
        'Train and evaluate a config in a workdir; rerunning resumes it.',
        frozenset({'config', 'workdir', 'allow_config_change', 'data_dir', 'compilation_cache',
                   *_MULTI}),
        'imgcls train --config=configs/default.py --workdir=/tmp/fmnist',
        'imgcls train --config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...]'),
    'eval': Command(
        "Score a checkpoint with its run's evaluators (or on --split).",
        frozenset({'workdir', 'step', 'split', 'weights', 'data_dir', *_MULTI}),
        'imgcls eval --workdir=/tmp/fmnist --step=best',
        'imgcls eval --workdir=DIR [--step=best|latest|N] [--split=SPLIT] [--weights=auto]'),
    'fewshot': Command(
        "Few-shot linear probe of a checkpoint's features.",
        frozenset({'workdir', 'dataset', 'shots', 'step', 'data_dir', *_MULTI}),
        'imgcls fewshot --workdir=/tmp/fmnist --shots=1,5,10',
        'imgcls fewshot --workdir=DIR [--dataset=NAME|folder:/path] [--shots=1,5,10,25]'),
    'prepare': Command(
        'Prepare a dataset offline (a TFDS name, or the dataset a config names).',
        frozenset({'config', 'data_dir', 'manual_dir'}),
        'imgcls prepare fashion_mnist --manual_dir=/usr/share/datasets/fashion-mnist',
        'imgcls prepare NAME [--data_dir=DIR] [--manual_dir=DIR] | prepare --config=FILE'),
    'sweep': Command(
        "Train each variant of a sweep config in ROOT/NAME, then compare them.",
        frozenset({'config', 'workdir', 'dry_run', 'data_dir'}),
        'imgcls sweep --config=configs/fashion_mnist_sweep.py --workdir=/tmp/sweep --dry_run',
        'imgcls sweep --config=FILE[:ARG] --workdir=ROOT [--dry_run]'),
    'compare': Command(
        'Tabulate and plot the runs under ROOT (compare.md, compare.csv, curves.png).',
        frozenset({'out'}),
        'imgcls compare /tmp/sweep',
        'imgcls compare ROOT [--out=DIR]',
        (('out', 'Folder for compare.md/.csv and curves.png (default: ROOT).'),)),
    'models': Command(
        'List the model names with family, parameters, resolution, normalisation and weight '
        'formats.',
        frozenset({'filter', 'format'}),
        "imgcls models --filter='*dinov2*'",
        'imgcls models [--filter=GLOB] [--format=table|csv|json]',
        (('format', 'table (default), csv or json.'),)),
    'predict': Command(
        'Label image files, folders or globs with a checkpoint; writes CSV or JSON lines.',
        frozenset({'workdir', 'out', 'step', 'weights', 'top_k', 'batch_size', 'tta',
                   'min_confidence', 'max_risk', 'conformal'}),
        'imgcls predict --workdir=/tmp/fmnist --out=/tmp/pred.csv photos/',
        'imgcls predict --workdir=DIR --out=FILE.csv|FILE.jsonl [--max_risk=R | '
        '--min_confidence=C] [--conformal=ALPHA] PATH|FOLDER|GLOB ...',
        (('out', 'FILE.csv or FILE.jsonl: one row per image.'),
         ('max_risk', 'Abstain (column abstain) below the confidence whose error rate on the '
                      'calibration split is at most R; needs `imgcls calibrate`.'),
         ('conformal', 'ALPHA: a column set_{100(1-ALPHA)} with each image\'s label set '
                       '(conformal, ~1-ALPHA coverage); needs `imgcls calibrate`.'))),
    'calibrate': Command(
        'Fit temperature scaling, abstention and conformal scores on held-out data.',
        frozenset({'workdir', 'step', 'split', 'weights', 'data_dir'}),
        "imgcls calibrate --workdir=/tmp/fmnist --split='test[:5000]'",
        'imgcls calibrate --workdir=DIR [--split=HELD_OUT] [--step=best|latest|N]',
        (('split', 'Held-out split to fit on (default: the run\'s dataset.val_split); never '
                   'the training split.'),)),
    'explain': Command(
        'Saliency maps of image files: overlays (PNG) and raw maps (.npy) per file.',
        frozenset({'workdir', 'out', 'step', 'method'}),
        'imgcls explain --workdir=/tmp/fmnist --out=/tmp/maps photos/shoe.png',
        'imgcls explain --workdir=DIR --out=FOLDER [--method=auto] FILE ...',
        (('out', 'Folder for NAME.png (overlay) and NAME.npy (map at the image\'s size).'),)),
    'export': Command(
        'Export a checkpoint to ONNX or StableHLO, checked against imgcls.load.',
        frozenset({'workdir', 'format', 'out', 'step', 'weights'}),
        'imgcls export --workdir=/tmp/fmnist --format=onnx --out=/tmp/model.onnx',
        'imgcls export --workdir=DIR --format=onnx|stablehlo --out=PATH',
        (('out', 'The file to write (its metadata goes to PATH.json).'),)),
}
MODEL_COMMANDS = ('train', 'eval', 'fewshot', 'sweep', 'predict', 'export', 'calibrate',
                  'explain')  # these run models
HELP_FLAGS = ('--help', '-h', '-?', '--helpshort')


def overview() -> str:
  """`imgcls --help`: the commands, a line each."""
  width = max(map(len, COMMANDS))
  lines = [f'  {name:<{width}}  {c.summary}' for name, c in COMMANDS.items()]
  return ('usage: imgcls COMMAND [flags]\n\ncommands:\n' + '\n'.join(lines) +
          '\n\n`imgcls COMMAND --help` shows its flags and an example; --helpfull shows every '
          'flag.\n')


def command_help(name: str) -> str:
  """`imgcls COMMAND --help`: its usage, its flags with their help text, and an example."""
  command, own = COMMANDS[name], dict(COMMANDS[name].flag_help)
  lines = [f'usage: {command.usage}', '', command.summary, '', 'flags:']
  for flag in sorted(command.flags):
    f = flags.FLAGS[flag]
    value = ','.join(f.default) if isinstance(f.default, list) else f.default
    default = '' if value in (None, '', False) else f' (default: {value})'
    lines.append(f'  --{flag}: {own.get(flag, f.help)}{default}')
    if flag == 'config':
      lines.append('  --config.KEY=VALUE: set any key of the config (keys: imgcls/config.py), '
                   'e.g. --config.lr.base=0.1.')
  lines += ['', 'example:', f'  {command.example}', '']
  return '\n'.join(lines)


def check_flags(name: str, given: set[str]) -> None:
  """Refuses, in one line, a flag that belongs to other commands only."""
  for flag in sorted(given - COMMANDS[name].flags):
    owners = [c for c, command in COMMANDS.items() if flag in command.flags]
    if owners:  # absl's own flags (--verbosity, ...) belong to no command: any may take them
      fail(f'--{flag} is a flag of ' + ', '.join(f'`imgcls {c}`' for c in owners) +
           f', not of `imgcls {name}`. See `imgcls {name} --help`.')


def fail(message: str) -> None:
  """The CLI's one-line error: `imgcls: error: ...` on stderr, exit status 2."""
  print(f'imgcls: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)

