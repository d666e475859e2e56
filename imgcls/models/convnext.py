"""ConvNeXt v1 (Liu et al., 2022) and v2 (Woo et al., 2023) in Flax Linen, laid out like timm's.

v1 block: depthwise 7x7 conv -> LayerNorm -> Dense 4x -> GELU -> Dense back -> LayerScale ->
stochastic depth + residual. v2 puts global response normalisation (GRN) after the GELU and
drops LayerScale. Stem: 4x4/4 patchify conv + LayerNorm; between stages LayerNorm + 2x2/2 conv;
head: global average pool, LayerNorm, Dense.

Name map (timm -> here): stem.0/1 -> stem_conv/stem_norm; stages.{i}.downsample.0/1 ->
stage{i+1}_down_norm/stage{i+1}_down_conv; stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1,
mlp.grn, mlp.fc2, gamma} -> stage{i+1}_block{j+1}/{conv_dw, norm, fc1, grn, fc2, layer_scale};
head.norm/head.fc -> head_norm/head (the converter: convnext_weights.py). timm's small sizes
(atto..nano) use 1x1 convs for the MLP (`conv_mlp`): the same math, kept as 1x1 conv kernels
here so their state dicts go both ways unchanged. The hardware-sensitive ops (dense convs,
matmuls) go through the `lowering` field (layers.Lowering), as in every family.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgcls.models import layers
from imgcls.models.layers import PLAIN, Lowering
from imgcls.models.registry import MODELS

# size: (depths, dims, conv_mlp), as timm's convnext_* / convnextv2_* entry points define them.
VARIANTS = {
    'atto': ((2, 2, 6, 2), (40, 80, 160, 320), True),
    'femto': ((2, 2, 6, 2), (48, 96, 192, 384), True),
    'pico': ((2, 2, 6, 2), (64, 128, 256, 512), True),
    'nano': ((2, 2, 8, 2), (80, 160, 320, 640), True),
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768), False),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768), False),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024), False),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536), False),
    'xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048), False),
    'xxlarge': ((3, 4, 30, 3), (384, 768, 1536, 3072), False),
    'huge': ((3, 3, 27, 3), (352, 704, 1408, 2816), False),
}
V1_SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base', 'large', 'xlarge',
            'xxlarge')
V2_SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base', 'large', 'huge')
# The preprocessing the published weights expect (imgcls.data's normalize_preset names).
PREPROCESS = dict(resolution=224, normalize='imagenet')


def trunc_normal_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """timm's trunc_normal_(std=0.02) for ConvNeXt's convs and linears (its +-2 bounds are
  ~100 std away, so this is N(0, 0.02^2)). Drawn flat: XLA:CPU compiles 4-D draws slowly."""
  return (jax.random.normal(key, (math.prod(shape),), dtype) * 0.02).reshape(shape)


class Conv(nn.Module):
  """A square conv with bias and torch's symmetric zero padding; nn.Conv's parameters (kernel
  HWIO, bias). Dense convs are computed by `lowering.conv`; the depthwise one (one group per
  channel) by lax, which every lowering shares."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  depthwise: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', trunc_normal_init,
                        (k, k, 1 if self.depthwise else c, self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
    strides, padding = (self.strides,) * 2, ((self.padding,) * 2,) * 2
    if self.depthwise:
      y = jax.lax.conv_general_dilated(x, kernel, strides, padding, feature_group_count=c,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    else:
      y = self.lowering.conv(x, kernel, strides, padding)
    return y + bias


class GRN(nn.Module):
  """Global response normalisation (ConvNeXt v2): each channel's L2 norm over the image,
  divided by its mean over channels, gates the input: x + beta + gamma * x * n."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    gamma = self.param('gamma', nn.initializers.zeros, (c,), self.param_dtype)
    beta = self.param('beta', nn.initializers.zeros, (c,), self.param_dtype)
    xf = x.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(xf * xf, axis=(1, 2), keepdims=True))
    n = g / (jnp.mean(g, axis=-1, keepdims=True) + self.eps)
    return (xf + beta + gamma * (xf * n)).astype(x.dtype)


class Block(nn.Module):
  """One ConvNeXt block (v1 with layer_scale_init, v2 with grn); see the module docstring."""
  kernel_size: int = 7
  mlp_ratio: int = 4
  conv_mlp: bool = False
  grn: bool = False
  layer_scale_init: float | None = 1e-6
  drop_path: float = 0.0
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lowering: Lowering = PLAIN

  def _linear(self, features: int, name: str) -> nn.Module:
    if self.conv_mlp:
      return Conv(features, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                  lowering=self.lowering, name=name)
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=trunc_normal_init, dot_general=self.lowering.dot_general,
                    name=name)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    c, k = x.shape[-1], self.kernel_size
    y = Conv(c, k, padding=k // 2, depthwise=True, dtype=self.dtype,
             param_dtype=self.param_dtype, lowering=self.lowering, name='conv_dw')(x)
    y = nn.LayerNorm(self.norm_eps, self.dtype, self.param_dtype, use_fast_variance=False,
                     name='norm')(y)
    # timm's exact (erf) GELU; layers.gelu differentiates it inside shard_map.
    y = layers.gelu(self._linear(self.mlp_ratio * c, 'fc1')(y), approximate=False)
    if self.grn:
      y = GRN(param_dtype=self.param_dtype, name='grn')(y)
    y = self._linear(c, 'fc2')(y)
    if self.layer_scale_init is not None:
      scale = self.param('layer_scale', nn.initializers.constant(self.layer_scale_init), (c,),
                         self.param_dtype)
      y = y * scale.astype(y.dtype)
    return x + layers.drop_path(self, y, self.drop_path, deterministic)


class ConvNeXt(nn.Module):
  """ConvNeXt. Give `variant` (a key of VARIANTS: 'atto' ... 'huge') and/or explicit depths,
  dims and conv_mlp (explicit ones win). v2 is grn=True, layer_scale_init=None.

  stoch_depth: the last block's drop rate, rising linearly from 0 over all blocks (timm's
  drop_path_rate). dropout: before the head. `dtype` is the compute dtype; parameters are kept
  in `param_dtype` and logits are float32. `lowering`: how convs and matmuls are computed
  (layers.PLAIN unless models.from_config passes the CPU kernels); the same values either way.
  `remat`: a layers.REMAT_POLICIES name; each block's activations are then recomputed in the
  backward pass (same parameters and values, less memory).
  """
  num_classes: int = 1000
  variant: str | None = None
  depths: Sequence[int] | None = None
  dims: Sequence[int] | None = None
  conv_mlp: bool | None = None
  grn: bool = False
  layer_scale_init: float | None = 1e-6
  kernel_size: int = 7
  patch_size: int = 4
  norm_eps: float = 1e-6
  stoch_depth: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = ''
  lowering: Lowering = PLAIN

  def __post_init__(self):
    layers.check_remat(self.remat)
    super().__post_init__()

  def sizes(self) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(depths, dims, conv_mlp) after applying the explicit arguments to the variant."""
    if self.variant is not None and self.variant not in VARIANTS:
      raise ValueError(f'Unknown ConvNeXt variant {self.variant!r}; expected one of '
                       f'{", ".join(VARIANTS)}.')
    depths, dims, conv_mlp = VARIANTS.get(self.variant, (None, None, False))
    depths = tuple(self.depths) if self.depths is not None else depths
    dims = tuple(self.dims) if self.dims is not None else dims
    conv_mlp = self.conv_mlp if self.conv_mlp is not None else conv_mlp
    if depths is None or dims is None:
      raise ValueError('ConvNeXt needs a variant (e.g. "tiny") or explicit depths and dims.')
    if len(depths) != len(dims):
      raise ValueError(f'ConvNeXt depths {depths} and dims {dims} must have one entry per stage.')
    return depths, dims, conv_mlp

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] in float32; with return_features also the pre-logits features
    (pooled and normalised, timm's forward_head(pre_logits=True))."""
    for key in ('dropout', 'stoch_depth'):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f'ConvNeXt {key} must be in [0, 1), got {getattr(self, key)}.')
    depths, dims, conv_mlp = self.sizes()
    norm = functools.partial(nn.LayerNorm, self.norm_eps, self.dtype, self.param_dtype,
                             use_fast_variance=False)
    conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype,
                             lowering=self.lowering)

    p = self.patch_size
    x = jnp.asarray(x, self.dtype)
    x = conv(dims[0], p, p, name='stem_conv')(x)
    x = norm(name='stem_norm')(x)
    total, done = sum(depths), 0
    block = layers.remat(Block, self.remat, static_argnums=(2,))  # deterministic: static
    for i, (depth, dim) in enumerate(zip(depths, dims)):
      if i > 0:
        x = norm(name=f'stage{i + 1}_down_norm')(x)
        x = conv(dim, 2, 2, name=f'stage{i + 1}_down_conv')(x)
      for j in range(depth):
        rate = self.stoch_depth * done / max(total - 1, 1)
        x = block(self.kernel_size, conv_mlp=conv_mlp, grn=self.grn,
                  layer_scale_init=self.layer_scale_init, drop_path=rate,
                  norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  lowering=self.lowering, name=f'stage{i + 1}_block{j + 1}')(x, not train)
        done += 1

    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.LayerNorm(self.norm_eps, jnp.float32, self.param_dtype, use_fast_variance=False,
                     name='head_norm')(x)
    y = nn.Dropout(self.dropout)(x, deterministic=not train)
    # The head runs in float32 whatever the compute dtype: it is tiny and sets the logits' scale.
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                      kernel_init=trunc_normal_init, dot_general=self.lowering.dot_general,
                      name='head')(y)
    if return_features:
      return logits, x
    return logits


# 'convnext' takes a variant or explicit depths/dims from the config; the rest are timm's names.
MODELS.register('convnext', ConvNeXt, family='convnext', generic=True, **PREPROCESS)
for _size in V1_SIZES:
  MODELS.register(f'convnext_{_size}', functools.partial(
      ConvNeXt, variant=_size, norm_eps=1e-5 if _size == 'xxlarge' else 1e-6),
      family='convnext', **PREPROCESS)
for _size in V2_SIZES:
  MODELS.register(f'convnextv2_{_size}', functools.partial(
      ConvNeXt, variant=_size, grn=True, layer_scale_init=None), family='convnext',
      **PREPROCESS)
