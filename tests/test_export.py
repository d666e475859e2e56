"""imgcls export: ONNX (onnxruntime) and StableHLO (jax.export, no imgcls needed to run it) of
ResNet, ViT and BiT checkpoints give imgcls.load's probabilities at any batch size."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import onnxruntime as ort
import pytest

import imgcls
from imgcls import checkpoints, export
from imgcls.models import layers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'scripts'))
from samples import LABELS, random_checkpoint as save_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top
MODELS = {
    # The quickstart's shapes (28 -> 14 -> 7 -> 4 -> 2; im2col convs at 2x2), at width 8.
    'resnet': ({'name': 'resnet18', 'width': 8, 'stem': 'small_s2'}, (28, 28, 1),
               'decode|value_range(-1, 1)|onehot(3)'),
    'vit': ({'name': 'vit', 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32,
             'patch_size': 4}, (8, 8, 3), 'decode(3)|normalize_preset("imagenet")|onehot(3)'),
    'bit': ({'name': 'bit', 'width': 8, 'stage_sizes': [1, 1], 'num_groups': 4}, (16, 16, 3),
            'decode(3)|resize_small(16)|central_crop(16)|value_range(-1, 1)|onehot(3)'),
}


def test_max_pool_as_slices_equals_reduce_window():
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))
  for window, strides, padding in (((3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem
                                   ((3, 3), (2, 2), 'VALID'), ((2, 3), (1, 2), 'SAME')):
    pools = [jax.jit(lambda x, f=f: f(x, window, strides, padding))
             for f in (layers.max_pool, nn.max_pool)]
    np.testing.assert_array_equal(*[np.asarray(pool(x)) for pool in pools])


def test_preprocessing_split_between_caller_and_graph():
  caller, graph = export.split_pp(MODELS['bit'][2].replace('|onehot(3)', ''))
  assert caller == 'decode(3)|resize_small(16)|central_crop(16)'
  assert [name for name, _ in graph] == ['value_range']
  assert export.affine(graph, 3)[:2] == ([127.5] * 3, [127.5] * 3)
  mean, std, _ = export.affine(export.split_pp('normalize_preset("imagenet")')[1], 3)
  np.testing.assert_allclose(mean, [123.675, 116.28, 103.53])
  with pytest.raises(export.ExportError, match='flip_lr'):
    export.split_pp('decode|flip_lr|value_range(0, 1)')
  with pytest.raises(export.ExportError, match='resize'):
    export.split_pp('decode|value_range(0, 1)|resize(8)')


@pytest.mark.parametrize('name', ['vit', 'bit'])
def test_onnx_of_vit_and_bit_matches_imgcls_load(name, tmp_path):
  """BiT: GroupNorm's nested jits and the fixed stem max-pool; ViT: attention."""
  model_config, shape, pp = MODELS[name]
  workdir = save_checkpoint(tmp_path / 'run', model_config, shape, pp)
  clf = imgcls.load(workdir)
  images = export.check_images(shape)
  meta = export.export_classifier(clf, 'onnx', str(tmp_path / 'model.onnx'), images=images)
  assert meta['verification']['max_abs_diff'] <= 1e-5  # at batches 1 and 7
  session = ort.InferenceSession(str(tmp_path / 'model.onnx'),
                                 providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(session.run(None, {'images': images})[0],
                             clf.probabilities(images), atol=1e-5)
  written = json.loads((tmp_path / 'model.onnx.json').read_text())
  assert written == json.loads(json.dumps(meta))
  assert written['labels'] == LABELS and written['weights'] == 'raw'
  assert written['input']['shape'] == ['batch', *shape]
  if name == 'bit':
    assert written['caller_preprocessing'] == 'decode(3)|resize_small(16)|central_crop(16)'
    assert written['normalisation']['mean'] == [127.5] * 3


def test_resnet_onnx_and_stablehlo_at_any_batch_size(tmp_path):
  """An EMA run: the exports use the EMA, as imgcls.load does; batches of 1, 7 and 64; the
  StableHLO file runs in a process that imports JAX alone."""
  model_config, shape, pp = MODELS['resnet']
  workdir = save_checkpoint(tmp_path / 'run', model_config, shape, pp, ema=True)
  clf = imgcls.load(workdir)
  assert clf.weights == 'ema'
  hlo_meta = export.export_classifier(clf, 'stablehlo', str(tmp_path / 'm.stablehlo'))
  images = np.random.default_rng(1).integers(0, 256, (64, *shape), np.uint8)
  np.save(tmp_path / 'x.npy', images)
  code = ('import sys, jax, numpy as np; f = jax.export.deserialize(bytearray(open(sys.argv[1], '
          '"rb").read())); x = np.load(sys.argv[2]); np.savez(sys.argv[3], *[np.asarray('
          'f.call(x[:n])) for n in (1, 7, 64)]); '
          'assert not [m for m in sys.modules if m.startswith("imgcls")]')
  proc = subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'm.stablehlo'),
                           str(tmp_path / 'x.npy'), str(tmp_path / 'y.npz')], cwd=tmp_path,
                          stderr=subprocess.PIPE, text=True)
  onnx_meta = export.export_classifier(clf, 'onnx', str(tmp_path / 'm.onnx'))
  session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
  expected = clf.probabilities(images, batch_size=64)
  _, err = proc.communicate(timeout=180)
  assert proc.returncode == 0, err[-2000:]
  from_jax_alone = np.load(tmp_path / 'y.npz')
  for i, n in enumerate((1, 7, 64)):
    np.testing.assert_allclose(session.run(None, {'images': images[:n]})[0], expected[:n],
                               atol=1e-5, err_msg=f'onnx, batch {n}')
    np.testing.assert_allclose(from_jax_alone[f'arr_{i}'], expected[:n], atol=1e-5,
                               err_msg=f'stablehlo, batch {n}')
  for meta in (onnx_meta, hlo_meta):
    assert meta['weights'] == 'ema' and meta['verification']['max_abs_diff'] <= 1e-5


