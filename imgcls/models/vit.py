"""Vision Transformer (Dosovitskiy et al., 2021) in Flax Linen, pre-LN as in the paper.

Parameters are named as in google-research/vision_transformer's .npz files, so those map one
to one: embedding (patch conv), cls, Transformer/posembed_input/pos_embedding,
Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_{0,1}}, Transformer/encoder_norm, pre_logits, head. The 'map' pool adds
MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}, as big_vision names it.
Converters to and from other checkpoint layouts: vit_weights.py.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imgcls.models import layers
from imgcls.models.layers import PLAIN, Lowering, drop_path
from imgcls.models.registry import MODELS

# name: (width, depth, mlp_dim, num_heads), the paper's Table 1 plus DeiT's Ti/S and big_vision's M.
VARIANTS = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}
POOLS = ('tok', 'gap', 'map')
POSEMBS = ('learn', 'sincos2d')
DIMS = ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size')
POSEMB_KEY = 'params/Transformer/posembed_input/pos_embedding'  # resized by weights.merge


def block_index(path: str) -> int | None:
  """The encoder block a parameter path ('Transformer/encoderblock_3/...') is in, else None."""
  m = re.search(r'encoderblock_(\d+)/', path)
  return int(m[1]) if m else None


def layer_index(path: str, depth: int) -> int:
  """Layer of a parameter path (without 'params/') for layer-wise lr decay: 0 for the patch and
  position embeddings and the class token, i + 1 for encoder block i, depth + 1 for everything
  after the encoder (final norm, pooling head, pre-logits, head)."""
  block = block_index(path)
  if block is not None:
    return block + 1
  if re.match(r'(embedding|cls|Transformer/posembed_input)(/|$)', path):
    return 0
  return depth + 1


def parse_variant(variant: str) -> dict[str, int]:
  """'B/16' -> {width: 768, depth: 12, mlp_dim: 3072, num_heads: 12, patch_size: 16}."""
  name, sep, patch = variant.partition('/')
  if name not in VARIANTS or not sep or not patch.isdigit() or int(patch) <= 0:
    raise ValueError(f'Unknown ViT variant {variant!r}: expected NAME/PATCH with NAME one of '
                     f'{", ".join(VARIANTS)} and PATCH a positive integer, e.g. "S/16" or "Ti/4".')
  return dict(zip(DIMS, (*VARIANTS[name], int(patch))))


def resolve_dims(variant: str | None = None, **overrides: int | None) -> dict[str, int]:
  """The variant's dimensions with every non-None override applied; all five must end up set."""
  dims = parse_variant(variant) if variant is not None else {}
  dims.update({k: v for k, v in overrides.items() if v is not None})
  missing = [k for k in DIMS if k not in dims]
  if missing:
    raise ValueError(f'ViT needs a variant (e.g. "S/16") or explicit {", ".join(missing)}.')
  if dims['width'] % dims['num_heads']:
    raise ValueError(f'ViT width {dims["width"]} is not divisible by num_heads '
                     f'{dims["num_heads"]}.')
  return dims


def patch_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """LeCun normal (truncated at 2 std, fan_in = kh * kw * in), Flax's default for nn.Conv.

  Drawn flat and reshaped: XLA:CPU compiles a 4-D random draw several times slower.
  """
  fan_in = math.prod(shape[:-1])
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
  return (flat * std).reshape(shape)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches, each linearly projected: a p x p conv of stride p with
  bias, with nn.Conv's parameters (kernel [p, p, in, features], bias); computed by
  `lowering.conv`."""
  features: int
  patch: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    kernel = self.param('kernel', self.kernel_init, (p, p, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
    return self.lowering.conv(x, kernel, (p, p), ((0, 0), (0, 0))) + bias


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding [1, h * w, width]: sin x, cos x, sin y, cos y."""
  if width % 4:
    raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {width}.")
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  y, x = np.mgrid[:h, :w]
  ang_y = y.reshape(-1, 1) * omega
  ang_x = x.reshape(-1, 1) * omega
  emb = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
  return emb[None].astype(np.float32)


