"""Reading, writing and merging pretrained weights (imgcls.models.weights), without torch."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import models
from imgcls.models import weights

TINY_VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)


def _vit(num_classes=5, **kw):
  return models.get_model('vit', num_classes=num_classes, **{**TINY_VIT, **kw})


def _init(model, size=32):
  """Zeros in the shapes of the model's variables. Abstract evaluation compiles nothing (a
  jitted init takes seconds per model on 2 cores); _randomise draws values where they matter,
  and a zero template also has the zero head a fresh init has."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)


def _randomise(variables, seed=1):
  """Every leaf random (the zero head and cls would hide mistakes in the key maps).

  numpy draws them: jax.random per leaf shape compiles for most of a minute on 2 cores."""
  rng = np.random.default_rng(seed)
  paths, tree = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for path, x in paths:
    noise = 0.5 * rng.standard_normal(x.shape).astype(x.dtype)
    is_var = jax.tree_util.keystr(path).endswith("['var']")
    out.append(1.0 + np.abs(noise) if is_var else noise)  # BatchNorm variances stay positive
  return jax.tree.unflatten(tree, out)


def _logits(model, variables, size=32):
  out = np.asarray(jax.jit(model.apply)(variables, _images(size)))
  assert np.all(np.isfinite(out)) and np.std(out) > 0
  return out


def _images(size=32, n=2):
  return jax.random.normal(jax.random.key(7), (n, size, size, 3))


@pytest.mark.parametrize('pool', ['tok', 'map'])  # 'gap': in test_parity
def test_vit_npz_round_trip_gives_the_same_logits(tmp_path, pool):
  model = _vit(pool=pool, representation_size=16)
  variables = _randomise(_init(model))
  path = tmp_path / 'vit.npz'
  weights.export(variables, path, 'vit_npz')
  keys = set(np.load(path).files)
  assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel' in keys
  assert 'pre_logits/kernel' in keys
  loaded, report = weights.load_pretrained(path, _init(model))
  assert report.ok() and not report.reshaped and report.fmt == 'vit_npz'
  np.testing.assert_array_equal(_logits(model, loaded), _logits(model, variables))


def _as_big_vision(flat, scan):
  """The vision_transformer-named flat dict renamed (and optionally scanned) as big_vision."""
  out = {}
  stacked = {}
  for key, value in flat.items():
    key = key.replace('Transformer/posembed_input/pos_embedding', 'pos_embedding')
    key = re.sub(r'MultiHeadDotProductAttention_1', 'MultiHeadDotProductAttention_0', key)
    key = re.sub(r'(encoderblock_\d+)/LayerNorm_2', r'\1/LayerNorm_1', key)
    key = re.sub(r'MlpBlock_3', 'MlpBlock_0', key)
    m = re.fullmatch(r'Transformer/encoderblock_(\d+)/(.*)', key)
    if scan and m:
      stacked.setdefault(m[2], {})[int(m[1])] = value
    else:
      out['params/' + key] = value
  for rest, blocks in stacked.items():
    out[f'params/Transformer/encoderblock/{rest}'] = np.stack([blocks[i]
                                                               for i in sorted(blocks)])
  return out


@pytest.mark.parametrize('scan', [False, True])
def test_big_vision_names_prefix_and_scan_are_read(scan):
  model = _vit(pool='map')
  variables = _randomise(_init(model))
  bv = _as_big_vision(weights.from_imgcls(variables, 'vit_npz'), scan)
  assert weights.detect_format(bv) == 'vit_npz'
  loaded, report = weights.load_pretrained(bv, _init(model))
  assert report.ok()
  np.testing.assert_array_equal(_logits(model, loaded), _logits(model, variables))


