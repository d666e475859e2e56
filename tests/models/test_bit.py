"""Tests for BiT ResNet-V2: sizes by abstract evaluation, layer semantics on tiny inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import models
from imgcls.models import bit

from helpers import count_params, shapes

# Shapes by abstract evaluation: one unit per stage, 16 -> 512 features.
TINY = dict(stage_sizes=(1, 1, 1, 1), width=16, num_groups=8, num_classes=7)
# Where the forward pass really runs (XLA:CPU compiles each unit's convs slowly): two stages.
SMALL = dict(stage_sizes=(1, 1), width=8, num_groups=4, num_classes=3)




def _random_params(model, x_shape, seed=0):
  """Params drawn by numpy in the init's shapes (a random, nonzero head too)."""
  rng = np.random.default_rng(seed)
  variables, _ = shapes(model, x_shape)

  def draw(path, a):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return (1.0 + 0.1 * rng.normal(size=a.shape)).astype(np.float32)
    return rng.normal(0.0, 0.1, a.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, variables['params'])


def _torch_conv(x, w, stride, pad):
  """Reference conv with torch's semantics: zero-pad `pad` each side, floor output size."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ w[i, j]
  return out


def _standardize_np(w, eps=1e-8):
  w = w.astype(np.float64)
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)  # biased, as torch's batch_norm
  return (w - mean) / np.sqrt(var + eps)


@pytest.mark.parametrize('name,count', [('bit_r50x1', 25_549_352),  # timm resnetv2_50x1_bit
                                        ('bit_r50x3', 217_319_080)])  # timm resnetv2_50x3_bit
def test_param_count_matches_timm(name, count):
  variables, logits = shapes(models.get_model(name), (1, 224, 224, 3))
  assert set(variables) == {'params'}  # GroupNorm: no batch_stats
  assert count_params(variables['params']) == count
  assert logits.shape == (1, 1000) and logits.dtype == jnp.float32


def test_names_and_shapes_for_the_converter():
  variables, (_, features) = shapes(models.get_model('bit_r50x1'), (1, 64, 64, 3),
                                     return_features=True)
  params = variables['params']
  units = [f'stage{i}_unit{j}' for i, n in enumerate((3, 4, 6, 3), 1) for j in range(1, n + 1)]
  assert set(params) == {'root_conv', 'norm', 'head', *units}
  assert params['root_conv']['kernel'].shape == (7, 7, 3, 64)
  for i, (mid, cin) in enumerate([(64, 64), (128, 256), (256, 512), (512, 1024)], 1):
    first = params[f'stage{i}_unit1']
    assert set(first) == {'norm1', 'conv1', 'norm2', 'conv2', 'norm3', 'conv3', 'proj'}
    assert first['proj']['kernel'].shape == (1, 1, cin, 4 * mid)
    assert first['norm1']['scale'].shape == (cin,)
    assert first['conv1']['kernel'].shape == (1, 1, cin, mid)
    assert first['conv2']['kernel'].shape == (3, 3, mid, mid)
    assert first['conv3']['kernel'].shape == (1, 1, mid, 4 * mid)
    assert set(first['norm3']) == {'scale', 'bias'}
    assert 'proj' not in params[f'stage{i}_unit2']
  assert params['norm']['scale'].shape == (2048,)
  assert params['head']['kernel'].shape == (2048, 1000) and params['head']['bias'].shape == (1000,)
  assert features.shape == (1, 2048)


def test_released_sizes():
  for name, (depth, factor) in bit.RELEASED.items():
    model = models.get_model(name)
    assert tuple(model.stage_sizes) == bit.STAGE_SIZES[depth] and model.width == 64 * factor
  variables, (logits, features) = shapes(models.get_model('bit_r152x4', num_classes=3),
                                          (1, 32, 32, 3), return_features=True)
  assert features.shape == (1, 64 * 4 * 8 * 4) and logits.shape == (1, 3)
  assert sum(k.startswith('stage3_') for k in variables['params']) == 36


@pytest.mark.parametrize('kernel,stride,size', [(7, 2, 13), (7, 2, 12), (3, 2, 9), (3, 2, 8),
                                                (3, 1, 5), (1, 2, 7), (1, 1, 4)])
def test_std_conv_is_a_torch_conv_with_the_standardised_kernel(kernel, stride, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  w = rng.normal(0.3, 2.0, (kernel, kernel, 3, 5)).astype(np.float32)
  conv = bit.StdConv(5, (kernel, kernel), (stride, stride))
  got = conv.apply({'params': {'kernel': w}}, x)
  want = _torch_conv(x, _standardize_np(w), stride, (kernel - 1) // 2)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  ws = np.asarray(bit.standardize(jnp.asarray(w), 1e-8)).reshape(-1, 5)
  np.testing.assert_allclose(ws.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(ws.var(0), 1, rtol=1e-5)


def test_std_conv_ignores_per_channel_affine_rescale():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
  w = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  a = rng.uniform(0.5, 3.0, 6).astype(np.float32)
  b = rng.normal(size=6).astype(np.float32)
  conv = bit.StdConv(6, (3, 3), (2, 2))
  out = lambda k: conv.apply({'params': {'kernel': k}}, x)  # noqa: E731
  np.testing.assert_allclose(out(w * a + b), out(w), rtol=1e-4, atol=1e-4)
  assert not np.allclose(out(w), jax.lax.conv_general_dilated(  # standardising does something
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')), atol=1e-2)


def test_stem_is_conv_then_zero_pad_then_valid_pool():
  model = bit.ResNetV2(**TINY)
  _, (_, state) = shapes(model, (1, 224, 224, 3), mutable=['intermediates'])
  assert state['intermediates']['stem'][0].shape == (1, 56, 56, 16)

  # Raw kernel -1 at the centre tap, 0 elsewhere; input 1 on even pixels. Each stride-2 output
  # sees the centre (~ -7 after standardising) and at most 8 other ones (~ +0.15 each): all < 0.
  model = bit.ResNetV2(stage_sizes=(1,), width=8, num_groups=8, num_classes=2)
  x = np.zeros((1, 32, 32, 1), np.float32)
  x[:, ::2, ::2] = 1.0
  params = _random_params(model, x.shape)
  kernel = np.zeros((7, 7, 1, 8), np.float32)
  kernel[3, 3] = -1.0
  params['root_conv']['kernel'] = kernel
  stem_conv = jax.jit(bit.StdConv(8, (7, 7), (2, 2)).apply)
  conv = np.asarray(stem_conv({'params': {'kernel': kernel}}, x))
  assert conv.shape == (1, 16, 16, 8) and np.all(conv < 0)
  _, state = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
      params, x)
  pooled = np.asarray(state['intermediates']['stem'][0])
  assert pooled.shape == (1, 8, 8, 8)
  # Windows touching the top/left pad hold a zero that beats the negative conv outputs (with
  # -inf padding they would be negative); for an even map the bottom/right windows miss the pad.
  assert np.all(pooled[:, 0] == 0) and np.all(pooled[:, :, 0] == 0)
  assert np.all(pooled[:, 1:, 1:] < 0)
  padded = np.pad(conv, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.stack([np.stack([padded[:, 2 * r:2 * r + 3, 2 * c:2 * c + 3].max(axis=(1, 2))
                             for c in range(8)], 1) for r in range(8)], 1)
  np.testing.assert_allclose(pooled, want, rtol=1e-6, atol=1e-6)


def test_unit_shortcuts():
  # A zero conv3 kernel standardises to zero, leaving only the shortcut.
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16)) * 3 + 1
  unit = bit.PreActBottleneck(features=4, num_groups=2)
  params = _random_params(unit, x.shape)
  params['conv3']['kernel'] = jnp.zeros_like(params['conv3']['kernel'])
  assert 'proj' not in params
  # The shortcut is the raw x, not relu(gn(x)).
  np.testing.assert_array_equal(jax.jit(unit.apply)({'params': params}, x), x)

  unit = bit.PreActBottleneck(features=4, strides=2, num_groups=2)
  params = _random_params(unit, x.shape)
  params['norm1'] = {'scale': np.ones(16, np.float32), 'bias': np.zeros(16, np.float32)}
  params['conv3']['kernel'] = jnp.zeros_like(params['conv3']['kernel'])
  xg = np.asarray(x, np.float64).reshape(2, 6, 6, 2, 8)  # GroupNorm by hand, 2 groups of 8
  xg = (xg - xg.mean((1, 2, 4), keepdims=True)) / np.sqrt(xg.var((1, 2, 4), keepdims=True) + 1e-5)
  pre = np.maximum(xg.reshape(2, 6, 6, 16), 0)  # scale 1, bias 0
  want = _torch_conv(pre, _standardize_np(np.asarray(params['proj']['kernel'])), 2, 0)
  got = jax.jit(unit.apply)({'params': params}, x)
  assert got.shape == (2, 3, 3, 16)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def small():
  """The small model, its real init, and a jitted forward returning (logits, features)."""
  model = bit.ResNetV2(**SMALL)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
  fwd = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
  return model, x, variables, fwd


def test_forward_shapes_and_zero_head(small):
  _, x, variables, fwd = small
  assert set(variables) == {'params'}
  head = variables['params']['head']
  assert np.all(head['kernel'] == 0) and np.all(head['bias'] == 0)
  logits, features = fwd(variables, x)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  assert features.shape == (4, 64) and features.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0)
  assert np.all(np.isfinite(features)) and np.all(features >= 0) and np.std(features) > 0
  _, (logits, features) = shapes(bit.ResNetV2(**TINY), (2, 32, 32, 3), return_features=True)
  assert logits.shape == (2, 7) and features.shape == (2, 512)


def test_bfloat16_compute(small):
  model, x, _, fwd = small
  params = _random_params(model, x.shape)
  want_logits, want = fwd({'params': params}, x)
  bf16 = bit.ResNetV2(**SMALL, dtype=jnp.bfloat16)
  logits, features = jax.jit(lambda p, x: bf16.apply({'params': p}, x, return_features=True))(
      params, x)
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(want_logits) > 0
  assert np.linalg.norm(features - want) < 0.05 * np.linalg.norm(want)  # bf16 rounding only
  variables, _ = shapes(bf16, x.shape)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_gradient_flows():
  model = bit.ResNetV2(stage_sizes=(1,), width=8, num_groups=4, num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params = _random_params(model, x.shape)  # random head: a zero head would block the gradient

  @jax.jit
  def grad(params):
    def loss(p):
      logits = model.apply({'params': p}, x, train=True)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])
    return jax.grad(loss)(params)

  grads = grad(params)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(grads))
  assert np.abs(grads['root_conv']['kernel']).max() > 0


def test_stoch_depth_drops_whole_examples_only_in_train():
  x = jax.random.normal(jax.random.key(0), (64, 4, 4, 16))
  unit = bit.PreActBottleneck(features=4, num_groups=2, drop_path=0.5)
  params = _random_params(unit, x.shape)
  fwd = jax.jit(lambda x, rng, train: unit.apply({'params': params}, x, train=train,
                                                 rngs={'dropout': rng}), static_argnums=2)
  plain = jax.jit(bit.PreActBottleneck(features=4, num_groups=2).apply)({'params': params}, x)
  np.testing.assert_allclose(fwd(x, jax.random.key(1), False), plain, rtol=1e-5, atol=1e-5)
  y = np.asarray(fwd(x, jax.random.key(1), True))
  dropped = np.all(y == np.asarray(x), axis=(1, 2, 3))  # identity shortcut: branch zeroed
  assert 10 < dropped.sum() < 54
  np.testing.assert_allclose(y[~dropped], (2 * (plain - x) + x)[~dropped], rtol=1e-4, atol=1e-4)
  assert not np.array_equal(y, fwd(x, jax.random.key(2), True))


@pytest.mark.parametrize('kwargs,match', [
    (dict(stage_sizes=(1, 1), width=12, num_groups=8), r'stage 1 mid width 12 .*num_groups=8'),
    (dict(stage_sizes=(1, 1), width=8, num_groups=16), r'stage 1 mid width 8'),
    (dict(stage_sizes=(), width=8, num_groups=8), 'non-empty'),
    (dict(stage_sizes=(1, 0), width=8, num_groups=8), 'positive ints'),
    (dict(stage_sizes=(1,), width=8, num_groups=0), 'positive'),
    (dict(stage_sizes=(1,), width=8, num_groups=8, stoch_depth=1.0), 'stoch_depth'),
])
def test_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapes(bit.ResNetV2(**kwargs), (1, 32, 32, 3))


def test_registry():
  names = {'bit', *bit.RELEASED}
  assert names <= set(models.list_models())
  assert {'stage_sizes', 'num_classes', 'width', 'num_groups', 'std_eps', 'gn_eps',
          'stoch_depth', 'dtype', 'remat'} == models.model_kwargs('bit')
  assert not {'stage_sizes', 'width'} & models.model_kwargs('bit_r50x1')
  variables, logits = shapes(models.get_model('bit_r50x1', num_classes=5), (2, 64, 64, 3))
  assert logits.shape == (2, 5) and variables['params']['head']['kernel'].shape == (2048, 5)
  model = models.get_model('bit', stage_sizes=[2, 1], width=8, num_groups=4, num_classes=3)
  assert model.stage_sizes == (2, 1) and hash(model)  # a config's list becomes a tuple
  variables, logits = shapes(model, (1, 32, 32, 1))
  assert set(variables['params']) == {'root_conv', 'stage1_unit1', 'stage1_unit2',
                                      'stage2_unit1', 'norm', 'head'}
  assert logits.shape == (1, 3)
  assert isinstance(model, nn.Module)
