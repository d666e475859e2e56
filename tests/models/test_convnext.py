"""ConvNeXt v1/v2 against timm: logits on random-init fixtures at two resolutions, parameter
counts of every registered size, export back bit for bit, the recipe's layer decay. The
fine-tunes from the CLI of every fixture: tests/models/test_fixture_finetunes.py."""

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import models
from imgcls.models import weights
from imgcls.models.registry import MODELS

from helpers import count_params, shapes

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'timm'
FIXTURE_NAMES = ('convnext', 'convnext_conv_mlp', 'convnextv2', 'convnextv2_conv_mlp')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# timm 1.0.31's parameter counts (scripts/timm_fixtures.py generate-convnext prints them).
TIMM_PARAMS = {
    'convnext_atto': 3_695_520,
    'convnext_femto': 5_217_784,
    'convnext_pico': 9_045_672,
    'convnext_nano': 15_593_560,
    'convnext_tiny': 28_589_128,
    'convnext_small': 50_223_688,
    'convnext_base': 88_591_464,
    'convnext_large': 197_767_336,
    'convnext_xlarge': 350_196_968,
    'convnext_xxlarge': 846_471_016,
    'convnextv2_atto': 3_708_400,
    'convnextv2_femto': 5_233_240,
    'convnextv2_pico': 9_066_280,
    'convnextv2_nano': 15_623_800,
    'convnextv2_tiny': 28_635_496,
    'convnextv2_small': 50_318_440,
    'convnextv2_base': 88_717_800,
    'convnextv2_large': 197_956_840,
    'convnextv2_huge': 660_289_640,
}


def _fixture(name):
  """(timm state dict, constructor kwargs, {size: logits}) of a fixture."""
  with np.load(FIXTURES / f'{name}.npz') as f:
    config = json.loads(str(f['config']))
    sd = {k[len('sd/'):]: f[k] for k in f.files if k.startswith('sd/')}
    logits = {int(k.split('_')[1]): f[k] for k in f.files if k.startswith('logits_')}
  return sd, config, logits


def _input(config, size):
  """The fixture's input (scripts/timm_fixtures.py convnext_input), checked by its hash."""
  u8 = np.random.default_rng(10).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  assert hashlib.sha256(u8.tobytes()).hexdigest() == config['input']['uint8_sha256']
  x = (u8.astype(np.float32) / np.float32(255) - np.float32(IMAGENET_MEAN)) / np.float32(
      IMAGENET_STD)
  return x[:, :size, :size]


def _model(config, name='convnext'):
  """imgcls's model for a fixture: the generic name, or a timm name with its dims overridden."""
  kw = config['kwargs']
  v2 = kw.get('use_grn', False)
  args = dict(depths=tuple(kw['depths']), dims=tuple(kw['dims']), num_classes=kw['num_classes'])
  if name == 'convnext':
    args.update(conv_mlp=kw['conv_mlp'], grn=v2, layer_scale_init=None if v2 else 1e-6)
  return models.get_model(name, **args)


def _load(model, sd, size=224):
  template, _ = shapes(model, (1, size, size, 3))
  template = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), template)
  return weights.load_pretrained(sd, template)


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_logits_equal_timm_at_two_resolutions(name):
  sd, config, expected = _fixture(name)
  model = _model(config)
  variables, report = _load(model, sd)
  assert report.fmt == 'timm_convnext'
  assert report.ok() and not (report.reshaped or report.reinitialised or report.ignored), report
  assert len(report.loaded) == len(sd)
  assert sorted(expected) == [160, 224]
  for size, logits in expected.items():
    got = jax.jit(model.apply)(variables, _input(config, size))
    np.testing.assert_allclose(np.asarray(got), logits, atol=1e-4, rtol=0)
  # Pre-logits features: the pooled, normalised vector the head reads (timm's pre_logits).
  got, feats = model.apply(variables, _input(config, 160), return_features=True)
  head = variables['params']['head']
  np.testing.assert_allclose(feats @ head['kernel'] + head['bias'], got, atol=1e-5)
  assert feats.shape == (2, config['kwargs']['dims'][-1])


@pytest.mark.parametrize('name,timm_name', [('convnext_conv_mlp', 'convnext_atto'),
                                            ('convnextv2_conv_mlp', 'convnextv2_atto'),
                                            ('convnext', 'convnext_tiny'),
                                            ('convnextv2', 'convnextv2_tiny')])
