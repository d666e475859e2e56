"""imgcls.models.cpu_kernels (the CPU lowering) changes speed, never the math; from_config
passes it only on CPUs with the levers on (imgcls.hardware)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import hardware, models
from imgcls.models import cpu_kernels as cpu
from imgcls.models import layers


def _lax(x, k, strides, pad):
  return jax.lax.conv_general_dilated(x, k, strides, pad,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('size,kernel,stride', [
    (8, 3, 1),   # stride-1 3x3: chunked im2col kernel gradient
    (7, 5, 1),   # any kernel size
    (10, 7, 2),  # a strided 7x7 (ImageNet stem)
    (8, 1, 1),   # 1x1: a matmul
    (8, 1, 2),   # strided 1x1 (projection shortcut): slice + matmul
    (3, 3, 2),   # 2x2 output: im2col
    (9, 3, 2),   # strided 3x3: chunked im2col kernel gradient
])
def test_conv2d_equals_lax_with_gradients(size, kernel, stride):
  rng = np.random.default_rng(0)
  # batch 12: chunks of at most 8 images, so the kernel gradient's scan runs twice
  x = jnp.asarray(rng.standard_normal((12, size, size, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kernel, kernel, 4, 6)), jnp.float32)
  pad = ((kernel // 2, kernel // 2),) * 2
  ours = lambda x, k: jnp.sum(jnp.sin(cpu.conv2d(x, k, (stride, stride), pad)))  # noqa: E731
  ref = lambda x, k: jnp.sum(jnp.sin(_lax(x, k, (stride, stride), pad)))  # noqa: E731
  np.testing.assert_allclose(cpu.conv2d(x, k, (stride, stride), pad),
                             _lax(x, k, (stride, stride), pad), atol=2e-5)
  for got, want in zip(jax.grad(ours, (0, 1))(x, k), jax.grad(ref, (0, 1))(x, k)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_kernel_gradient_is_chunked_matmuls_on_cpu_only_when_levers_on(stride):
  x = jnp.ones((16, 9, 9, 4))  # chunks of 8 images: the scan runs twice
  k = jnp.ones((3, 3, 4, 4))

  def hlo(conv2d):
    grad = jax.grad(lambda k: jnp.sum(conv2d(x, k, (stride, stride), ((1, 1), (1, 1)))))
    return jax.jit(grad).lower(k).as_text()

  hlo_on = hlo(cpu.conv2d)
  hlo_off = hlo(layers.conv2d)
  # On: a scan (while loop) over chunks of images, each an im2col and a matmul.
  assert 'stablehlo.while' in hlo_on and 'dot_general' in hlo_on
  assert 'stablehlo.while' not in hlo_off and 'dot_general' not in hlo_off
  assert 'convolution' in hlo_off


@pytest.mark.parametrize('batch,per_image,half,want', [
    (128, 1024 * 576 * 4, False, 4),   # ResNet-18 at 32 px, stage 1: 2.25 MiB per image
    (128, 64 * 2304 * 4, False, 8),    # small per-image copies: capped at 8 images
    (256, 196 * 288 * 2, True, 32),    # bf16 Fashion-MNIST ResNet, stage 1: capped at 32
    (256, 196 * 576 * 2, True, 32),    # its width-64 variant: 7 MiB a chunk
    (128, 1024 * 576 * 2, True, 8),    # bf16 at 32 px, stage 1: the 16 MiB bound
    (8, 3136 * 576 * 4, False, 2),     # ResNet-50 at 224 px, stage 1: 6.9 MiB per image
    (6, 40 << 20, True, 1),            # larger than a chunk: one image at a time
    (7, 1 << 20, False, 7),            # a divisor of the batch
])
def test_kernel_grad_chunks(batch, per_image, half, want):
  assert cpu.chunk_images(batch, per_image, half) == want
  assert batch % want == 0


def test_resnet_same_outputs_and_gradients_with_levers_off():
  kw = dict(num_classes=5, width=8, stem='small', bn_axis_name=None)
  model = models.get_model('resnet18', lowering=cpu.CPU, **kw)
  plain = models.get_model('resnet18', **kw)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 12, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)

  def loss(params, model=model):
    out, _ = model.apply({**variables, 'params': params}, x, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(out ** 2)

  on = jax.value_and_grad(loss)(variables['params'])
  off = jax.value_and_grad(lambda p: loss(p, plain))(variables['params'])
  np.testing.assert_allclose(on[0], off[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(on[1]), jax.tree.leaves(off[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def _dot_ranks(fn, *args):
  """The operand ranks of every dot_general in fn's gradient jaxpr."""
  jaxpr = jax.make_jaxpr(jax.grad(fn, tuple(range(len(args)))))(*args)
  ranks = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        ranks.append(tuple(v.aval.ndim for v in eqn.invars))
      for value in eqn.params.values():  # nested jaxprs (pjit, custom_jvp, scan, cond)
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, 'jaxpr', sub)
          if hasattr(sub, 'eqns'):
            walk(sub)
  walk(jaxpr.jaxpr)
  return ranks


