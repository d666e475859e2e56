"""DINOv2, SigLIP and CLIP backbones against timm: logits of random-init fixtures at two
resolutions (position embeddings resized on load and at run time as timm does), architecture and
parameter count of every registered timm name, export back bit for bit, big_vision's SigLIP .npz
(unscanned and scanned) and features for every pooling kind. The fine-tunes from the CLI of
every fixture: tests/models/test_fixture_finetunes.py."""

import hashlib
import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from imgcls import models, optim
from imgcls.models import posemb, vit, weights
from imgcls.models.registry import MODELS

from helpers import count_params, shapes

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'timm'
FIXTURE_NAMES = ('dinov2', 'dinov2_reg4', 'dinov2_swiglu', 'swiglu_gap', 'siglip', 'siglip_gap',
                 'clip', 'clip_quickgelu')
TABLE = json.loads((FIXTURES / 'vit_backbones_table.json').read_text())
ACTS = {'GELU': 'gelu', 'GELUTanh': 'gelu_tanh', 'QuickGELU': 'quick_gelu', 'SiLU': 'silu'}
MLPS = {'Mlp': 'mlp', 'GluMlpPacked': 'swiglu_packed', 'SwiGLU': 'swiglu'}
POOLS = {'token': 'tok', 'avg': 'gap', 'map': 'map'}
NORMALIZE = {'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
             'siglip': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
             'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
# A timm name of each fixture's family (the fixture's small dims override the name's).
TIMM_NAME = {'dinov2': 'vit_small_patch14_dinov2', 'dinov2_reg4': 'vit_small_patch14_reg4_dinov2',
             'dinov2_swiglu': 'vit_giant_patch14_dinov2', 'siglip': 'vit_base_patch16_siglip_224',
             'siglip_gap': 'vit_base_patch32_siglip_gap_256', 'clip': 'vit_base_patch16_clip_224',
             'clip_quickgelu': 'vit_base_patch16_clip_quickgelu_224'}


def _fixture(name):
  """(timm state dict, config, arrays: logits_<size>, posemb_<size>, logits_dynamic_<size>)."""
  file = FIXTURES / (f'vit_{name}.npz' if not name.startswith('vit_') else f'{name}.npz')
  with np.load(file) as f:
    config = json.loads(str(f['config']))
    sd = {k[len('sd/'):]: f[k] for k in f.files if k.startswith('sd/')}
    arrays = {k: f[k] for k in f.files if not k.startswith('sd/') and k != 'config'}
  return sd, config, arrays


def _input(config, size):
  """The fixture's input (scripts/timm_fixtures.py vit_input), checked by its hash."""
  u8 = np.random.default_rng(config['seed']).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
  assert hashlib.sha256(u8.tobytes()).hexdigest() == config['input']['uint8_sha256']
  mean, std = (np.float32(v) for v in NORMALIZE[config['normalize']])
  return ((u8.astype(np.float32) / np.float32(255) - mean) / std)[:, :size, :size]


def _options(arch):
  """imgcls ViT arguments reproducing a timm architecture (the fixture config's 'arch')."""
  return dict(width=arch['embed_dim'], depth=arch['depth'], num_heads=arch['num_heads'],
              mlp_dim=arch['mlp_hidden'], patch_size=arch['patch_size'],
              class_token=arch['class_token'], reg_tokens=arch['reg_tokens'],
              no_embed_class=arch['no_embed_class'], pre_norm=arch['pre_norm'],
              init_values=1e-5 if arch['layer_scale'] else None, act=ACTS[arch['act']],
              mlp_type=MLPS[arch['mlp_layer']], pool=POOLS[arch['global_pool']],
              fc_norm=arch['fc_norm'], qkv_bias=arch['qkv_bias'], patch_bias=arch['patch_bias'],
              norm_eps=arch['norm_eps'])


def _model(config, name='vit', **kw):
  if name == 'vit':
    return models.get_model('vit', num_classes=7, **_options(config['arch']), **kw)
  a = config['arch']
  return models.get_model(name, num_classes=7, width=a['embed_dim'], depth=a['depth'],
                          num_heads=a['num_heads'], mlp_dim=a['mlp_hidden'],
                          patch_size=a['patch_size'], **kw)


def _template(model, size):
  template, _ = shapes(model, (1, size, size, 3))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), template)


