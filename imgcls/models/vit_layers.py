"""The ViT's building blocks (patch embedding, attention, MLP kinds, encoder block, encoder
with remat/scan, MAP head) and the stacking of block parameters that scan=True compiles over."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgcls.models import layers
from imgcls.models.layers import PLAIN, Lowering, drop_path
from imgcls.models.posemb import resample_posemb

ACTS = ('gelu', 'gelu_tanh', 'quick_gelu', 'silu')
MLP_TYPES = ('mlp', 'swiglu_packed', 'swiglu')



def block_index(path: str) -> int | None:
  """The encoder block a parameter path ('Transformer/encoderblock_3/...') is in, else None."""
  m = re.search(r'encoderblock_(\d+)/', path)
  return int(m[1]) if m else None


SCANNED_BLOCK = 'encoderblock'  # the one block scan=True compiles, its params stacked


def stack_blocks(variables: dict[str, Any]) -> dict[str, Any]:
  """An Encoder's variables with encoderblock_0 .. encoderblock_{n-1} stacked on a leading axis
  into SCANNED_BLOCK (what the scanned encoder reads); other entries as they are."""
  out = {}
  for col, tree in variables.items():
    blocks = sorted((int(k.rpartition('_')[2]), v) for k, v in tree.items()
                    if re.fullmatch(r'encoderblock_\d+', k))
    rest = {k: v for k, v in tree.items() if not re.fullmatch(r'encoderblock_\d+', k)}
    if blocks:
      rest[SCANNED_BLOCK] = jax.tree.map(lambda *xs: jnp.stack(xs), *[v for _, v in blocks])
    out[col] = rest
  return out


def unstack_blocks(variables: dict[str, Any]) -> dict[str, Any]:
  """stack_blocks' inverse: SCANNED_BLOCK split along its leading axis into encoderblock_{i}."""
  out = {}
  for col, tree in variables.items():
    tree = dict(tree)
    stacked = tree.pop(SCANNED_BLOCK, None)
    if stacked is not None:
      depth = jax.tree.leaves(stacked)[0].shape[0]
      for i in range(depth):
        tree[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
    out[col] = tree
  return out




def patch_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """LeCun normal (truncated at 2 std, fan_in = kh * kw * in), Flax's default for nn.Conv.

  Drawn flat and reshaped: XLA:CPU compiles a 4-D random draw several times slower.
  """
  fan_in = math.prod(shape[:-1])
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
  return (flat * std).reshape(shape)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches, each linearly projected: a p x p conv of stride p, with
  nn.Conv's parameters (kernel [p, p, in, features], bias unless use_bias=False, as CLIP);
  computed by `lowering.conv`. Pixels past the last whole patch are dropped, as torch's conv."""
  features: int
  patch: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    kernel = self.param('kernel', self.kernel_init, (p, p, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    y = self.lowering.conv(x, kernel, (p, p), ((0, 0), (0, 0)))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def activation(name: str):
  """The MLP activation of ACTS: exact (erf) GELU, tanh GELU, QuickGELU x * sigmoid(1.702 x)
  (OpenAI CLIP), SiLU (SwiGLU's gate)."""
  if name == 'gelu':
    return functools.partial(layers.gelu, approximate=False)
  if name == 'gelu_tanh':
    return functools.partial(layers.gelu, approximate=True)
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'silu':
    return jax.nn.silu
  raise ValueError(f'Unknown ViT act {name!r}; expected one of {", ".join(ACTS)}.')


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with the parameters of flax's MultiHeadDotProductAttention
  (query/key/value kernels [D, H, Dh], out [H, Dh, D]; Xavier init), q/k/v biases optional
  (`qkv_bias`, timm's), the output bias always; softmax in float32."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array) -> jax.Array:
    width = inputs_kv.shape[-1]
    dense = functools.partial(
        nn.DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), dot_general=self.lowering.dot_general)
    heads = (self.num_heads, width // self.num_heads)
    q = dense(heads, use_bias=self.qkv_bias, name='query')(inputs_q)
    k = dense(heads, use_bias=self.qkv_bias, name='key')(inputs_kv)
    v = dense(heads, use_bias=self.qkv_bias, name='value')(inputs_kv)
    y = nn.dot_product_attention(q, k, v, dtype=self.dtype, force_fp32_for_softmax=True)
    return dense(width, axis=(-2, -1), name='out')(y)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> act -> Dense(back to the input width), dropout after each Dense.

  mlp_type 'swiglu_packed' (timm SwiGLUPacked, DINOv2-g): Dense_0 gives mlp_dim units, its first
  half through `act` gates the second, Dense_1 maps mlp_dim / 2 back. 'swiglu' (timm SwiGLU):
  act(gate(x)) * Dense_0(x), both mlp_dim wide. act None: tanh GELU if approximate_gelu, else
  the exact one.
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  act: str | None = None
  mlp_type: str = 'mlp'
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f'Unknown ViT mlp_type {self.mlp_type!r}; expected one of '
                       f'{", ".join(MLP_TYPES)}.')
    act = activation(self.act or ('gelu_tanh' if self.approximate_gelu else 'gelu'))
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6),
        dot_general=self.lowering.dot_general, name=name)
    if self.mlp_type == 'mlp':
      y = act(dense(self.mlp_dim, 'Dense_0')(x))
    elif self.mlp_type == 'swiglu_packed':
      if self.mlp_dim % 2:
        raise ValueError(f"mlp_type='swiglu_packed' needs an even mlp_dim, got {self.mlp_dim}.")
      gate, y = jnp.split(dense(self.mlp_dim, 'Dense_0')(x), 2, axis=-1)
      y = act(gate) * y
    else:
      y = act(dense(self.mlp_dim, 'gate')(x)) * dense(self.mlp_dim, 'Dense_0')(x)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + ls1 * attn(LN(x)), then x + ls2 * mlp(LN(x)); each branch may be dropped
  per example. LayerScale (ls1, ls2: per-channel params) only with init_values set."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  act: str | None = None
  mlp_type: str = 'mlp'
  init_values: float | None = None
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  lowering: Lowering = PLAIN

  def _branch(self, y: jax.Array, index: int, deterministic: bool, rate: Any) -> jax.Array:
    if self.init_values is not None:
      scale = self.param(f'layer_scale_{index}', nn.initializers.constant(self.init_values),
                         (y.shape[-1],), self.param_dtype)
      y = y * scale.astype(y.dtype)
    return drop_path(self, y, self.drop_path if rate is None else rate, deterministic)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               drop_rate: jax.Array | None = None) -> jax.Array:
    """drop_rate: this block's stochastic-depth rate when given (a scanned input), else
    the `drop_path` field."""
    norm = lambda name: nn.LayerNorm(self.norm_eps, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, use_fast_variance=False,
                                     name=name)
    y = norm('LayerNorm_0')(x)
    y = MultiHeadAttention(self.num_heads, self.qkv_bias, self.dtype, self.param_dtype,
                           lowering=self.lowering, name='MultiHeadDotProductAttention_1')(y, y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = x + self._branch(y, 1, deterministic, drop_rate)
    y = norm('LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, self.approximate_gelu,
                 act=self.act, mlp_type=self.mlp_type, lowering=self.lowering,
                 name='MlpBlock_3')(y, deterministic=deterministic)
    return x + self._branch(y, 2, deterministic, drop_rate)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding, initialised N(0, 0.02^2), to all but the first `skip`
  tokens (timm's no_embed_class: prefix tokens without one). The parameter holds
  `embedded_prefix` prefix rows then a `param_grid` grid; when the input's patch grid `grid`
  differs (dynamic image size), the grid part is resized with `resize` at run time."""
  param_dtype: Any = jnp.float32
  skip: int = 0
  grid: tuple[int, int] | None = None
  param_grid: tuple[int, int] | None = None
  resize: str = 'bicubic_timm'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    length = x.shape[1] - self.skip
    grid = tuple(self.grid) if self.grid else None
    param_grid = tuple(self.param_grid) if self.param_grid else grid
    embedded_prefix = length - (math.prod(grid) if grid else 0)
    shape = (1, embedded_prefix + math.prod(param_grid), x.shape[-1]) if grid else (1, length,
                                                                                   x.shape[-1])
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape,
                    self.param_dtype)
    if grid and param_grid != grid:
      pe = resample_posemb(pe, embedded_prefix, param_grid, grid, self.resize)
    pe = pe.astype(x.dtype)
    if self.skip:
      return jnp.concatenate([x[:, :self.skip], x[:, self.skip:] + pe], axis=1)
    return x + pe


class Encoder(nn.Module):
  """Optional learned position embedding, dropout, optional pre-norm (CLIP), `depth` blocks,
  final LayerNorm (not with final_norm=False: the ViT's fc_norm comes after pooling instead).

  Block i drops its branches with rate stoch_depth * i / (depth - 1): none in the first block.
  posemb_skip / grid / posemb_grid / posemb_resize: see AddPositionEmbs.
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
  act: str | None = None
  mlp_type: str = 'mlp'
  init_values: float | None = None
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  pre_norm: bool = False
  final_norm: bool = True
  posemb_skip: int = 0
  grid: tuple[int, int] | None = None
  posemb_grid: tuple[int, int] | None = None
  posemb_resize: str = 'bicubic_timm'
  remat: str = ''
  scan: bool = False
  lowering: Lowering = PLAIN

  def _norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        use_fast_variance=False, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.learned_posemb:
      x = AddPositionEmbs(self.param_dtype, self.posemb_skip, self.grid, self.posemb_grid,
                          self.posemb_resize, name='posembed_input')(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    if self.pre_norm:
      x = self._norm('norm_pre')(x)
    # deterministic is static (a Python flag) under remat; under scan the same remat'd block
    # is the scan body, so prevent_cse can be off (jax.checkpoint's advice for loops).
    block = functools.partial(
        layers.remat(Encoder1DBlock, self.remat, static_argnums=(2,), prevent_cse=not self.scan),
        self.mlp_dim, self.num_heads, self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, approximate_gelu=self.approximate_gelu, act=self.act,
        mlp_type=self.mlp_type, init_values=self.init_values, qkv_bias=self.qkv_bias,
        norm_eps=self.norm_eps, lowering=self.lowering)
    rates = [self.stoch_depth * i / max(self.depth - 1, 1) for i in range(self.depth)]
    if self.scan:  # one block, parameters stacked on a leading axis, per-layer rate scanned
      body = lambda blk, x, rate: (  # noqa: E731  (no rng drawn when there is no rate)
          blk(x, deterministic, rate if self.stoch_depth else None), None)
      x, _ = nn.scan(body, variable_axes={'params': 0},
                     split_rngs={'params': True, 'dropout': True}, length=self.depth)(
                         block(name=SCANNED_BLOCK), x, jnp.asarray(rates, jnp.float32))
    else:
      for i, rate in enumerate(rates):
        x = block(drop_path=rate, name=f'encoderblock_{i}')(x, deterministic)
    return self._norm('encoder_norm')(x) if self.final_norm else x


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then a residual MLP
  (big_vision's MAPHead, timm's AttentionPoolLatent)."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  approximate_gelu: bool = True
  act: str | None = None
  norm_eps: float = 1e-6
  lowering: Lowering = PLAIN

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]),
                       self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           lowering=self.lowering, name='MultiHeadDotProductAttention_0')(probe, x)
    y = nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     use_fast_variance=False, name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     approximate_gelu=self.approximate_gelu, act=self.act,
                     lowering=self.lowering, name='MlpBlock_0')(y)
    return x[:, 0]
