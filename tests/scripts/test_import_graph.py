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
  # Fewer than before the simplification (commit 708c6d4: 55 imgcls modules, 5 hops), with
  # the capabilities added since, and nothing a ResNet run does not use: no other data
  # source, model family, weight code, pp op module, few-shot or serving code.
  assert result['imgcls_modules'] < 55 and result['hops'] < 5, result
  unused = {'imgcls.data.folder', 'imgcls.data.mosaic', 'imgcls.data.long_tail',
            'imgcls.data.randaugment', 'imgcls.evaluators.fewshot', 'imgcls.inference',
            'imgcls.models.bit', 'imgcls.models.vit', 'imgcls.models.vit_layers',
            'imgcls.models.posemb', 'imgcls.models.convnext', 'imgcls.models.weights',
            'imgcls.models.convert', 'imgcls.models.vit_weights'}
  assert not unused & set(result['imgcls_module_names'])


pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
