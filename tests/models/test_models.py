"""Tests for the model registry and ResNet (narrow widths and small inputs keep them fast)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imgcls import models, optim, parallel
from imgcls.models import resnet

from helpers import count_params, replicated_state, shapes, train_step_fn




@pytest.mark.parametrize('name,feat', [('resnet18', 64), ('resnet34', 64), ('resnet50', 256),
                                       ('resnet101', 256), ('resnet152', 256)])
def test_output_and_feature_shapes(name, feat):
  model = models.get_model(name, num_classes=10, width=8, bn_axis_name=None)
  _, (logits, features) = shapes(model, (2, 32, 32, 3), return_features=True)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert features.shape == (2, feat)


@pytest.mark.parametrize('name,count', [('resnet18', 11_689_512), ('resnet50', 25_557_032)])
def test_param_count_matches_torchvision(name, count):
  variables, _ = shapes(models.get_model(name), (1, 224, 224, 3))
  assert count_params(variables['params']) == count


def test_torchvision_like_names():
  variables, _ = shapes(models.get_model('resnet50', width=8), (1, 64, 64, 3))
  params = variables['params']
  assert {'conv_init', 'bn_init', 'head', 'stage4_block3'} <= set(params)
  assert set(params['stage2_block1']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                          'proj_conv', 'proj_bn'}
  assert params['stage2_block1']['conv2']['kernel'].shape == (3, 3, 16, 16)  # stride on the 3x3
  assert 'proj_conv' not in params['stage2_block2']


def test_forward_runs_and_zero_init_residual():
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  for zero_init in (True, False):
    model = models.get_model('resnet18', num_classes=10, width=8, bn_axis_name=None,
                             zero_init_residual=zero_init)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    last, first = (variables['params']['stage3_block2'][k]['scale'] for k in ('bn2', 'bn1'))
    assert np.all(last == (0 if zero_init else 1)) and np.all(first == 1)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
  assert set(updates) == {'batch_stats'}
  assert not np.allclose(updates['batch_stats']['bn_init']['var'], 1.0)


def test_conv_init_is_kaiming_fan_out():
  model = models.get_model('resnet18', width=64, bn_axis_name=None)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      jnp.zeros((1, 32, 32, 3)))
  kernel = variables['params']['stage4_block2']['conv1']['kernel']  # 3x3, 512 -> 512
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 512)), rtol=0.02)


@pytest.mark.parametrize('size,kernel,strides', [(2, 3, 1), (4, 3, 2), (1, 3, 1), (3, 1, 2),
                                                 (8, 3, 1), (9, 7, 2)])
def test_conv_matches_flax_conv_on_both_paths(size, kernel, strides):
  # Outputs <= 2x2 take the im2col path, larger ones lax.conv; both must equal nn.Conv.
  x = jax.random.normal(jax.random.key(0), (3, size, size, 5))
  conv = resnet.Conv(4, (kernel, kernel), (strides, strides))
  variables = conv.init(jax.random.key(1), x)
  ref = nn.Conv(4, (kernel, kernel), strides, padding=[(kernel // 2, kernel // 2)] * 2,
                use_bias=False)
  np.testing.assert_allclose(conv.apply(variables, x), ref.apply(variables, x), atol=1e-5)


@pytest.mark.parametrize('stem,size,stage1', [('small', 28, 28), ('small_s2', 28, 14),
                                                ('imagenet', 32, 8)])
def test_stem_resolution(stem, size, stage1):
  model = models.get_model('resnet18', num_classes=10, width=8, stem=stem, bn_axis_name=None)
  x = jnp.zeros((2, size, size, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  logits, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  assert logits.shape == (2, 10)
  assert state['intermediates']['stage1_block1']['__call__'][0].shape == (2, stage1, stage1, 8)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.get_model('resnet18', num_classes=10, width=8, dtype=jnp.bfloat16)
  variables, logits = shapes(model, (2, 32, 32, 3))
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32


def test_every_registered_model_takes_a_compute_dtype():
  assert all('dtype' in models.model_kwargs(name) for name in models.list_models())


@pytest.mark.parametrize('name,kw', [
    ('resnet18', dict(width=8)), ('bit', dict(stage_sizes=(1, 1), width=8, num_groups=4)),
    ('vit', dict(variant='Ti/16', depth=1))])
def test_each_family_computes_in_bfloat16_with_float32_params(name, kw):
  """dtype (the config's model.dtype, a string from the command line) is the compute dtype of
  every family's convolutions and matmuls; parameters stay float32. Traced, not compiled."""
  model = models.get_model(name, num_classes=10, dtype='bfloat16', **kw)
  variables, _ = shapes(model, (1, 32, 32, 3))
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(
      variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))
  lines = [l for l in jaxpr.splitlines() if 'conv_general_dilated' in l or 'dot_general' in l]
  heavy = [l for l in lines if 'conv_general_dilated' in l or 'dot_general' in l and
           '10]' not in l.split('=')[0]]  # all but the classifier head (float32 in the ViT)
  bf16 = [l for l in heavy if 'bf16[' in l.split('=')[0]]
  # Every conv and most matmuls (flax's attention keeps one product in float32).
  assert all('conv_general_dilated' not in l for l in set(heavy) - set(bf16)), heavy
  assert heavy and len(bf16) >= 0.75 * len(heavy), heavy