@pytest.mark.parametrize('lhs,rhs,contract', [
    ((2, 5, 8), (8, 6), 1),        # Dense on [batch, tokens, width]
    ((2, 5, 8), (8, 3, 4), 1),     # attention's qkv projection (DenseGeneral)
    ((2, 5, 3, 4), (3, 4, 8), 2),  # attention's output projection
    ((8,), (8, 6), 1),             # a vector
    ((2, 5, 0), (0, 6), 1),        # an empty contraction: zeros, as lax gives
])
def test_dot_general_is_a_2d_matmul_with_lax_values_and_gradients(lhs, rhs, contract):
  rng = np.random.default_rng(7)
  a = jnp.asarray(rng.standard_normal(lhs), jnp.float32)
  b = jnp.asarray(rng.standard_normal(rhs), jnp.float32)
  dims = ((tuple(range(len(lhs) - contract, len(lhs))), tuple(range(contract))), ((), ()))
  ours = lambda a, b: jnp.sum(jnp.sin(cpu.dot_general(a, b, dims)))  # noqa: E731
  ref = lambda a, b: jnp.sum(jnp.sin(jax.lax.dot_general(a, b, dims)))  # noqa: E731
  np.testing.assert_allclose(cpu.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims),
                             rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Forward and both gradients are 2-D products: XLA:CPU copies an N-D product's output
  # gradient into a transposed array before the kernel gradient's matmul.
  assert set(_dot_ranks(ours, a, b)) == {(2, 2)}
  plain = lambda a, b: jnp.sum(jnp.sin(layers.PLAIN.dot_general(a, b, dims)))  # noqa: E731
  if len(lhs) > 2:
    assert (2, 2) not in _dot_ranks(plain, a, b)  # levers off: lax's product, untouched


