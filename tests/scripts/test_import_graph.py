"""scripts/import_graph.py measures a training run up to its first train step."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / 'scripts' / 'import_graph.py'


def test_import_graph_counts_modules_and_hops():
  spec = importlib.util.spec_from_file_location('import_graph', SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  result = script.measure()
  assert result['chain'][0] == 'imgcls.main.main'
  assert result['chain'][-1] == 'imgcls.step.train_step'
  assert result['hops'] == len(result['chain']) >= 3
  assert 'imgcls.train' in result['imgcls_module_names']
  assert 0 < result['imgcls_modules'] < result['total_modules']
  assert result['imgcls_functions_called'] > result['hops']


pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
