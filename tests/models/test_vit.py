"""Tests for the Vision Transformer: sizes by abstract evaluation, behaviour on tiny models."""

import functools
import importlib.util
import pathlib

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgcls import config as config_lib, models, parallel
from imgcls.models import layers, posemb as posemb_lib, vit, vit_layers
from imgcls.step import softmax_xent

from helpers import count_params, shapes

CONFIG = pathlib.Path(__file__).parents[2] / 'configs' / 'fashion_mnist_vit.py'

# Small-image model used where the forward pass really runs: Ti/4 cut to two blocks.
TINY = dict(num_classes=10, variant='Ti/4', depth=2)




def _init(model, x):
  return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


def _random_variables(model, x_shape, seed=0):
  """Variables drawn by numpy in the init's shapes: XLA:CPU compiles a jitted init slowly."""
  rng = np.random.default_rng(seed)
  variables, _ = shapes(model, x_shape)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(a.shape, np.float32)
    return rng.normal(0.0, 0.05, a.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize('name,count', [('vit_ti16', 5_717_416), ('vit_s16', 22_050_664),
                                        ('vit_b16', 86_567_656), ('vit_l16', 304_326_632)])
def test_param_count_matches_published(name, count):
  variables, logits = shapes(models.get_model(name), (1, 224, 224, 3))
  assert count_params(variables['params']) == count
  assert logits.shape == (1, 1000)


def test_b16_forward_flops():
  # XLA counts a multiply-add as 2 flops, so flops / 2 is the 17.6 GMACs usually quoted.
  # Measured: 35.257e9 flops; the dense/conv MACs alone are 17.564e9, the rest is elementwise.
  model = models.get_model('vit_b16')
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = cost['flops']
  assert abs(flops / 2 - 17.6e9) < 0.05 * 17.6e9
  tokens, width, mlp, depth = 197, 768, 3072, 12
  macs = (196 * 16 * 16 * 3 * width  # patch embedding
          + depth * (tokens * width * (4 * width + 2 * mlp) + 2 * tokens**2 * width)
          + width * 1000)  # head
  assert 2 * macs <= flops < 2 * macs * 1.01


def test_official_vit_names_and_shapes():
  variables, _ = shapes(models.get_model('vit', variant='B/16', representation_size=768),
                         (1, 224, 224, 3))
  params = variables['params']
  assert set(params) == {'embedding', 'cls', 'Transformer', 'pre_logits', 'head'}
  assert params['embedding']['kernel'].shape == (16, 16, 3, 768)
  assert params['cls'].shape == (1, 1, 768)
  enc = params['Transformer']
  assert set(enc) == {'posembed_input', 'encoder_norm', *(f'encoderblock_{i}' for i in range(12))}
  assert enc['posembed_input']['pos_embedding'].shape == (1, 197, 768)
  block = enc['encoderblock_11']
  assert set(block) == {'LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
                        'MlpBlock_3'}
  attn = block['MultiHeadDotProductAttention_1']
  assert attn['query']['kernel'].shape == (768, 12, 64)
  assert attn['out']['kernel'].shape == (12, 64, 768)
  assert set(block['MlpBlock_3']) == {'Dense_0', 'Dense_1'}
  assert block['MlpBlock_3']['Dense_0']['kernel'].shape == (768, 3072)


@pytest.mark.parametrize('pool,posemb', [(p, e) for p in vit.POOLS for e in vit.POSEMBS])
def test_small_image_shapes_for_each_pool_and_posemb(pool, posemb):
  model = models.get_model('vit', num_classes=10, variant='Ti/4', pool=pool, posemb=posemb)
  variables, (logits, features) = shapes(model, (3, 28, 28, 1), return_features=True)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert features.shape == (3, 192) and features.dtype == jnp.float32
  params = variables['params']
  assert ('cls' in params) == (pool == 'tok')
  assert ('MAPHead_0' in params) == (pool == 'map')
  if pool == 'map':
    assert params['MAPHead_0']['probe'].shape == (1, 1, 192)
  if posemb == 'learn':  # 7x7 patches, plus the class token when pooling by it
    length = 49 + (pool == 'tok')
    assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, length, 192)
  else:
    assert 'posembed_input' not in params['Transformer']


def test_representation_layer_sets_feature_size():
  model = models.get_model('vit', representation_size=64, **TINY)
  variables, (logits, features) = shapes(model, (2, 28, 28, 1), return_features=True)
  assert variables['params']['pre_logits']['kernel'].shape == (192, 64)
  assert features.shape == (2, 64) and logits.shape == (2, 10)


def test_forward_runs_for_each_pool():
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  for pool, posemb in (('tok', 'learn'), ('gap', 'sincos2d'), ('map', 'learn')):
    model = models.get_model('vit', num_classes=10, width=32, depth=1, num_heads=2, mlp_dim=64,
                             patch_size=4, pool=pool, posemb=posemb, head_zero_init=False)
    logits = jax.jit(model.apply)(_random_variables(model, x.shape), x)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    assert np.std(logits) > 0