def _load(model, sd, size, **kw):
  return weights.load_pretrained(sd, _template(model, size), posemb_resize='source', **kw)


def _clean(report):
  """Every parameter loaded, every array used; fused qkv/kv split and reshaped to heads."""
  assert report.ok() and not (report.reinitialised or report.ignored or report.mismatched), report
  assert all('Attention' in r for r in report.reshaped), report.reshaped


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_logits_equal_timm_at_two_resolutions(name):
  sd, config, arrays = _fixture(name)
  model = _model(config)
  default, other = config['sizes']
  for size in (default, other):
    variables, report = _load(model, sd, size)
    assert report.fmt == 'timm_vit'
    _clean(report)
    if size == default:
      assert not report.resized
    else:  # timm's resample_abs_pos_embed: antialiased bicubic, align_corners=False
      assert report.resized and '(bicubic_timm)' in report.resized[0]
      np.testing.assert_allclose(
          variables['params']['Transformer']['posembed_input']['pos_embedding'],
          arrays[f'posemb_{size}'], atol=1e-6, rtol=0)
    got = jax.jit(model.apply)(variables, _input(config, size))
    np.testing.assert_allclose(np.asarray(got), arrays[f'logits_{size}'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', [n for n in FIXTURE_NAMES if _fixture(n)[1].get('dynamic')])
def test_dynamic_img_size_resizes_at_run_time_as_timm(name):
  """Built for the default size, run at the other (timm's dynamic_img_size=True, DINOv2)."""
  sd, config, arrays = _fixture(name)
  default, other = config['sizes']
  model = _model(config, img_size=default, dynamic_img_size=True)
  variables, report = _load(model, sd, default)
  assert report.ok() and not report.resized
  got = jax.jit(model.apply)(variables, _input(config, other))
  np.testing.assert_allclose(np.asarray(got), arrays[f'logits_dynamic_{other}'], atol=1e-4,
                             rtol=0)
  with pytest.raises(ValueError, match='dynamic_img_size=True'):
    _model(config, img_size=default).apply(variables, _input(config, other))


@pytest.mark.parametrize('name', sorted(TIMM_NAME))
def test_timm_names_load_their_fixture(name):
  sd, config, arrays = _fixture(name)
  model = _model(config, TIMM_NAME[name])
  size = config['sizes'][0]
  variables, report = _load(model, sd, size)
  assert report.ok() and not report.reinitialised
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, _input(config, size))),
                             arrays[f'logits_{size}'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_features_are_the_pooled_pre_logits(name):
  """return_features gives what the head reads, for tok, gap (with and without fc_norm) and map."""
  sd, config, _ = _fixture(name)
  model = _model(config)
  size = config['sizes'][0]
  variables, _ = _load(model, sd, size)
  logits, feats = model.apply(variables, _input(config, size), return_features=True)
  head = variables['params']['head']
  assert feats.shape == (2, config['arch']['embed_dim'])
  np.testing.assert_allclose(feats @ head['kernel'] + head['bias'], logits, atol=1e-5)
  np.testing.assert_allclose(weights.features(model, variables, _input(config, size)), feats,
                             atol=1e-6)


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_export_round_trips_bit_exactly(name, tmp_path):
  sd, config, _ = _fixture(name)
  variables, _ = _load(_model(config), sd, config['sizes'][0])
  path = tmp_path / 'w.safetensors'
  assert weights.export(variables, path, 'timm_vit') == 'timm_vit'
  back = weights.read_file(path)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_a_backbone_without_head_keeps_the_fresh_head():
  sd, config, arrays = _fixture('dinov2_reg4')
  headless = {k: v for k, v in sd.items() if not k.startswith('head.')}
  model = _model(config)
  variables, report = _load(model, headless, config['sizes'][0])
  assert report.ok() and sorted(r.split(':')[0] for r in report.reinitialised) == [
      'params/head/bias', 'params/head/kernel']
  full, _ = _load(model, sd, config['sizes'][0])
  x = _input(config, config['sizes'][0])
  np.testing.assert_allclose(weights.features(model, variables, x),
                             weights.features(model, full, x), atol=1e-6)


def _big_vision(sd, num_heads, scanned):
  """The SigLIP fixture's timm weights in big_vision's two-tower .npz layout, mapped by hand:
  params/img/{embedding, pos_embedding, Transformer/encoderblock_i (or one scanned
  encoderblock), MAPHead_0, head}, plus a text tower and SigLIP's t and b."""
  lin = lambda w: np.ascontiguousarray(w.T)  # noqa: E731
  width = sd['patch_embed.proj.weight'].shape[0]
  hd = width // num_heads

  def attn(prefix, q, k, v, proj_w, proj_b, biases):
    out = {}
    for n, w, b in zip(('query', 'key', 'value'), (q, k, v), biases):
      out[f'{prefix}/{n}/kernel'] = lin(w).reshape(width, num_heads, hd)
      out[f'{prefix}/{n}/bias'] = b.reshape(num_heads, hd)
    out[f'{prefix}/out/kernel'] = lin(proj_w).reshape(num_heads, hd, width)
    out[f'{prefix}/out/bias'] = proj_b
    return out

  img = {'embedding/kernel': np.transpose(sd['patch_embed.proj.weight'], (2, 3, 1, 0)),
         'embedding/bias': sd['patch_embed.proj.bias'], 'pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': sd['norm.weight'],
         'Transformer/encoder_norm/bias': sd['norm.bias'],
         'head/kernel': lin(sd['head.weight']), 'head/bias': sd['head.bias'],
         'MAPHead_0/probe': sd['attn_pool.latent'],
         'MAPHead_0/LayerNorm_0/scale': sd['attn_pool.norm.weight'],
         'MAPHead_0/LayerNorm_0/bias': sd['attn_pool.norm.bias']}
  for j in (1, 2):
    img[f'MAPHead_0/MlpBlock_0/Dense_{j - 1}/kernel'] = lin(sd[f'attn_pool.mlp.fc{j}.weight'])
    img[f'MAPHead_0/MlpBlock_0/Dense_{j - 1}/bias'] = sd[f'attn_pool.mlp.fc{j}.bias']
  k, v = np.split(sd['attn_pool.kv.weight'], 2)
  kb, vb = np.split(sd['attn_pool.kv.bias'], 2)
  img.update(attn('MAPHead_0/MultiHeadDotProductAttention_0', sd['attn_pool.q.weight'], k, v,
                  sd['attn_pool.proj.weight'], sd['attn_pool.proj.bias'],
                  (sd['attn_pool.q.bias'], kb, vb)))
  blocks = []
  depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
  for i in range(depth):
    t = f'blocks.{i}.'
    q, k, v = np.split(sd[t + 'attn.qkv.weight'], 3)
    block = attn('MultiHeadDotProductAttention_0', q, k, v, sd[t + 'attn.proj.weight'],
                 sd[t + 'attn.proj.bias'], np.split(sd[t + 'attn.qkv.bias'], 3))
    block.update({'LayerNorm_0/scale': sd[t + 'norm1.weight'],
                  'LayerNorm_0/bias': sd[t + 'norm1.bias'],
                  'LayerNorm_1/scale': sd[t + 'norm2.weight'],
                  'LayerNorm_1/bias': sd[t + 'norm2.bias']})
    for j in (1, 2):
      block[f'MlpBlock_0/Dense_{j - 1}/kernel'] = lin(sd[t + f'mlp.fc{j}.weight'])
      block[f'MlpBlock_0/Dense_{j - 1}/bias'] = sd[t + f'mlp.fc{j}.bias']
    blocks.append(block)
  if scanned:
    for key in blocks[0]:
      img[f'Transformer/encoderblock/{key}'] = np.stack([b[key] for b in blocks])
  else:
    for i, block in enumerate(blocks):
      img.update({f'Transformer/encoderblock_{i}/{k}': v for k, v in block.items()})
  rng = np.random.default_rng(0)
  return {**{f'params/img/{k}': v for k, v in img.items()},
          'params/txt/Embed_0/embedding': rng.normal(size=(11, width)).astype(np.float32),
          'params/txt/head/kernel': rng.normal(size=(width, 5)).astype(np.float32),
          'params/t': np.ones((1,), np.float32), 'params/b': np.zeros((1,), np.float32)}


@pytest.mark.parametrize('scanned', [False, True])
def test_big_vision_siglip_npz(scanned, tmp_path):
  sd, config, arrays = _fixture('siglip')
  model = _model(config)
  npz = tmp_path / 'siglip.npz'
  np.savez(npz, **_big_vision(sd, config['arch']['num_heads'], scanned))
  default, other = config['sizes']
  for source in (f'{npz}:img', npz):  # big_vision's load_params selection, or found
    variables, report = weights.load_pretrained(source, _template(model, default))
    assert report.fmt == 'vit_npz' and report.ok() and not report.reinitialised, report
    got = jax.jit(model.apply)(variables, _input(config, default))
    np.testing.assert_allclose(np.asarray(got), arrays[f'logits_{default}'], atol=1e-4, rtol=0)
  # Resized on load as big_vision does (scipy.ndimage.zoom, order=1), here 6x6 -> 4x4.
  variables, report = weights.load_pretrained(f'{npz}:img', _template(model, other),
                                              posemb_resize='source')
  assert report.resized == [f'{weights.POSEMB_KEY}: 36 -> 16 tokens (zoom_linear)']
  grid = sd['pos_embed'][0].reshape(6, 6, -1)
  ramp = np.linspace(0, 5, 4)  # zoom's corner-aligned sample points
  lo, t = np.minimum(ramp.astype(int), 4), ramp - np.minimum(ramp.astype(int), 4)
  rows = grid[lo] * (1 - t)[:, None, None] + grid[lo + 1] * t[:, None, None]
  want = rows[:, lo] * (1 - t)[None, :, None] + rows[:, lo + 1] * t[None, :, None]
  np.testing.assert_allclose(
      variables['params']['Transformer']['posembed_input']['pos_embedding'][0],
      want.reshape(16, -1), atol=1e-6)
  with pytest.raises(weights.WeightsError, match='no subtree'):
    weights.load_pretrained(f'{npz}:image', _template(model, default))


def test_resample_weights_match_scipy_zoom_and_keep_constants():
  scipy_ndimage = pytest.importorskip('scipy.ndimage')
  grid = np.random.default_rng(0).normal(size=(5, 7, 3))
  got = posemb.resample_grid(grid, (8, 4), 'zoom_linear')
  want = scipy_ndimage.zoom(grid, (8 / 5, 4 / 7, 1), order=1)
  np.testing.assert_allclose(got, want, atol=1e-12)
  for method in ('bicubic_timm', 'bicubic_torch', 'zoom_linear'):
    for old, new in ((4, 6), (6, 4), (37, 16), (16, 37)):
      np.testing.assert_allclose(posemb.resample_weights(old, new, method).sum(1), 1.0, atol=1e-12)


def test_registered_timm_names_have_timms_architecture_and_parameter_count():
  """Every timm name registered here is in the table timm printed, with the same options and
  parameter count (jax.eval_shape, at the name's resolution, 1000 classes)."""
  timm_names = sorted(vit.TIMM_NAMES)
  assert timm_names == sorted(n for n in TABLE['models'] if n.endswith(
      ('dinov2',)) or '_siglip_' in n or '_clip_' in n)
  counted = {}
  for name in timm_names:
    arch = TABLE['models'][name]
    info = MODELS.info(name)
    assert info['family'] == 'vit' and info['resolution'] == arch['img_size'], name
    assert info['normalize'] == ('imagenet' if 'dinov2' in name else 'siglip' if 'siglip' in name
                                 else 'clip')
    model = models.get_model(name)
    want = _options(arch)
    dims = model.dims()
    for key in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size'):
      assert dims[key] == want.pop(key), (name, key)
    assert model.has_class_token() == want.pop('class_token'), name
    assert (model.init_values is not None) == (want.pop('init_values') is not None), name
    assert model.act == want.pop('act'), name
    for key, value in want.items():
      assert getattr(model, key) == value, (name, key)
    # One abstract init per architecture; its other resolutions differ by the position grid.
    key = tuple(sorted((k, v) for k, v in vit.TIMM_NAMES[name][0].items()
                       if k != 'strict_img_size'))
    size = info['resolution']
    grid = (size // dims['patch_size']) ** 2
    if key not in counted:
      x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
      counted[key] = (count_params(jax.eval_shape(
          lambda x, m=model: m.init(jax.random.key(0), x), x)), grid)
    count, first_grid = counted[key]
    assert count + (grid - first_grid) * dims['width'] == arch['params'], name


@pytest.mark.parametrize('name', sorted(TABLE['imgcls_paper_sizes']))
def test_paper_sizes_have_the_references_parameter_count(name):
  reference = TABLE['models'][TABLE['imgcls_paper_sizes'][name]]
  model = models.get_model(name)
  variables, logits = shapes(model, (1, 224, 224, 3))
  assert count_params(variables) == reference['params']
  assert logits.shape == (1, 1000)
  assert model.dims()['patch_size'] == reference['patch_size']
  assert MODELS.info(name)['resolution'] == 224


def test_layer_decay_with_register_tokens_and_pre_norm():
  """timm's 'stem' group (patch, position, class and register tokens, norm_pre) is layer 0."""
  model = models.get_model('vit', width=24, depth=3, num_heads=2, mlp_dim=48, patch_size=4,
                           reg_tokens=4, no_embed_class=True, pre_norm=True, init_values=1e-5,
                           num_classes=3)
  params = shapes(model, (1, 16, 16, 3))[0]['params']
  rules = optim.Rules(ml_collections.ConfigDict({'name': 'adamw', 'layer_decay': 0.5}))
  rules.check(params)
  mults = rules.lr_mults(params)
  assert mults['reg'] == mults['cls'] == mults['embedding']['kernel'] == 0.5 ** 4
  assert mults['Transformer']['norm_pre']['scale'] == 0.5 ** 4
  assert mults['Transformer']['posembed_input']['pos_embedding'] == 0.5 ** 4
  assert mults['Transformer']['encoderblock_0']['layer_scale_1'] == 0.5 ** 3
  assert mults['Transformer']['encoder_norm']['scale'] == 1.0 and mults['head']['bias'] == 1.0


@pytest.mark.skipif(not os.environ.get('IMGCLS_TIMM_PYTHON'), reason=(
    'LIVE TIMM CHECK NOT RUN: set IMGCLS_TIMM_PYTHON to a Python with timm installed; the '
    'committed fixtures are checked regardless.'))
def test_live_fixtures_from_installed_timm(tmp_path):
  """The installed timm writes the same fixtures and table (seeded draws, same versions)."""
  subprocess.run([os.environ['IMGCLS_TIMM_PYTHON'], str(ROOT / 'scripts' / 'timm_fixtures.py'),
                  'generate-vit-backbones', f'--out_dir={tmp_path}'], check=True,
                 capture_output=True)
  assert json.loads((tmp_path / 'vit_backbones_table.json').read_text()) == TABLE
  for name in FIXTURE_NAMES:
    with np.load(tmp_path / f'vit_{name}.npz') as f:
      fresh = {k: f[k] for k in f.files if k != 'config'}
    sd, _, arrays = _fixture(name)
    committed = {**{f'sd/{k}': v for k, v in sd.items()}, **arrays}
    assert sorted(fresh) == sorted(committed), name
    for key, value in committed.items():
      np.testing.assert_allclose(fresh[key], value, atol=1e-5, rtol=0, err_msg=f'{name} {key}')


def _recipe(arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'r', ROOT / 'configs' / 'finetune_vit_backbones.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_recipe_fine_tunes_with_layer_decay_and_probes_linearly():
  from imgcls import config as config_lib  # pylint: disable=g-import-not-at-top
  params = shapes(models.get_model('vit_small_patch14_reg4_dinov2', num_classes=5, depth=2),
                  (1, 28, 28, 3))[0]['params']
  c = config_lib.validate(_recipe('model=vit_small_patch14_reg4_dinov2,classes=5'))
  assert 'normalize_preset("imagenet")' in c.pp_train and 'inception_crop(518)' in c.pp_train
  assert c.model_load.posemb_resize == 'source' and c.optimizer.layer_decay == 0.75
  mults = optim.Rules(c.optimizer).lr_mults(params)
  assert mults['reg'] == 0.75 ** 3 and mults['head']['kernel'] == 1.0
  c = config_lib.validate(_recipe('model=vit_base_patch16_siglip_224,classes=5,mode=linear'))
  assert 'normalize_preset("siglip")' in c.pp_eval and 'central_crop(224)' in c.pp_eval
  rules = optim.Rules(c.optimizer)
  labels = jax.tree_util.tree_leaves_with_path(rules.labels(params))
  assert {jax.tree_util.keystr(p).startswith("['head']") for p, l in labels if l == 'train'} == {
      True}
  assert c.optimizer.name == 'sgd' and c.optimizer.layer_decay == 0.0
  with pytest.raises(config_lib.ConfigError, match='timm DINOv2'):
    _recipe('model=vit_b16,classes=5')