def test_new_class_count_and_resolution_reinit_head_and_resize_posemb(tmp_path):
  src_model = _vit(num_classes=5)
  src = _randomise(_init(src_model))
  path = tmp_path / 'src.npz'
  weights.export(src, path)
  dst_model = _vit(num_classes=3)
  template = _init(dst_model, size=48)  # 4x4 -> 6x6 patches
  loaded, report = weights.load_pretrained(path, template)
  assert sorted(r.split(':')[0] for r in report.reinitialised) == ['params/head/bias',
                                                                  'params/head/kernel']
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], np.zeros((32, 3)))
  assert report.resized == [f'{weights.POSEMB_KEY}: 17 -> 37 tokens (bilinear)']
  pe = loaded['params']['Transformer']['posembed_input']['pos_embedding']
  old = src['params']['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(pe[:, 0], old[:, 0])  # the class token's embedding is kept
  # Bilinear resize keeps a linear ramp linear: check the method on a ramp grid.
  ramp = np.arange(16, dtype=np.float32).reshape(1, 16, 1) * np.ones((1, 1, 4), np.float32)
  resized = weights.resize_posemb(ramp, 0, (8, 8))
  assert resized.shape == (1, 64, 4)
  assert np.isclose(resized.min(), ramp.min(), atol=1.6) and resized.max() <= ramp.max() + 1e-5
  bicubic = weights.resize_posemb(ramp, 0, (8, 8), 'bicubic')
  assert not np.allclose(bicubic, resized)
  out = jax.jit(dst_model.apply)(loaded, _images(48))
  assert out.shape == (2, 3) and np.all(out == 0)  # zero head: logits start at zero
  s = str(report)
  assert 'reinitialised (2)' in s and 'resized (1)' in s


def test_strict_errors_name_the_keys_and_the_fix(tmp_path):
  src = _randomise(_init(_vit(representation_size=16)))
  path = tmp_path / 'src.npz'
  weights.export(src, path)
  template = _init(_vit())
  with pytest.raises(weights.WeightsError, match=r'(?s)unused \(2\).*pre_logits/bias.*strict'
                     r'=False'):
    weights.load_pretrained(path, template)
  # Without pre-logits the head sees another width: it does not fit, unless it is skipped too.
  with pytest.raises(weights.WeightsError, match=r'(?s)mismatched \(1\).*head/kernel'):
    weights.load_pretrained(path, template, ignore=['pre_logits/'])
  loaded, report = weights.load_pretrained(path, template, ignore=['pre_logits/', 'head/'])
  assert report.ok() and len(report.ignored) == 4 and not report.missing
  wider = _init(_vit(width=48, num_heads=2))
  with pytest.raises(weights.WeightsError, match=r'mismatched'):
    weights.load_pretrained(path, wider, ignore=['pre_logits'])
  deeper = _init(_vit(depth=3))
  skip = ['pre_logits', 'head']
  with pytest.raises(weights.WeightsError, match=r'(?s)missing .*encoderblock_2'):
    weights.load_pretrained(path, deeper, ignore=skip)
  loose, report = weights.load_pretrained(path, deeper, ignore=skip, strict=False)
  assert report.missing and all('encoderblock_2' in k for k in report.missing)
  np.testing.assert_array_equal(
      loose['params']['Transformer']['encoderblock_2']['LayerNorm_0']['scale'],
      deeper['params']['Transformer']['encoderblock_2']['LayerNorm_0']['scale'])


def test_timm_vit_round_trip_reshapes_fused_attention():
  model = _vit(pool='tok')
  variables = _randomise(_init(model))
  sd = weights.from_imgcls(variables, 'timm_vit')
  assert sd['blocks.0.attn.qkv.weight'].shape == (96, 32)
  assert weights.detect_format(sd) == 'timm_vit'
  loaded, report = weights.load_pretrained(sd, _init(model))
  assert report.ok() and any('query/kernel' in r for r in report.reshaped)
  np.testing.assert_array_equal(_logits(model, loaded), _logits(model, variables))
  again = weights.from_imgcls(loaded, 'timm_vit')
  assert set(again) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(again[k], sd[k])


def test_timm_resnet_round_trip_includes_batch_stats():
  model = models.get_model('resnet10', num_classes=4, width=8)
  variables = _randomise(_init(model))
  sd = weights.from_imgcls(variables, 'timm_resnet')
  assert sd['conv1.weight'].shape == (8, 3, 7, 7)
  assert sd['layer2.0.downsample.0.weight'].shape == (16, 8, 1, 1)
  assert {'bn1.running_mean', 'bn1.running_var', 'fc.weight'} <= set(sd)
  sd['bn1.num_batches_tracked'] = np.array(7)
  loaded, report = weights.load_pretrained(sd, _init(model))
  assert report.ok() and report.fmt == 'timm_resnet'
  np.testing.assert_array_equal(_logits(model, loaded), _logits(model, variables))


def test_files_read_npz_and_safetensors_and_bad_files_fail_clearly(tmp_path):
  from safetensors.numpy import save_file
  arrays = {'a.weight': np.ones((2, 3), np.float32)}
  save_file(arrays, str(tmp_path / 'w.safetensors'))
  np.testing.assert_array_equal(weights.read_file(tmp_path / 'w.safetensors')['a.weight'],
                                arrays['a.weight'])
  weights.write_npz(tmp_path / 'w.npz', arrays)
  assert list(weights.read_file(tmp_path / 'w.npz')) == ['a.weight']
  assert not list(tmp_path.glob('.*tmp'))
  with pytest.raises(weights.WeightsError, match='No such weights file'):
    weights.read_file(tmp_path / 'nope.npz')
  (tmp_path / 'w.ckpt').write_bytes(b'x')
  with pytest.raises(weights.WeightsError, match=r'expected \.npz'):
    weights.read_file(tmp_path / 'w.ckpt')
  with pytest.raises(weights.WeightsError, match='Cannot tell the format'):
    weights.detect_format(arrays)
  with pytest.raises(weights.WeightsError, match='Unknown weights format'):
    weights.to_imgcls(arrays, 'onnx')


def test_reset_head_and_features_for_every_family():
  features = jax.jit(weights.features, static_argnums=0)  # one trace per model, not per call
  for name, kw in (('vit', TINY_VIT), ('resnet10', {'width': 8})):
    model = models.get_model(name, num_classes=5, **kw)
    variables = _randomise(_init(model))
    new = models.get_model(name, num_classes=11, **kw)
    feats = features(model, variables, _images())
    assert feats.shape[0] == 2 and feats.dtype == jnp.float32
    fresh = weights.reset_head(variables, 11)
    logits = jax.jit(new.apply)(fresh, _images())
    assert logits.shape == (2, 11) and np.all(logits == 0)
    np.testing.assert_array_equal(features(new, fresh, _images()), feats)


def _assert_same(a, b):
  fa, fb = weights.flatten(a), weights.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_export_writes_each_familys_official_format_and_refuses_unknown_structures(tmp_path):
  bit_model = models.get_model('bit', num_classes=3, stage_sizes=(1, 1), width=8, num_groups=4)
  variables = _randomise(_init(bit_model))
  # With no fmt BiT variables used to come out in ViT-style names no BiT loader reads.
  assert weights.export(variables, tmp_path / 'bit.npz') == 'bit_npz'
  assert 'resnet/root_block/standardized_conv2d/kernel' in np.load(tmp_path / 'bit.npz').files
  loaded, report = weights.load_pretrained(tmp_path / 'bit.npz', _init(bit_model))
  assert report.ok() and report.fmt == 'bit_npz'
  _assert_same(loaded, variables)

  resnet = models.get_model('resnet10', num_classes=4, width=8)
  variables = _randomise(_init(resnet))
  assert weights.export(variables, tmp_path / 'r.safetensors') == 'timm_resnet'
  assert 'layer1.0.bn1.running_var' in weights.read_file(tmp_path / 'r.safetensors')
  loaded, report = weights.load_pretrained(tmp_path / 'r.safetensors', _init(resnet))
  assert report.ok() and report.fmt == 'timm_resnet'
  _assert_same(loaded, variables)
  assert weights.export(variables, tmp_path / 'r.npz', 'timm_resnet') == 'timm_resnet'  # explicit

  with pytest.raises(weights.WeightsError, match=r'(?s)model family.*fmt=.*bit_npz \(bit\)'):
    weights.export({'params': {'dense': {'kernel': np.ones((2, 2))}}}, tmp_path / 'x.npz')
  with pytest.raises(weights.WeightsError, match=r'write \.npz or \.safetensors'):
    weights.export(variables, tmp_path / 'r.pth')
  assert not list(tmp_path.glob('x.npz'))


def test_formats_come_from_the_families_converters():
  assert set(weights.FORMATS) == {'vit_npz', 'bit_npz', 'timm_vit', 'timm_resnet', 'timm_bit',
                                  'timm_convnext'}
  assert {n: weights.CONVERTERS.info(n)['family'] for n in weights.CONVERTERS.names(
      official=True)} == {'vit_npz': 'vit', 'bit_npz': 'bit', 'timm_resnet': 'resnet',
                          'timm_convnext': 'convnext'}


def test_converters_load_when_weights_are_read_not_when_a_model_is_built():
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  code = (
      'import sys\n'
      'from imgcls import models\n'
      'from imgcls.models import convert, weights\n'
      "loaded = lambda: [m for m in convert.CONVERTER_MODULES if f'imgcls.models.{m}' in "
      'sys.modules]\n'
      "models.get_model('resnet10', num_classes=4, width=8)\n"
      'print(loaded())\n'
      'weights.FORMATS\n'
      'print(loaded())\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  built, read = out.stdout.strip().splitlines()[-2:]
  assert built == '[]'
  assert read == "['bit_weights', 'convnext_weights', 'resnet_weights', 'vit_weights']"


def test_imgcls_variables_load_as_a_mapping_and_directories_are_refused(tmp_path):
  model = models.get_model('resnet10', num_classes=4, width=8)
  variables = _randomise(_init(model))
  loaded, report = weights.load_pretrained(variables, _init(model))  # nested, as restored
  assert report.ok() and report.fmt == weights.IMGCLS
  _assert_same(loaded, variables)
  loaded, report = weights.load_pretrained(weights.flatten(variables), _init(model))
  assert report.ok() and report.fmt == weights.IMGCLS
  with pytest.raises(weights.WeightsError, match=r'(?s)directory.*imgcls\.checkpoints.*mapping'):
    weights.load_pretrained(tmp_path, _init(model))
