"""imgcls.data's structure: checking a pp string or finding a source loads no TensorFlow, the
modules import one another without loops (imports inside functions, lazy_import and registry
declarations count), the bottom module imports no other data module, and no module outgrows a
screenful of screens."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

DATA = pathlib.Path(__file__).parents[2] / 'imgcls' / 'data'

_CHECK = r'''
import json, time
start = time.perf_counter()
import imgcls.data.preprocess as preprocess
from imgcls.data import DataError, sources
from imgcls.registry import is_loaded
preprocess.get_pp_fn('decode|random_crop(28, pad=4)|flip_lr|value_range(-1, 1)|onehot(10)')
preprocess.get_pp_fn('decode(3)|inception_crop(224)|randaugment(2, 9)|color_jitter|'
                     'normalize_preset("imagenet")|random_erasing(0.25)|multihot(5)|keep("image")')
errors = []
for bad in ('decode|no_such_op', 'resize(0)', 'value_range(1, 2, in_min=3, in_max=3)',
            'normalize("a", 1)', 'randaugment(ops="Nope")', 'decode|resize('):
  try:
    preprocess.get_pp_fn(bad)
  except DataError as e:
    errors.append(str(e))
import sys
SOURCE_MODULES = ('fashion_mnist', 'long_tail', 'mosaic', 'folder', 'tfds_source')
loaded = lambda: [m for m in SOURCE_MODULES if f'imgcls.data.{m}' in sys.modules]
declared, loaded_at_start = sources.SOURCES.names(), loaded()
sources.source_for('fashion_mnist')
loaded_by_one = loaded()
found = [type(sources.source_for(n)).__name__
         for n in ('fashion_mnist', 'fashion_mnist_mosaic/small', 'folder:/x', 'cifar10')]
print(json.dumps({'seconds': time.perf_counter() - start, 'errors': errors, 'sources': found,
                  'declared': declared, 'loaded_at_start': loaded_at_start,
                  'loaded_by_one': loaded_by_one, 'loaded_by_all': loaded(),
                  'tf': is_loaded('tensorflow'), 'tfds': is_loaded('tensorflow_datasets'),
                  'image_only': preprocess.image_only('decode|flip_lr|onehot(10)')}))
'''


def test_pp_validation_and_sources_load_no_tensorflow():
  out = subprocess.run([sys.executable, '-c', _CHECK], capture_output=True, text=True,
                       check=True, timeout=300)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"pp validation in a fresh process: {result['seconds']:.2f} s (imports included)")
  assert len(result['errors']) == 6, result['errors']
  assert result['sources'] == ['FashionMnistSource', 'MosaicSource', 'FolderSource', 'TfdsSource']
  # Every source is known by name up front; a lookup imports only the source it picks (and
  # fashion_mnist's base class, tfds_source).
  assert result['declared'] == ['fashion_mnist', 'fashion_mnist_lt', 'fashion_mnist_mosaic',
                                'folder', 'tfds']
  assert result['loaded_at_start'] == []
  assert result['loaded_by_one'] == ['fashion_mnist', 'tfds_source']
  assert result['loaded_by_all'] == ['fashion_mnist', 'mosaic', 'folder', 'tfds_source']
  assert result['image_only'] == 'decode|flip_lr'
  assert not result['tf'] and not result['tfds'], 'checking a pp string loaded TensorFlow'


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The imgcls.data modules `path` imports anywhere (functions too), lazily or not."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    elif (isinstance(node, ast.Call) and  # lazy_import('m'), _declare(name, 'm'), .declare(...)
          (getattr(node.func, 'id', '') or getattr(node.func, 'attr', '')).lstrip('_') in (
              'lazy_import', 'declare')):
      names = [a.value for a in node.args
               if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    for name in names:
      if name.startswith('imgcls.data.') and name.split('.')[2] in modules:
        found.add(name.split('.')[2])
  return found - {path.stem}


def _graph() -> dict[str, set[str]]:
  modules = {p.stem for p in DATA.glob('*.py') if p.stem != '__init__'}
  return {m: _imports(DATA / f'{m}.py', modules) for m in sorted(modules)}


def test_no_import_loops():
  graph = _graph()
  state: dict[str, str] = {}

  def visit(m, path):
    if state.get(m) == 'done':
      return
    if state.get(m) == 'open':
      pytest.fail(f'import loop: {" -> ".join(path + [m])}')
    state[m] = 'open'
    for dep in sorted(graph[m]):
      visit(dep, path + [m])
    state[m] = 'done'

  for m in graph:
    visit(m, [])


def test_base_is_the_bottom():
  assert _graph()['base'] == set()
  assert _graph()['preprocess'] == {'base'}


def test_no_module_over_450_lines():
  long = {p.name: n for p in DATA.glob('*.py') if (n := len(p.read_text().splitlines())) > 450}
  assert not long, long


def test_lazy_sources_match_their_declarations():
  from imgcls.data import base, folder_layout, sources  # pylint: disable=g-import-not-at-top
  assert sources.DEFAULT_FOLDER_SPLIT == folder_layout.DEFAULT_SPLIT
  for name in sources.SOURCES.names():  # loading each checks its claims against the table
    source = sources.SOURCES.get(name)
    assert base.claims(source) == sources.SOURCES.info(name)
  registry = type(sources.SOURCES)('dataset source')
  registry.declare('x', 'imgcls.data.folder', names=('x',), prefix='', fallback=False)
  with pytest.raises(ValueError, match='declared with'):
    registry.register('x', sources.SOURCES.get('folder'), **base.claims(
        sources.SOURCES.get('folder')))