def test_dot_general_leaves_batched_products_to_lax():
  a = jnp.ones((2, 5, 8))
  b = jnp.ones((2, 8, 6))
  dims = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(cpu.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
  assert _dot_ranks(lambda a, b: jnp.sum(cpu.dot_general(a, b, dims)), a, b)[0] == (3, 3)


def test_one_by_one_conv_gradients_are_2d_matmuls():
  x = jnp.ones((2, 6, 6, 4))
  k = jnp.ones((1, 1, 4, 5))
  ranks = _dot_ranks(lambda x, k: jnp.sum(cpu.conv2d(x, k, (2, 2), ((0, 0), (0, 0)))), x, k)
  assert ranks and set(ranks) == {(2, 2)}


def test_vit_same_outputs_and_gradients_with_levers_off():
  kw = dict(num_classes=5, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, pool='map',
            head_zero_init=False)
  model = models.get_model('vit', lowering=cpu.CPU, **kw)
  plain = models.get_model('vit', **kw)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)

  def loss(params, model=model):
    return jnp.sum(model.apply({'params': params}, x) ** 2)

  def loss_plain(params):
    return loss(params, plain)

  on = jax.value_and_grad(loss)(variables['params'])
  # The Dense layers and attention projections are 2-D products; what stays N-D is
  # attention's batched q.k and weights.v einsums (rank 4 by 4).
  ranks_on = set(_dot_ranks(loss, variables['params']))
  assert (2, 2) in ranks_on and ranks_on <= {(2, 2), (4, 4)}, ranks_on
  off = jax.value_and_grad(loss_plain)(variables['params'])
  assert (3, 2) in set(_dot_ranks(loss_plain, variables['params']))  # lax's Dense on [b, n, d]
  np.testing.assert_allclose(on[0], off[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(on[1]), jax.tree.leaves(off[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('flags,platform,want', [
    ({'avx512f', 'amx_bf16'}, 'cpu', 'bfloat16'),
    ({'avx512f', 'avx512_bf16'}, 'cpu', 'bfloat16'),
    ({'avx2', 'fma'}, 'cpu', 'float32'),   # AMD EPYC Zen 3: bf16 emulated
    ({'avx2', 'fma'}, 'gpu', 'bfloat16'),
    ({'avx2', 'fma'}, 'tpu', 'bfloat16'),
])
def test_auto_dtype(monkeypatch, flags, platform, want):
  monkeypatch.setattr(hardware, 'cpu_flags', lambda: frozenset(flags))
  assert hardware.auto_dtype(platform) == want


def test_xla_flags_only_on_native_bf16_cpus(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.setattr(hardware, 'cpu_flags', lambda: frozenset({'avx2'}))
  assert hardware.set_xla_flags() == '--xla_force_host_platform_device_count=2'
  monkeypatch.setattr(hardware, 'cpu_flags', lambda: frozenset({'amx_bf16'}))
  assert (hardware.set_xla_flags() ==
          f'--xla_force_host_platform_device_count=2 {hardware.ONEDNN_FLAG}')
  assert hardware.set_xla_flags().count('onednn') == 1  # idempotent
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv(hardware.OFF_ENV, '0')
  assert hardware.set_xla_flags() == ''
  assert os.environ['XLA_FLAGS'] == ''


@pytest.mark.parametrize('size', [8, 10])  # 10: VALID drops the last 2 rows and columns
def test_patch_conv_equals_lax_with_gradients(size):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, size, size, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((4, 4, 5, 7)), jnp.float32)
  valid = ((0, 0), (0, 0))
  ours = lambda x, k: jnp.sum(jnp.sin(cpu.conv2d(x, k, (4, 4), valid)))  # noqa: E731
  ref = lambda x, k: jnp.sum(jnp.sin(_lax(x, k, (4, 4), valid)))  # noqa: E731
  np.testing.assert_allclose(cpu.conv2d(x, k, (4, 4), valid), _lax(x, k, (4, 4), valid),
                             atol=2e-5)
  assert 'convolution' not in jax.jit(jax.grad(ours, (0, 1))).lower(x, k).as_text()
  for got, want in zip(jax.grad(ours, (0, 1))(x, k), jax.grad(ref, (0, 1))(x, k)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('size,pad', [(9, 1), (8, 1), (9, 0)])
def test_max_pool_equals_reduce_window_with_gradients(size, pad):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, size, size, 3)), jnp.float32)
  padding = ((pad, pad), (pad, pad))

  def pooled_loss(x, pool=cpu.max_pool):
    return jnp.sum(jnp.sin(pool(x, (3, 3), (2, 2), padding)))

  def reduce_window_loss(x):  # flax's pool, as models used off CPUs before the slices form
    return pooled_loss(x, lambda *a: nn.max_pool(a[0], a[1], strides=a[2], padding=a[3]))

  on = cpu.max_pool(x, (3, 3), (2, 2), padding), jax.grad(pooled_loss)(x)
  assert 'reduce_window' not in jax.jit(jax.grad(pooled_loss)).lower(x).as_text()
  off = nn.max_pool(x, (3, 3), (2, 2), padding), jax.grad(reduce_window_loss)(x)
  assert 'reduce_window' in jax.jit(reduce_window_loss).lower(x).as_text()
  for got, want in zip(on, off):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bfloat16_relu_is_computed_in_float32_with_the_same_values_and_gradients():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((4, 5, 3)), jnp.bfloat16).at[0, 0].set(0)  # a tie at 0
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
  out, vjp = jax.vjp(cpu.relu, x)
  want, want_vjp = jax.vjp(jax.nn.relu, x)
  assert out.dtype == vjp(g)[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
  np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32),
                                np.asarray(want_vjp(g)[0], np.float32))
  hlo = jax.jit(lambda x, g: jax.vjp(cpu.relu, x)[1](g)).lower(x, g).as_text()
  assert 'f32' in hlo
  plain = layers.PLAIN.relu  # levers off: plain bf16, as on accelerators
  assert 'f32' not in jax.jit(lambda x, g: jax.vjp(plain, x)[1](g)).lower(x, g).as_text()
  x32 = x.astype(jnp.float32)
  np.testing.assert_array_equal(cpu.relu(x32), jax.nn.relu(x32))


def test_bfloat16_max_pool_is_pooled_in_float32_with_bfloat16_values_and_gradients():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 9, 3)), jnp.bfloat16)
  padding = ((1, 1), (1, 1))
  out, vjp = jax.vjp(lambda x: cpu.max_pool(x, (3, 3), (2, 2), padding), x)
  g = jnp.asarray(np.random.default_rng(5).standard_normal(out.shape), jnp.bfloat16)
  dx, = vjp(g)
  assert out.dtype == dx.dtype == jnp.bfloat16
  want, want_vjp = jax.vjp(lambda x: layers.max_pool(x, (3, 3), (2, 2), padding),
                           x.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(out, np.float32), want)  # a max is exact
  np.testing.assert_allclose(np.asarray(dx, np.float32), want_vjp(g.astype(jnp.float32))[0],
                             rtol=1e-2, atol=1e-2)
  hlo = jax.jit(lambda x, g: jax.vjp(lambda x: cpu.max_pool(x, (3, 3), (2, 2), padding),
                                     x)[1](g)).lower(x, g).as_text()
  assert 'reduce_window' not in hlo and 'f32' in hlo