def _attention(num_heads: int, dtype: Any, param_dtype: Any, lowering: Lowering,
               dropout: float = 0.0, name: str | None = None) -> nn.MultiHeadDotProductAttention:
  """Multi-head attention as in the official ViT (Xavier kernels); softmax always in float32."""
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dtype=dtype, param_dtype=param_dtype, dropout_rate=dropout,
      broadcast_dropout=False, kernel_init=nn.initializers.xavier_uniform(),
      force_fp32_for_softmax=True, qkv_dot_general=lowering.dot_general,
      out_dot_general=lowering.dot_general, name=name)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(back to the input width), dropout after each Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6),
        dot_general=self.lowering.dot_general, name=name)
    y = layers.gelu(dense(self.mlp_dim, 'Dense_0')(x), approximate=self.approximate_gelu)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)); each branch may be dropped per example."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  lowering: Lowering = PLAIN

  def _drop_path(self, y: jax.Array, deterministic: bool) -> jax.Array:
    return drop_path(self, y, self.drop_path, deterministic)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                     name=name)
    y = norm('LayerNorm_0')(x)
    y = _attention(self.num_heads, self.dtype, self.param_dtype, self.lowering,
                   name='MultiHeadDotProductAttention_1')(y, y, deterministic=True)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = x + self._drop_path(y, deterministic)
    y = norm('LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, self.approximate_gelu,
                 lowering=self.lowering, name='MlpBlock_3')(y, deterministic=deterministic)
    return x + self._drop_path(y, deterministic)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding [1, length, width], initialised N(0, 0.02^2)."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]),
                    self.param_dtype)
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """Optional learned position embedding, dropout, `depth` blocks, final LayerNorm.

  Block i drops its branches with rate stoch_depth * i / (depth - 1): none in the first block.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  stoch_depth: float = 0.0
  learned_posemb: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.learned_posemb:
      x = AddPositionEmbs(self.param_dtype, name='posembed_input')(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    for i in range(self.depth):
      rate = self.stoch_depth * i / max(self.depth - 1, 1)
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout, rate, self.dtype,
                         self.param_dtype, self.approximate_gelu, lowering=self.lowering,
                         name=f'encoderblock_{i}')(x, deterministic=deterministic)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='encoder_norm')(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then a residual MLP."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]),
                       self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = _attention(self.num_heads, self.dtype, self.param_dtype, self.lowering,
                   name='MultiHeadDotProductAttention_0')(probe, x, deterministic=True)
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     approximate_gelu=self.approximate_gelu, lowering=self.lowering,
                     name='MlpBlock_0')(y)
    return x[:, 0]


class ViT(nn.Module):
  """Vision Transformer. Give `variant` ('NAME/PATCH': 'B/16', 'Ti/4', ...) and/or explicit
  width, depth, mlp_dim, num_heads, patch_size (explicit ones win).

  pool: 'tok' (class token), 'gap' (mean of the tokens) or 'map' (attention pooling).
  posemb: 'learn' (added after the class token is prepended, as the official ViT) or
  'sincos2d' (fixed, added to the patches only). `dtype` is the compute dtype; parameters
  are kept in `param_dtype` and logits are float32. approximate_gelu: the tanh GELU of Flax and
  the official JAX checkpoints (default); False gives the exact erf GELU of timm/PyTorch, for
  logit-level parity with timm. `lowering`: how the patch conv and the encoder's matmuls are
  computed (layers.Lowering).
  """
  num_classes: int = 1000
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  pool: str = 'tok'
  posemb: str = 'learn'
  representation_size: int | None = None
  dropout: float = 0.0
  stoch_depth: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  head_zero_init: bool = True
  approximate_gelu: bool = True
  lowering: Lowering = PLAIN

  def dims(self) -> dict[str, int]:
    """width, depth, mlp_dim, num_heads, patch_size after applying the overrides."""
    return resolve_dims(self.variant, **{k: getattr(self, k) for k in DIMS})

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] in float32; with return_features also the pre-logits features."""
    if self.pool not in POOLS:
      raise ValueError(f'Unknown pool {self.pool!r}; expected one of {POOLS}.')
    if self.posemb not in POSEMBS:
      raise ValueError(f'Unknown posemb {self.posemb!r}; expected one of {POSEMBS}.')
    for key in ('dropout', 'stoch_depth'):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f'ViT {key} must be in [0, 1), got {getattr(self, key)}.')
    d = self.dims()
    p = d['patch_size']
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'Image size {x.shape[1]}x{x.shape[2]} is not divisible by the patch '
                       f'size {p}.')

    x = jnp.asarray(x, self.dtype)
    x = PatchEmbed(d['width'], p, kernel_init=patch_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, lowering=self.lowering, name='embedding')(x)
    n, gh, gw, c = x.shape
    x = x.reshape(n, gh * gw, c)
    if self.posemb == 'sincos2d':
      x = x + jnp.asarray(posemb_sincos_2d(gh, gw, c), x.dtype)
    if self.pool == 'tok':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)

    x = Encoder(d['depth'], d['mlp_dim'], d['num_heads'], self.dropout, self.stoch_depth,
                learned_posemb=self.posemb == 'learn', dtype=self.dtype,
                param_dtype=self.param_dtype, approximate_gelu=self.approximate_gelu,
                lowering=self.lowering, name='Transformer')(x, deterministic=not train)

    if self.pool == 'tok':
      x = x[:, 0]
    elif self.pool == 'gap':
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(d['mlp_dim'], d['num_heads'], self.dtype, self.param_dtype,
                  self.approximate_gelu, lowering=self.lowering, name='MAPHead_0')(x)
    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='pre_logits')(x))

    features = x.astype(jnp.float32)
    head_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
    # The head runs in float32 whatever the compute dtype: it is tiny and sets the logits' scale.
    logits = nn.Dense(self.num_classes, kernel_init=head_init, dtype=jnp.float32,
                      param_dtype=self.param_dtype, name='head')(features)
    if return_features:
      return logits, features
    return logits


# 'vit' takes the variant ('NAME/PATCH', e.g. 'S/4') or explicit sizes from the config.
MODELS.register('vit', ViT, family='vit', generic=True)
for _name, _variant in (('vit_ti16', 'Ti/16'), ('vit_s16', 'S/16'), ('vit_b16', 'B/16'),
                        ('vit_l16', 'L/16'), ('vit_b32', 'B/32')):
  MODELS.register(_name, functools.partial(ViT, variant=_variant), family='vit')