def test_head_zero_init_and_init_scales():
  model = models.get_model('vit', variant='S/16', depth=1)
  variables = _init(model, jnp.zeros((1, 32, 32, 3)))['params']
  assert np.all(variables['head']['kernel'] == 0) and np.all(variables['head']['bias'] == 0)
  assert np.all(variables['cls'] == 0)
  kernel = variables['embedding']['kernel']  # LeCun normal over fan_in = 16 * 16 * 3
  np.testing.assert_allclose(np.std(kernel), np.sqrt(1 / 768), rtol=0.02)
  pos = variables['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(np.std(pos), 0.02, rtol=0.1)


def test_dropout_and_stoch_depth_act_only_in_train():
  x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  plain = models.get_model('vit', **TINY)
  variables = _random_variables(plain, x.shape)
  want = jax.jit(lambda v, x: plain.apply(v, x, return_features=True)[1])(variables, x)
  for kw in (dict(dropout=0.1), dict(stoch_depth=0.5)):
    model = models.get_model('vit', **TINY, **kw)
    fwd = jax.jit(lambda v, x, rng, train, m=model: m.apply(
        v, x, train=train, return_features=True, rngs={'dropout': rng})[1], static_argnums=3)
    np.testing.assert_allclose(fwd(variables, x, jax.random.key(0), False), want,
                               rtol=1e-5, atol=1e-5)
    train_a = fwd(variables, x, jax.random.key(0), True)
    train_b = fwd(variables, x, jax.random.key(1), True)
    assert not np.allclose(train_a, want, atol=1e-3), kw
    assert not np.allclose(train_a, train_b, atol=1e-3), kw
    np.testing.assert_array_equal(train_a, fwd(variables, x, jax.random.key(0), True))


def test_stoch_depth_drops_whole_examples():
  # Each branch is kept or dropped per example: where both are dropped the block is the identity.
  block = vit_layers.Encoder1DBlock(mlp_dim=16, num_heads=2, drop_path=0.5)
  x = jax.random.normal(jax.random.key(0), (64, 5, 8))
  y, _ = jax.jit(lambda x: block.init_with_output(
      {'params': jax.random.key(1), 'dropout': jax.random.key(2)}, x, deterministic=False))(x)
  unchanged = np.all(np.isclose(y, x), axis=(1, 2))
  assert 0 < unchanged.sum() < 64  # both attention and MLP dropped for ~1/4 of the examples


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.get_model('vit', dtype=jnp.bfloat16, **TINY)
  variables, (logits, features) = shapes(model, (2, 28, 28, 1), return_features=True)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  f32 = models.get_model('vit', **TINY)
  variables = _random_variables(f32, x.shape)
  features = lambda m: jax.jit(lambda v, x: m.apply(v, x, return_features=True)[1])  # noqa: E731
  got, want = features(model)(variables, x), features(f32)(variables, x)
  np.testing.assert_allclose(got, want, atol=0.1)  # LayerNorm'd features, bf16 rounding


def test_a_few_sgd_steps_lower_the_loss():
  model = models.get_model('vit', num_classes=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                           patch_size=4, pool='gap', stoch_depth=0.1)
  classes = jnp.arange(16) % 4
  patterns = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))  # one image per class
  images = patterns[classes] + 0.5 * jax.random.normal(jax.random.key(1), (16, 16, 16, 1))
  labels = jax.nn.one_hot(classes, 4)
  params = _random_variables(model, images.shape)['params']
  params['head'] = jax.tree.map(jnp.zeros_like, params['head'])  # as head_zero_init does
  tx = optax.sgd(0.3, momentum=0.9)

  def loss_fn(params, rng):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    return jnp.mean(softmax_xent(logits, labels))

  @jax.jit
  def step(params, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for i in range(6):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  np.testing.assert_allclose(losses[0], np.log(4), rtol=1e-5)  # zero head: uniform logits
  assert losses[-1] < losses[0] - 0.1, losses


def test_variants_and_overrides():
  assert vit.parse_variant('H/14') == dict(width=1280, depth=32, mlp_dim=5120, num_heads=16,
                                           patch_size=14)
  assert vit.parse_variant('S/2')['patch_size'] == 2
  for name in vit.VARIANTS:
    for patch in (8, 14, 16, 32):
      assert vit.parse_variant(f'{name}/{patch}')['patch_size'] == patch
  model = models.get_model('vit', variant='S/16', depth=3, patch_size=4)
  assert model.dims() == dict(width=384, depth=3, mlp_dim=1536, num_heads=6, patch_size=4)
  variables, _ = shapes(model, (1, 32, 32, 3))
  assert variables['params']['embedding']['kernel'].shape == (4, 4, 3, 384)
  assert len([k for k in variables['params']['Transformer'] if k.startswith('encoderblock')]) == 3


@pytest.mark.parametrize('kwargs,match', [
    (dict(variant='X/16'), 'Unknown ViT variant'),
    (dict(variant='B16'), 'NAME/PATCH'),
    (dict(variant='B/0'), 'positive integer'),
    (dict(width=64, depth=2, num_heads=2), 'mlp_dim, patch_size'),
    (dict(variant='Ti/4', num_heads=5), 'not divisible by num_heads'),
    (dict(variant='Ti/8'), 'not divisible by the patch size'),
    (dict(variant='Ti/4', pool='cls'), 'pool'),
    (dict(variant='Ti/4', posemb='sincos'), 'posemb'),
    (dict(variant='Ti/4', posemb='sincos2d', width=190, num_heads=2), 'divisible by 4'),
    (dict(variant='Ti/4', stoch_depth=1.0), 'stoch_depth'),
])
def test_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapes(models.get_model('vit', **kwargs), (1, 28, 28, 1))


def test_sincos_posemb():
  pe = posemb_lib.posemb_sincos_2d(7, 5, 64)
  assert pe.shape == (1, 35, 64) and pe.dtype == np.float32
  assert np.all(np.abs(pe) <= 1)
  assert len({row.tobytes() for row in pe[0]}) == 35  # every position distinct
  np.testing.assert_allclose(pe[0, 0], [0] * 16 + [1] * 16 + [0] * 16 + [1] * 16)


def test_registry_and_config():
  names = {'vit', 'vit_ti16', 'vit_s16', 'vit_b16', 'vit_l16', 'vit_b32'}
  assert names <= set(models.list_models())
  assert {'variant', 'width', 'depth', 'mlp_dim', 'num_heads', 'patch_size', 'pool', 'posemb',
          'representation_size', 'dropout', 'stoch_depth', 'dtype', 'param_dtype',
          'head_zero_init', 'approximate_gelu', 'num_classes',
          # the options of today's backbones (tests/models/test_vit_backbones.py)
          'class_token', 'reg_tokens', 'no_embed_class', 'pre_norm', 'init_values', 'act',
          'mlp_type', 'fc_norm', 'qkv_bias', 'patch_bias', 'norm_eps', 'strict_img_size',
          'img_size', 'dynamic_img_size', 'posemb_resize',
          'remat', 'scan'} == models.model_kwargs('vit')  # tests/models/test_remat_scan.py
  assert 'variant' not in models.model_kwargs('vit_s16')
  assert models.get_model('vit_b32').dims()['patch_size'] == 32

  spec = importlib.util.spec_from_file_location('fashion_mnist_vit', CONFIG)
  fashion_mnist_vit = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fashion_mnist_vit)
  c = config_lib.validate(fashion_mnist_vit.get_config())
  model = models.from_config(c)  # dtype 'auto' is resolved there
  _, logits = shapes(model, (2, 28, 28, 1))
  assert logits.shape == (2, 10)
  assert 'random_erasing(0.25' in c.pp_train and c.num_epochs == 30
  assert 'random_erasing' not in fashion_mnist_vit.get_config('erase=0').pp_train
  c = fashion_mnist_vit.get_config('width=64,depth=4,patch=7,dtype=float32')
  assert (c.model.width, c.model.depth, c.model.patch_size, c.model.dtype) == (64, 4, 7, 'float32')