def test_large_kernel_conv_is_a_matmul_with_lax_values_and_gradients():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 512)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 512, 256)) * 0.02, jnp.float32)  # 1.2M weights
  assert k.size >= cpu.IM2COL_MIN_WEIGHTS
  pad = ((1, 1), (1, 1))
  ours = lambda x, k: jnp.sum(jnp.sin(cpu.conv2d(x, k, (1, 1), pad)))  # noqa: E731
  ref = lambda x, k: jnp.sum(jnp.sin(_lax(x, k, (1, 1), pad)))  # noqa: E731
  assert 'convolution' not in jax.jit(ours).lower(x, k).as_text()
  np.testing.assert_allclose(cpu.conv2d(x, k, (1, 1), pad), _lax(x, k, (1, 1), pad),
                             atol=1e-4, rtol=1e-4)
  for got, want in zip(jax.grad(ours, (0, 1))(x, k), jax.grad(ref, (0, 1))(x, k)):
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize('size,stride,kernel,pad', [
    (8, 1, (3, 3), ((1, 1), (1, 1))),  # stride 1: input gradient by the rotated kernel
    (8, 1, (3, 3), ((0, 0), (0, 0))),  # unpadded
    (8, 1, (3, 3), ((2, 2), (2, 2))),  # padded more than SAME
    (8, 1, (3, 2), ((0, 2), (1, 0))),  # a non-square kernel, padded unevenly
    (9, 2, (3, 3), ((1, 1), (1, 1))),  # strided: autodiff's input gradient
    (40, 1, (3, 3), ((1, 1), (1, 1))),  # 12,800 pixels per weight, float32 across chunks
])
def test_bfloat16_gradients_match_float32(size, stride, kernel, pad):
  """bf16 convs: both gradients within bf16 rounding of float32 autodiff on the same inputs."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((8, size, size, 8)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((*kernel, 8, 16)) * 0.1, jnp.bfloat16)
  out_h = (size + sum(pad[0]) - kernel[0]) // stride + 1
  out_w = (size + sum(pad[1]) - kernel[1]) // stride + 1
  dy = jnp.asarray(rng.standard_normal((8, out_h, out_w, 16)), jnp.bfloat16)

  def grads(conv, x, k, dy):
    return jax.vjp(lambda x, k: conv(x, k, (stride, stride), pad), x, k)[1](dy)

  assert cpu._input_grad_as_conv_applies(x, k, (stride, stride), pad) == (stride == 1)
  dx, dk = jax.jit(lambda x, k, dy: grads(cpu.conv2d, x, k, dy))(x, k, dy)
  want_dx, want_dk = grads(_lax, *(a.astype(jnp.float32) for a in (x, k, dy)))
  assert dx.dtype == dk.dtype == jnp.bfloat16
  for got, want in ((dx, want_dx), (dk, want_dk)):
    err = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
    assert err < 2e-2, err


def test_from_config_passes_the_cpu_kernels_on_cpus_with_the_levers_on(monkeypatch):
  config = {'model': {'name': 'resnet10', 'width': 4}, 'dataset': {'num_classes': 3}}
  assert jax.default_backend() == 'cpu' and hardware.levers_on()
  assert models.from_config(config).lowering is cpu.CPU
  assert models.get_model('resnet10').lowering is layers.PLAIN  # no from_config: the defaults
  assert models.from_config(config, lowering=layers.PLAIN).lowering is layers.PLAIN
  assert 'lowering' not in models.model_kwargs('resnet10')  # not a config field
  assert hardware.use_cpu_kernels('cpu') and not hardware.use_cpu_kernels('gpu')
  monkeypatch.setenv(hardware.OFF_ENV, '0')
  assert models.from_config(config).lowering is layers.PLAIN
  assert not hardware.use_cpu_kernels('cpu')


def test_bit_same_outputs_and_gradients_with_levers_off():
  kw = dict(num_classes=3, stage_sizes=(1, 1), width=8, num_groups=4)
  model = models.get_model('bit', lowering=cpu.CPU, **kw)
  plain = models.get_model('bit', **kw)
  x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero head: gradients reach the convs

  def loss(params, model=model):
    return jnp.sum(model.apply({'params': params}, x) ** 2)

  on = jax.value_and_grad(loss)(params)
  off = jax.value_and_grad(lambda p: loss(p, plain))(params)
  np.testing.assert_allclose(on[0], off[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(on[1]), jax.tree.leaves(off[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