def test_timm_names_take_their_layout_and_version(name, timm_name):
  """A timm name with smaller dims loads the fixture of its MLP layout and version."""
  sd, config, expected = _fixture(name)
  model = _model(config, timm_name)
  variables, report = _load(model, sd, 160)
  assert report.ok() and not report.reshaped
  np.testing.assert_allclose(np.asarray(model.apply(variables, _input(config, 160))),
                             expected[160], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', FIXTURE_NAMES)
@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
def test_export_round_trips_bit_exactly(name, suffix, tmp_path):
  sd, config, _ = _fixture(name)
  variables, _ = _load(_model(config), sd)
  assert weights.export_format(variables) == 'timm_convnext'
  path = tmp_path / f'w{suffix}'
  assert weights.export(variables, path) == 'timm_convnext'
  back = weights.read_file(path)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # And read back from the file it wrote, the same variables.
  again, report = _load(_model(config), path)
  assert report.ok()
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_every_registered_size_has_timms_parameter_count():
  names = [n for n in MODELS.names(family='convnext') if not MODELS.info(n).get('generic')]
  assert sorted(names) == sorted(TIMM_PARAMS)
  for name in names:
    variables, logits = shapes(models.get_model(name), (1, 224, 224, 3))
    assert set(variables) == {'params'}
    assert count_params(variables['params']) == TIMM_PARAMS[name], name
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


def test_registry_info_carries_the_preprocessing():
  for name in MODELS.names(family='convnext'):
    info = MODELS.info(name)
    assert info['resolution'] == 224 and info['normalize'] == 'imagenet', name


def test_v1_has_layer_scale_and_v2_grn():
  params = shapes(models.get_model('convnext_atto'), (1, 64, 64, 3))[0]['params']
  block = params['stage3_block6']
  assert set(block) == {'conv_dw', 'norm', 'fc1', 'fc2', 'layer_scale'}
  assert block['conv_dw']['kernel'].shape == (7, 7, 1, 160)
  assert block['fc1']['kernel'].shape == (1, 1, 160, 640)  # conv_mlp: 1x1 conv, as timm
  params = shapes(models.get_model('convnextv2_tiny'), (1, 64, 64, 3))[0]['params']
  block = params['stage4_block3']
  assert set(block) == {'conv_dw', 'norm', 'fc1', 'grn', 'fc2'}
  assert block['fc1']['kernel'].shape == (768, 3072)
  assert set(block['grn']) == {'gamma', 'beta'}
  assert {'stem_conv', 'stem_norm', 'stage2_down_norm', 'stage2_down_conv', 'head_norm',
          'head'} <= set(params)


def test_stochastic_depth_and_bad_arguments():
  model = models.get_model('convnext', depths=(1, 2), dims=(8, 16), num_classes=3,
                           stoch_depth=0.5, layer_scale_init=1.0)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert a.shape == (4, 3) and not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  with pytest.raises(ValueError, match='variant'):
    shapes(models.get_model('convnext', variant='mega'), (1, 32, 32, 3))
  with pytest.raises(ValueError, match='explicit depths and dims'):
    shapes(models.get_model('convnext'), (1, 32, 32, 3))


def test_layer_decay_groups_of_the_recipe():
  """configs/finetune_convnext.py's lr multipliers follow the official 12 groups."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from imgcls import optim  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('f', ROOT / 'configs' / 'finetune_convnext.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('model=convnext_small')
  rules = optim.Rules(ml_collections.ConfigDict(config.optimizer))
  params = shapes(models.get_model('convnext_small'), (1, 32, 32, 3))[0]['params']
  rules.check(params)
  mults = rules.lr_mults(params)
  layer = lambda m: round(13 - np.log(m) / np.log(0.8))  # noqa: E731
  assert layer(mults['stem_conv']['kernel']) == 0
  assert layer(mults['stage1_block3']['fc1']['kernel']) == 1
  assert layer(mults['stage2_down_conv']['kernel']) == 2
  assert layer(mults['stage3_down_norm']['scale']) == 3
  assert layer(mults['stage3_block3']['fc1']['kernel']) == 3
  assert layer(mults['stage3_block4']['fc1']['kernel']) == 4
  assert layer(mults['stage3_block27']['fc1']['kernel']) == 11
  assert layer(mults['stage4_down_conv']['kernel']) == 12
  assert layer(mults['stage4_block1']['fc2']['bias']) == 12
  assert mults['head_norm']['scale'] == 1.0 and mults['head']['kernel'] == 1.0


def test_recipe_with_a_model_name_override_decays_every_block():
  """`--config.model.name=convnext_base` on the convnext_tiny recipe: all 27 third-stage blocks
  (not the 9 the recipe's default has) are decayed in their groups, as is every other block."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from imgcls import config as config_lib, optim  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('f', ROOT / 'configs' / 'finetune_convnext.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('model=convnext_tiny,classes=5')
  c.model.name = 'convnext_base'  # what the CLI override does
  c = config_lib.validate(c)
  params = shapes(models.from_config(c), (1, 32, 32, 3))[0]['params']
  rules = optim.Rules(c.optimizer)
  rules.check(params)
  mults = rules.lr_mults(params)
  blocks = {k: v for k, v in mults.items() if '_block' in k}
  assert len(blocks) == 3 + 3 + 27 + 3
  for name, block in blocks.items():
    stage, index = (int(x) for x in name[len('stage'):].split('_block'))
    layer = {1: 1, 2: 2, 3: 3 + (index - 1) // 3, 4: 12}[stage]
    for m in jax.tree.leaves(block):
      assert m == pytest.approx(0.8 ** (13 - layer)), name
  assert mults['head']['kernel'] == 1.0


def test_cpu_lowering_gives_the_same_logits():
  """from_config's CPU kernels (dense convs as matmuls) compute the same model."""
  from imgcls.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  sd, config, expected = _fixture('convnextv2_conv_mlp')
  variables, _ = _load(_model(config), sd)
  cpu_model = _model(config).clone(lowering=cpu_kernels.CPU)
  got = jax.jit(cpu_model.apply)(variables, _input(config, 160))
  np.testing.assert_allclose(np.asarray(got), expected[160], atol=1e-4, rtol=0)