def test_layer_index_for_layer_decay():
  assert vit_layers.block_index('Transformer/encoderblock_11/LayerNorm_0/scale') == 11
  assert vit_layers.block_index('Transformer/encoder_norm/scale') is None
  assert [vit.layer_index(p, depth=12) for p in (
      'embedding/kernel', 'cls', 'Transformer/posembed_input/pos_embedding',
      'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel',
      'Transformer/encoderblock_11/LayerNorm_2/bias', 'Transformer/encoder_norm/scale',
      'MAPHead_0/probe', 'head/kernel')] == [0, 0, 0, 1, 12, 13, 13, 13]


def test_exact_gelu_differentiates_inside_shard_map():
  """JAX 0.12 cannot differentiate lax.erf inside shard_map (check_vma): layers.gelu's exact
  form states its own derivative, equal to autodiff's outside shard_map. (test_models.py
  runs the data-parallel train step of a ViT with it.)"""
  x = jnp.linspace(-6.0, 6.0, 97)
  np.testing.assert_allclose(layers.gelu(x, approximate=False),
                             jax.nn.gelu(x, approximate=False), atol=1e-6)
  exact_grad = jax.vmap(jax.grad(functools.partial(jax.nn.gelu, approximate=False)))(x)
  np.testing.assert_allclose(
      jax.vmap(jax.grad(functools.partial(layers.gelu, approximate=False)))(x), exact_grad,
      atol=1e-6)
  mesh = parallel.make_mesh(jax.devices()[:2])
  grad = parallel.data_parallel(
      jax.grad(lambda v: jnp.sum(layers.gelu(v, approximate=False))), mesh,
      in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS))
  np.testing.assert_allclose(grad(jnp.concatenate([x, x[:1]])),
                             jnp.concatenate([exact_grad, exact_grad[:1]]), atol=1e-6)