def test_batchnorm_over_mesh_matches_single_device():
  n = jax.device_count()
  x = jax.random.normal(jax.random.key(2), (4 * n, 16, 16, 3)) * 3.0 + 1.0
  x = x * jnp.arange(1, 4 * n + 1).reshape(-1, 1, 1, 1) / n  # shards differ in their statistics
  kw = dict(num_classes=5, width=8, stem='small')
  model = models.get_model('resnet18', **kw)
  variables = model.init(jax.random.key(0), x[:1], train=False)  # outside any mesh
  single = models.get_model('resnet18', bn_axis_name=None, **kw)
  want_logits, want = single.apply(variables, x, train=True, mutable=['batch_stats'])

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('batch',))
  step = jax.shard_map(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
      mesh=mesh, in_specs=(P(), P('batch')), out_specs=(P('batch'), P()))
  logits, got = jax.jit(step)(variables, x)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
  # The statistics did move (the comparison is not trivially between initial values).
  assert not np.allclose(got['batch_stats']['bn_init']['mean'], 0.0)


def test_registry_lists_and_builds():
  names = models.list_models()
  assert names == sorted(names)
  assert {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'} <= set(names)
  kwargs = models.model_kwargs('resnet50')
  assert {'num_classes', 'width', 'stem', 'dtype', 'bn_momentum', 'bn_epsilon', 'bn_axis_name',
          'zero_init_residual', 'remat'} == kwargs
  model = models.get_model('resnet34', num_classes=3)
  assert isinstance(model, nn.Module) and model.num_classes == 3


def test_registry_errors():
  with pytest.raises(ValueError, match=r"'resnet5'.*Did you mean .*resnet50.*Known models: .*resnet152"):
    models.get_model('resnet5')
  with pytest.raises(ValueError, match=r"'widht'.*valid: .*width"):
    models.get_model('resnet18', widht=32)
  with pytest.raises(ValueError, match='stage_sizes'):
    models.get_model('resnet18', stage_sizes=(1, 1, 1, 1))
  with pytest.raises(ValueError, match='already registered'):
    models.MODELS.register('resnet18', models.resnet.ResNet18)
  with pytest.raises(ValueError, match='stem'):
    shapes(models.get_model('resnet18', stem='cifar'), (1, 32, 32, 3))


def _gmacs(model, size=224) -> float:
  """Forward multiply-adds from XLA's cost analysis of the lowered program (flops / 2)."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops'] / 2e9


def test_resnet50_forward_flops_match_the_published_4_1_gmacs():
  # Measured 3.97 GMACs. XLA counts a multiply-add as two flops and skips the products with
  # zero padding, which the usual formula (torchvision's 4.09 for v1.5) includes: on the 7x7 maps
  # of stage 4 a padded 3x3 conv touches real pixels in only (17/21)^2 of its taps.
  gmacs = _gmacs(models.get_model('resnet50'))
  assert abs(gmacs - 4.1) < 0.05 * 4.1, gmacs


def test_from_config_reads_a_config_dict_or_its_json_metadata():
  import json
  import ml_collections
  config = ml_collections.ConfigDict({
      'model': {'name': 'bit', 'stage_sizes': (2, 1), 'width': 8, 'num_groups': 4},
      'dataset': {'num_classes': 3}})
  model = models.from_config(config)
  assert model.num_classes == 3 and model.stage_sizes == (2, 1) and model.width == 8
  # A checkpoint's metadata: the same config through JSON, where the tuple became a list.
  meta = json.loads(json.dumps(config.to_dict()))
  assert meta['model']['stage_sizes'] == [2, 1]
  assert models.from_config(meta) == model
  assert models.from_config(meta, width=16, num_classes=5).width == 16
  assert models.from_config(meta, num_classes=5).num_classes == 5
  with pytest.raises(ValueError, match=r"'widht'.*valid: .*width"):
    models.from_config(meta, widht=16)


@pytest.mark.parametrize('name,kw', [
    ('resnet18', dict(width=8, stem='small')),
    ('resnet50', dict(width=8, stem='small_s2')),
    ('resnet18', dict(width=8, stem='small', dtype='bfloat16')),
    ('bit', dict(stage_sizes=(1, 1), width=8, num_groups=4)),
    ('vit', dict(variant='Ti/4', depth=2, pool='tok', posemb='learn', dropout=0.1,
                 stoch_depth=0.1)),
    ('vit', dict(variant='Ti/4', depth=1, pool='gap', posemb='sincos2d',
                 approximate_gelu=False)),
    ('vit', dict(variant='Ti/4', depth=1, pool='map', approximate_gelu=False,
                 dtype='bfloat16')),
])
def test_every_family_trains_in_the_data_parallel_step(name, kw):
  """Two steps of the real train step (shard_map over 2 devices, check_vma on) lower the loss.
  A model op whose gradient shard_map rejects (exact GELU's lax.erf in JAX 0.12) fails here."""
  model = models.get_model(name, num_classes=4, **kw)
  c = ml_collections.ConfigDict(dict(
      optimizer=dict(name='sgd', momentum=0.9, nesterov=False),
      lr=dict(base=0.05, schedule='constant', warmup_steps=0, end_factor=0.0),
      weight_decay=0.0, weight_decay_mask='no_bias_norm', grad_clip_norm=1.0))
  tx, _ = optim.make_optimizer(c, total_steps=10)
  mesh = parallel.make_mesh(jax.devices()[:2])
  state = replicated_state(model, tx, mesh, (16, 16, 3))
  step = train_step_fn(mesh, model=model, tx=tx)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch(
      {'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
       'labels': np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)]}, mesh)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
