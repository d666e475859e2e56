"""ResNet v1.5 in Flax Linen, laid out like torchvision's so its weights map one to one.

Name map (torchvision -> here): conv1/bn1 -> conv_init/bn_init; layer{i}.{j}.conv{k}/bn{k} ->
stage{i}_block{j+1}/conv{k}/bn{k}; layer{i}.{j}.downsample.0/1 -> .../proj_conv/proj_bn; fc -> head
(the converter: resnet_weights.py).
Convolutions pad symmetrically by kernel // 2, as torch does, so strided outputs line up too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgcls.models import layers
from imgcls.models.layers import PLAIN, Lowering
from imgcls.models.registry import MODELS

ModuleDef = Callable[..., nn.Module]

STEMS = ('imagenet', 'small', 'small_s2')


def conv_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """torchvision's kaiming_normal_(mode='fan_out'): N(0, 2 / (kh * kw * out)), untruncated.

  Drawn flat and reshaped (same values): XLA:CPU compiles a 4-D threefry draw much slower.
  """
  fan_out = math.prod(shape[:-2]) * shape[-1]
  std = math.sqrt(2.0 / fan_out)
  return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)


class Conv(nn.Module):
  """Bias-free conv padded by kernel // 2 each side, as torch; params exactly as nn.Conv's;
  computed by `lowering.conv`."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = conv_init
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features))
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    return self.lowering.conv(x, kernel, self.strides, ((kh // 2, kh // 2), (kw // 2, kw // 2)))


def _shortcut(x: jax.Array, features: int, strides: int, conv: ModuleDef,
              norm: ModuleDef) -> jax.Array:
  """Identity, or a 1x1 strided conv + BN when the shape changes (call inside a compact method)."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = conv(features, (1, 1), (strides, strides), name='proj_conv')(x)
  return norm(name='proj_bn')(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init: bool = True
  lowering: Lowering = PLAIN
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    relu = self.lowering.relu
    s = (self.strides, self.strides)
    y = self.conv(self.features, (3, 3), s, name='conv1')(x)
    y = relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    last_scale = nn.initializers.zeros if self.zero_init else nn.initializers.ones
    y = self.norm(name='bn2', scale_init=last_scale)(y)
    return relu(y + _shortcut(x, self.features, self.strides, self.conv, self.norm))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (carries the stride, v1.5) -> 1x1 expanding 4x (ResNet-50/101/152)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init: bool = True
  lowering: Lowering = PLAIN
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    relu = self.lowering.relu
    out = self.features * self.expansion
    y = self.conv(self.features, (1, 1), name='conv1')(x)
    y = relu(self.norm(name='bn1')(y))
    s = (self.strides, self.strides)
    y = self.conv(self.features, (3, 3), s, name='conv2')(y)
    y = relu(self.norm(name='bn2')(y))
    y = self.conv(out, (1, 1), name='conv3')(y)
    last_scale = nn.initializers.zeros if self.zero_init else nn.initializers.ones
    y = self.norm(name='bn3', scale_init=last_scale)(y)
    return relu(y + _shortcut(x, out, self.strides, self.conv, self.norm))


class ResNet(nn.Module):
  """ResNet v1.5. `width`: stage 1's channels. `stem`: 'imagenet' (7x7/2 + max-pool, /4),
  'small' (3x3/1, no pool: full resolution for 28-64 px) or 'small_s2' (3x3/2, no pool).
  `lowering`: how convs, ReLUs and the pool are computed (layers.Lowering). `remat`: a
  layers.REMAT_POLICIES name; each block's activations are then recomputed in the backward
  pass (same parameters and values, less memory)."""
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int = 1000
  width: int = 64
  stem: str = 'imagenet'
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = 'batch'
  zero_init_residual: bool = True
  remat: str = ''
  lowering: Lowering = PLAIN

  def __post_init__(self):
    layers.check_remat(self.remat)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] in float32; with return_features also the pooled features."""
    if self.stem not in STEMS:
      raise ValueError(f'Unknown stem {self.stem!r}; expected one of {STEMS}.')
    relu = self.lowering.relu
    conv = functools.partial(Conv, dtype=self.dtype, lowering=self.lowering)
    # Statistics are averaged over bn_axis_name only when training; eval and init do no collective.
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype,
        axis_name=self.bn_axis_name if train else None)

    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), name='conv_init')(x)
      x = relu(norm(name='bn_init')(x))
      x = self.lowering.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    else:  # small: 3x3/1, full resolution; small_s2: 3x3/2 (28 px -> 14, a quarter the pixels)
      s = 2 if self.stem == 'small_s2' else 1
      x = conv(self.width, (3, 3), (s, s), name='conv_init')(x)
      x = relu(norm(name='bn_init')(x))

    block = layers.remat(self.block, self.remat)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block(self.width * 2**i, strides, conv, norm,
                       zero_init=self.zero_init_residual, lowering=self.lowering,
                       name=f'stage{i + 1}_block{j + 1}')(x)

    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block=Bottleneck)

for _name, _factory in (('resnet18', ResNet18), ('resnet34', ResNet34), ('resnet50', ResNet50),
                        ('resnet101', ResNet101), ('resnet152', ResNet152)):
  MODELS.register(_name, _factory, family='resnet')
# One BasicBlock per stage (timm's resnet10t depth): tiny runs, tests, quick ablations.
MODELS.register('resnet10', functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock),
                family='resnet')