def test_export_errors(tmp_path):
  model_config, shape, pp = MODELS['resnet']
  workdir = save_checkpoint(tmp_path / 'run', model_config, shape, pp)
  with pytest.raises(export.ExportError, match='SavedModel.*not available'):
    export.export(workdir, 'savedmodel', str(tmp_path / 'sm'))
  with pytest.raises(export.ExportError, match='onnx, stablehlo'):
    export.export(workdir, 'tflite', str(tmp_path / 'x'))
  with pytest.raises(checkpoints.CheckpointError, match='keeps no EMA'):
    export.export(workdir, 'onnx', str(tmp_path / 'x.onnx'), weights='ema')



# jax2onnx 0.17 bugs worked around inside the ONNX call itself (export._jax2onnx_compat and
# export._without_transpose_pair_removal): they patch the exporter, not what the model traces.
EXPORTER_WORKAROUNDS = {'core.ClosedJaxpr', 'ir_optimizations._OPTIMIZER_PASSES'}


def test_no_monkeypatch_in_export_and_no_hardware_globals_in_models():
  """Export traces the models' defaults: it assigns no attribute of an imported module and
  flips no environment variable; the models read no hardware switch (environment, JAX's
  backend): their lowering is a field (imgcls.models.layers.Lowering)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parents[1] / 'imgcls'
  hardware = re.compile(r'os\.environ|getenv|jax\.default_backend|levers(_on)?\(')
  flip = re.compile(r'os\.environ\[.*\]\s*=[^=]|os\.environ\.(pop|update|setdefault)|putenv|'
                    r'levers(_on)?\(')
  for path in [root / 'export.py', *sorted((root / 'models').glob('*.py'))]:
    text = path.read_text()
    modules = set(re.findall(r'^\s*import [\w.]+ as (\w+)', text, re.M))
    modules |= {m.split('.')[0] for m in re.findall(r'^\s*import ([\w.]+)\s*(?:#.*)?$', text, re.M)}
    modules |= set(re.findall(r'^\s*from [\w.]+ import \w+ as (\w+)', text, re.M))
    modules |= set(re.findall(r'^\s*from [\w.]+ import (\w+)\s*(?:#.*)?$', text, re.M))
    patches = {m[1] for m in re.finditer(r'^\s*(\w+(?:\.\w+)+)\s*=[^=]', text, re.M)
               if m[1].split('.')[0] in modules} - EXPORTER_WORKAROUNDS
    assert not patches and 'setattr(' not in text, f'{path.name} patches a library: {patches}'
    env = flip if path.name == 'export.py' else hardware
    assert not env.search(text), f'{path.name}: {env.search(text)[0]!r}'
