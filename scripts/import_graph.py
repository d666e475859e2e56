"""How much a training run goes through before its first train step: modules imported,
imgcls functions called, and the hops (call-chain depth) from imgcls.main.main to it.

  python scripts/import_graph.py [--root=REPO] [--json]

Runs `imgcls train` (tiny ResNet, synthetic data) in a fresh process and stops it at the first
call of imgcls.step.train_step. Hops are the imgcls functions on the call stack there, main
and train_step counted. --root measures another checkout (e.g. a `git worktree` of an older
commit), so a simplification can be compared with the tree before it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = 'IMPORT_GRAPH '

_OVERRIDES = {'dataset.name': 'synthetic_shapes', 'dataset.num_classes': 4,
              'pp_train': 'decode|flip_lr|value_range(-1,1)|onehot(4)',
              'pp_eval': 'decode|value_range(-1,1)|onehot(4)', 'model.name': 'resnet10',
              'model.width': 8, 'model.stem': 'small', 'batch_size': 8,
              'eval_batch_size': 8, 'total_steps': 2}

_MAKE_DATA = ('import sys; from imgcls import data; data.make_synthetic_dataset(sys.argv[1], '
              'num_train=32, num_test=16, image_size=16, channels=1, num_classes=4)')


class _Stop(BaseException):
  """Raised at the first train step: passes every `except Exception` on its way up."""


def _child(data_dir: str, workdir: str) -> None:
  """Runs `imgcls train` in this (fresh) process up to the first train step; prints a line."""
  called: set[str] = set()

  def profile(frame, event, arg):  # pylint: disable=unused-argument
    module, name = frame.f_globals.get('__name__', ''), frame.f_code.co_qualname
    if event == 'call' and module.startswith('imgcls') and not name.startswith('<'):
      called.add(f'{module}.{name}')
  sys.setprofile(profile)  # from the first import on
  from imgcls import main, step  # pylint: disable=g-import-not-at-top

  def train_step(*args, **kwargs):
    frame, hops = sys._getframe(1), ['imgcls.step.train_step']  # pylint: disable=protected-access
    while frame is not None:
      module = frame.f_globals.get('__name__', '')
      if module.startswith('imgcls.'):
        hops.append(f'{module}.{frame.f_code.co_name}')
      if module == 'imgcls.main' and frame.f_code.co_name == 'main':
        break
      frame = frame.f_back
    sys.setprofile(None)
    names = sorted(sys.modules)
    print(MARK + json.dumps({
        'imgcls_modules': len([n for n in names if n == 'imgcls' or n.startswith('imgcls.')]),
        'total_modules': len(names), 'hops': len(hops), 'chain': hops[::-1],
        'imgcls_functions_called': len(called),
        'imgcls_from': os.path.dirname(os.path.dirname(main.__file__)),
        'imgcls_module_names': [n for n in names if n.startswith('imgcls')]}), flush=True)
    raise _Stop()
  step.train_step = train_step
  sys.argv = ['imgcls', 'train', f'--config={os.getcwd()}/configs/default.py',
              f'--workdir={workdir}',
              f'--config.dataset.data_dir={data_dir}',
              *(f'--config.{k}={v}' for k, v in _OVERRIDES.items())]
  try:
    main.run()
  except _Stop:
    pass


def measure(root: pathlib.Path = ROOT) -> dict:
  """The figures for the checkout at `root`, each from a fresh process."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = os.pathsep.join([str(root), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, 'data')
    subprocess.run([sys.executable, '-c', _MAKE_DATA, data_dir], env=env, check=True,
                   capture_output=True, cwd=root)
    proc = subprocess.run([sys.executable, __file__, '--child', data_dir,
                           os.path.join(tmp, 'w')], env=env, capture_output=True, text=True,
                          cwd=root)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
  if not lines:
    raise RuntimeError(f'the run stopped before its train step:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len(MARK):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default=str(ROOT), help='The checkout to measure.')
  parser.add_argument('--json', action='store_true', help='Print the figures as JSON.')
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(*args.child)
    return
  result = measure(pathlib.Path(args.root).resolve())
  if args.json:
    print(json.dumps(result, indent=1))
    return
  print(f'checkout: {result["imgcls_from"]}')
  print(f'imgcls modules imported: {result["imgcls_modules"]}')
  print(f'total modules imported: {result["total_modules"]}')
  print(f'imgcls functions called before the first train step: '
        f'{result["imgcls_functions_called"]}')
  print(f'hops from imgcls.main.main to imgcls.step.train_step: {result["hops"]}')
  print('  ' + '\n  '.join(result['chain']))


if __name__ == '__main__':
  main()
