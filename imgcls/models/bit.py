"""BiT ResNet-V2 (Kolesnikov et al., "Big Transfer", 2020) in Flax Linen, as timm's resnetv2_*_bit.

Pre-activation bottlenecks with weight-standardised convs and GroupNorm: no batch statistics,
so the model behaves the same at any batch size and `init` returns only 'params'.

Name map (timm -> here), for weight conversion (bit_weights.py):
  stem.conv                                -> root_conv
  stages.{i}.blocks.{j}.norm{k} / conv{k}  -> stage{i+1}_unit{j+1}/norm{k} / conv{k}  (k = 1, 2, 3)
  stages.{i}.blocks.0.downsample.conv      -> stage{i+1}_unit1/proj
  norm                                     -> norm
  head.fc (1x1 conv)                       -> head (Dense: kernel = fc.weight[:, :, 0, 0].T)
Conv kernels are HWIO (torch's OIHW transposed by (2, 3, 1, 0)); GroupNorm weight, bias -> scale,
bias. In float32 on GPUs, compare against torch under jax.default_matmul_precision('highest').
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgcls.models import layers
from imgcls.models.layers import PLAIN, Lowering, drop_path
from imgcls.models.registry import MODELS
from imgcls.models.resnet import conv_init

# BiT depth -> units per stage; width = 64 * width factor (BiT's "x1", "x3", ...).
STAGE_SIZES = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# The sizes BiT released: name -> (depth, width factor).
RELEASED = {
    'bit_r50x1': (50, 1),
    'bit_r50x3': (50, 3),
    'bit_r101x1': (101, 1),
    'bit_r101x3': (101, 3),
    'bit_r152x2': (152, 2),
    'bit_r152x4': (152, 4),
}
EXPANSION = 4  # bottleneck output channels = 4 * mid


def standardize(kernel: jax.Array, eps: float) -> jax.Array:
  """Per output channel (last axis) zero mean, unit (biased) variance over all other axes.

  In float32 whatever the input dtype, as torch's F.batch_norm over the flattened weight does.
  """
  w = kernel.astype(jnp.float32)
  axes = tuple(range(w.ndim - 1))
  mean = jnp.mean(w, axis=axes, keepdims=True)
  var = jnp.var(w, axis=axes, keepdims=True)
  return (w - mean) / jnp.sqrt(var + eps)


class StdConv(nn.Module):
  """Bias-free weight-standardised conv (timm's StdConv2d), padded by (k - 1) // 2 each side.

  Symmetric padding as torch's, so strided outputs line up with timm's (7x7/2: 3, 3x3: 1, 1x1: 0;
  for odd kernels this is timm's get_padding). The kernel is stored raw and standardised on
  every call, in float32, then cast to the compute dtype; computed by `lowering.conv`.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  eps: float = 1e-8
  dtype: Any = jnp.float32
  kernel_init: Any = conv_init
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features))
    kernel = standardize(kernel, self.eps).astype(self.dtype)
    pad = (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
    return self.lowering.conv(jnp.asarray(x, self.dtype), kernel, self.strides, pad)


def fixed_stem_pool(x: jax.Array, lowering: Lowering = PLAIN) -> jax.Array:
  """BiT's 'fixed' stem pool: pad one pixel of zeros each side, then 3x3/2 max-pool, VALID.

  Zeros, not -inf: the stem conv has no activation, so a padded zero can win the max. This is
  the official BiT PyTorch / timm stem_type='fixed' (ConstantPad2d(1, 0) + MaxPool2d(3, 2)).
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return lowering.max_pool(x, (3, 3), (2, 2), ((0, 0), (0, 0)))


class PreActBottleneck(nn.Module):
  """relu(gn1(x)) feeds 1x1 -> relu(gn2) -> 3x3 (carries the stride) -> relu(gn3) -> 1x1 (4x).

  The shortcut is a 1x1 strided StdConv `proj` of the pre-activated input when the shape
  changes, else the raw input x. `drop_path`: rate of stochastic depth on the residual branch.
  """
  features: int  # mid channels; the unit outputs EXPANSION * features
  strides: int = 1
  num_groups: int = 32
  std_eps: float = 1e-8
  gn_eps: float = 1e-5
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  lowering: Lowering = PLAIN

  def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
    return drop_path(self, y, self.drop_path, not train)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = EXPANSION * self.features
    s = (self.strides, self.strides)
    conv = functools.partial(StdConv, eps=self.std_eps, dtype=self.dtype, lowering=self.lowering)
    # Two-pass variance (use_fast_variance=False), as torch: E[x^2] - E[x]^2 loses digits on the
    # large activations of deep pre-activation stacks.
    norm = functools.partial(nn.GroupNorm, num_groups=self.num_groups, epsilon=self.gn_eps,
                             dtype=self.dtype, use_fast_variance=False)

    x_pre = nn.relu(norm(name='norm1')(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out:
      shortcut = conv(out, (1, 1), s, name='proj')(x_pre)
    y = conv(self.features, (1, 1), name='conv1')(x_pre)
    y = conv(self.features, (3, 3), s, name='conv2')(nn.relu(norm(name='norm2')(y)))
    y = conv(out, (1, 1), name='conv3')(nn.relu(norm(name='norm3')(y)))
    return self._drop_path(y, train) + shortcut


class ResNetV2(nn.Module):
  """BiT ResNet-V2. `width`: stem channels and stage 1's mid width (64 * BiT's width factor);
  stage i (0-based) has mid width * 2**i and outputs 4x that; stages after the first halve
  the resolution in their first unit. Stem: 7x7/2 StdConv, zero pad, 3x3/2 max-pool (/4).

  Unit k of n (0-based, all stages together) drops its branch with rate stoch_depth * k / (n - 1)
  when training (timm's linspace), drawing from the 'dropout' rng. `dtype` is the compute dtype;
  parameters stay float32, the head runs in float32 and logits are float32. The stem output is
  sown as intermediates/stem (apply with mutable=['intermediates'] to read it). `lowering`: how
  convs and the pool are computed (layers.Lowering). `remat`: a layers.REMAT_POLICIES name;
  each unit's activations are then recomputed in the backward pass (same parameters).
  """
  stage_sizes: Sequence[int]
  num_classes: int = 1000
  width: int = 64
  num_groups: int = 32
  std_eps: float = 1e-8
  gn_eps: float = 1e-5
  stoch_depth: float = 0.0
  dtype: Any = jnp.float32
  remat: str = ''
  lowering: Lowering = PLAIN

  def __post_init__(self):
    layers.check_remat(self.remat)
    # Configs may hand over a list; a tuple keeps the module hashable (jit static arguments).
    if self.stage_sizes is not None and not isinstance(self.stage_sizes, tuple):
      object.__setattr__(self, 'stage_sizes', tuple(self.stage_sizes))
    super().__post_init__()

  def _check(self, x: jax.Array) -> None:
    sizes = self.stage_sizes
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in sizes):
      raise ValueError(f'BiT stage_sizes must be a non-empty sequence of positive ints, e.g. '
                       f'(3, 4, 6, 3) for R50; got {sizes!r}.')
    if self.width <= 0 or self.num_groups <= 0:
      raise ValueError(f'BiT width and num_groups must be positive, got width={self.width}, '
                       f'num_groups={self.num_groups}.')
    for i in range(len(sizes)):
      mid = self.width * 2**i
      if mid % self.num_groups:
        raise ValueError(f'BiT stage {i + 1} mid width {mid} (width={self.width} * 2**{i}) is not '
                         f'divisible by num_groups={self.num_groups}: GroupNorm needs whole '
                         f'groups. Use a width that is a multiple of num_groups.')
    if not 0.0 <= self.stoch_depth < 1.0:
      raise ValueError(f'BiT stoch_depth must be in [0, 1), got {self.stoch_depth}.')
    if x.ndim != 4:
      raise ValueError(f'BiT expects NHWC images [batch, height, width, channels], got shape '
                       f'{x.shape}.')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] in float32; with return_features also the pooled features."""
    self._check(x)
    x = StdConv(self.width, (7, 7), (2, 2), eps=self.std_eps, dtype=self.dtype,
                lowering=self.lowering, name='root_conv')(jnp.asarray(x, self.dtype))
    x = fixed_stem_pool(x, self.lowering)
    self.sow('intermediates', 'stem', x)

    total, k = sum(self.stage_sizes), 0
    unit = layers.remat(PreActBottleneck, self.remat, static_argnums=(2,))  # train: static
    for i, num_units in enumerate(self.stage_sizes):
      for j in range(num_units):
        x = unit(
            self.width * 2**i, strides=2 if i > 0 and j == 0 else 1, num_groups=self.num_groups,
            std_eps=self.std_eps, gn_eps=self.gn_eps,
            drop_path=self.stoch_depth * k / max(total - 1, 1), dtype=self.dtype,
            lowering=self.lowering, name=f'stage{i + 1}_unit{j + 1}')(x, train)
        k += 1

    x = nn.relu(nn.GroupNorm(num_groups=self.num_groups, epsilon=self.gn_eps, dtype=self.dtype,
                             use_fast_variance=False, name='norm')(x))
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    # BiT zero-inits its head; float32 whatever the compute dtype (tiny, sets the logits' scale).
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.zeros, dtype=jnp.float32, name='head')(features)
    if return_features:
      return logits, features
    return logits



# 'bit' takes stage_sizes (a tuple) and width from the config; the released sizes fix both
# (R50 = (3, 4, 6, 3), width = 64 * factor).
MODELS.register('bit', ResNetV2, family='bit', generic=True)
for _name, (_depth, _factor) in RELEASED.items():
  MODELS.register(_name, functools.partial(ResNetV2, stage_sizes=STAGE_SIZES[_depth],
                                           width=64 * _factor), family='bit')
