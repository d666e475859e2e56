"""The package's shape: no import loop (imports inside functions count too), short files,
and config errors that are reported before TensorFlow or JAX is imported."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'imgcls'
MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _resolve(name: str, modules) -> str | None:
  """The package module an import names, or None for anything outside imgcls."""
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """{module: the imgcls modules it imports}, at any depth of the file (functions too).

  `from imgcls.data import preprocess` is an edge to imgcls.data.preprocess; the parent
  package's __init__, which Python runs first, is not counted (it is a package's own affair).
  """
  modules = _modules()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # relative import
          anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
                   for alias in node.names]
      for target in targets:
        if target.split('.')[0] == 'imgcls':
          resolved = _resolve(target, modules)
          if resolved and resolved != name:
            graph[name].add(resolved)
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_the_import_graph_has_no_loop():
  graph = import_graph()
  assert len(graph) > 30 and graph['imgcls.train']  # the walk found the package
  assert 'imgcls.checkpoints' in graph['imgcls.train']
  assert _cycles(graph) == []


def test_the_loop_finder_finds_loops():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_no_package_file_is_over_450_lines():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob('*.py')
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert long == {}


FAST = """
import sys, time
t = time.perf_counter()
from imgcls import config, registry
c = config.defaults()
{change}
try:
  config.validate(c)
except config.ConfigError as e:
  print(f'{{time.perf_counter() - t:.2f}}', registry.is_loaded('tensorflow'),
        registry.is_loaded('jax'), str(e).replace(chr(10), ' '))
"""


@pytest.mark.parametrize('change, message, jax_loaded', [
    ('c.lr.bse = 0.1', "unknown key 'lr.bse'. Did you mean 'base'?", False),
    ("with c.ignore_type(): c.batch_size = 'big'", "'batch_size' must be int", False),
    ("c.pp_train = 'decode|flip_rl'", "Unknown pp op 'flip_rl'", False),
    ("c.model.name = 'resnet19'", "unknown model.name 'resnet19'", True),
])
def test_bad_configs_fail_fast_without_tensorflow(change, message, jax_loaded):
  """Printed: seconds from `import imgcls.config` to the error (the budget is 3 s)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', FAST.format(change=change)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=True).stdout
  seconds, tf_loaded, jax_was_loaded, error = out.strip().split(' ', 3)
  print(f'\n{change}: error after {seconds} s in the process ({time.perf_counter() - start:.2f} '
        f's with the interpreter start); JAX imported: {jax_was_loaded}')
  assert message in error
  assert tf_loaded == 'False'
  assert jax_was_loaded == str(jax_loaded)  # keys, types and ops need no JAX
