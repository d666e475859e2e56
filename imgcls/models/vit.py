"""Vision Transformer (Dosovitskiy et al., 2021) in Flax Linen, pre-LN as in the paper, with the
options of today's backbones (DINOv2, SigLIP / SigLIP 2, CLIP) as arguments of the one family.

Parameters are named as in google-research/vision_transformer's .npz files, so those map one
to one: embedding (patch conv), cls, Transformer/posembed_input/pos_embedding,
Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_{0,1}}, Transformer/encoder_norm, pre_logits, head. The 'map' pool adds
MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}, as big_vision names it.
The options add: reg (register tokens), Transformer/norm_pre (CLIP's pre-norm),
encoderblock_{i}/layer_scale_{1,2} (LayerScale), MlpBlock_3/gate (unpacked SwiGLU's gate),
fc_norm (norm after pooling). Converters to and from other checkpoint layouts: vit_weights.py;
timm's model names are registered at the end of this file with their options.
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

# name: (width, depth, mlp_dim, num_heads), the paper's Table 1 plus DeiT's Ti/S, big_vision's M,
# and ViT-g / ViT-G of Zhai et al., "Scaling Vision Transformers" (2022), Table 2.
VARIANTS = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
    # The timm backbones' own shapes: SigLIP's shape-optimised So400m (Alabdulmohsin et al.,
    # 2023) and giant-opt (SigLIP 2), DINOv2's ViT-g (SwiGLU, mlp_dim = the packed fc1 width).
    'So400m': (1152, 27, 4304, 16),
    'giantopt': (1536, 40, 6144, 16),
    'dinov2_g': (1536, 40, 8192, 24),
}
POOLS = ('tok', 'gap', 'map')
POSEMBS = ('learn', 'sincos2d')
ACTS = ('gelu', 'gelu_tanh', 'quick_gelu', 'silu')
MLP_TYPES = ('mlp', 'swiglu_packed', 'swiglu')
DIMS = ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size')
POSEMB_KEY = 'params/Transformer/posembed_input/pos_embedding'  # resized by weights.merge
# How a position-embedding grid is resized (resample_posemb): jax.image.resize's 'bilinear' and
# 'bicubic'; torch's F.interpolate bicubic (align_corners=False) with antialias, as timm's
# resample_abs_pos_embed does by default ('bicubic_timm': on load and for dynamic_img_size), or
# without ('bicubic_torch'); scipy.ndimage.zoom(order=1) as vision_transformer and big_vision
# resize on load ('zoom_linear': corners aligned).
POSEMB_RESIZE_METHODS = ('bilinear', 'bicubic', 'bicubic_timm', 'bicubic_torch', 'zoom_linear')


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


def layer_index(path: str, depth: int) -> int:
  """Layer of a parameter path (without 'params/') for layer-wise lr decay: 0 for the patch and
  position embeddings, the class and register tokens and the pre-norm (timm's 'stem' group),
  i + 1 for encoder block i, depth + 1 for everything after the encoder (final norm, pooling
  head, fc_norm, pre-logits, head)."""
  block = block_index(path)
  if block is not None:
    return block + 1
  if re.match(r'(embedding|cls|reg|Transformer/posembed_input|Transformer/norm_pre)(/|$)', path):
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


# ----------------------------------------------------------------- position-embedding resize


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: -0.75, PIL and antialias: -0.5)."""
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def resample_weights(old: int, new: int, method: str) -> np.ndarray:
  """[new, old] float64 matrix W of a 1-D resize (out = W @ in) as `method` computes it (one of
  the separable POSEMB_RESIZE_METHODS other than jax's): the same taps, weights and borders."""
  w = np.zeros((new, old))
  scale = old / new
  if method == 'bicubic_torch':  # aten upsample_bicubic2d, align_corners=False
    for i in range(new):
      real = scale * (i + 0.5) - 0.5
      x0 = math.floor(real)
      t = real - x0
      for k, weight in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
        w[i, min(max(x0 + k, 0), old - 1)] += weight
  elif method == 'bicubic_timm':  # aten _upsample_bicubic2d_aa (PIL's filter), align_corners=False
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(new):
      center = scale * (i + 0.5)
      xmin = max(int(center - support + 0.5), 0)
      xmax = min(int(center + support + 0.5), old)
      taps = _cubic((np.arange(xmin, xmax) - center + 0.5) * invscale, -0.5)
      w[i, xmin:xmax] = taps / taps.sum()
  elif method == 'zoom_linear':  # scipy.ndimage.zoom(order=1): corners aligned
    for i in range(new):
      real = i * (old - 1) / (new - 1) if new > 1 else 0.0
      x0 = min(int(math.floor(real)), old - 1)
      t = real - x0
      w[i, x0] += 1 - t
      if t > 0:
        w[i, x0 + 1] += t
  else:
    raise ValueError(f'Unknown separable resize {method!r}.')
  return w


def resample_grid(grid: Any, new_grid: Sequence[int], method: str) -> Any:
  """Resizes an [h, w, D] grid (numpy, or jax inside a model) to new_grid with `method`."""
  if method in ('bilinear', 'bicubic'):
    out = jax.image.resize(jnp.asarray(grid, jnp.float32), (*new_grid, grid.shape[-1]),
                           method=method, antialias=False)
    return np.asarray(out, grid.dtype) if isinstance(grid, np.ndarray) else out.astype(grid.dtype)
  if method not in POSEMB_RESIZE_METHODS:
    raise ValueError(f'Unknown position-embedding resize {method!r}; expected one of '
                     f'{", ".join(POSEMB_RESIZE_METHODS)}.')
  wh, ww = (resample_weights(o, n, method) for o, n in zip(grid.shape[:2], new_grid))
  if isinstance(grid, np.ndarray):
    out = np.einsum('ih,hwc,jw->ijc', wh, grid.astype(np.float64), ww)
    return out.astype(grid.dtype)
  out = jnp.einsum('ih,hwc,jw->ijc', jnp.asarray(wh, jnp.float32), grid.astype(jnp.float32),
                   jnp.asarray(ww, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid.dtype)


def resample_posemb(posemb: Any, num_prefix: int, old_grid: Sequence[int],
                    new_grid: Sequence[int], method: str) -> Any:
  """[1, prefix + h * w, D] -> [1, prefix + h' * w', D]: the grid resized, prefix tokens kept
  (timm's resample_abs_pos_embed with num_prefix_tokens)."""
  xp = np if isinstance(posemb, np.ndarray) else jnp
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  grid = resample_grid(grid.reshape(*old_grid, -1), new_grid, method)
  return xp.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


def posemb_prefix(template: Any, old_len: int, new_len: int,
                  grid: Sequence[int] | None = None) -> int:
  """How many prefix tokens (class, registers) both a checkpoint's position embedding of
  old_len rows and the model's of new_len rows hold, from the model's flat variables
  ('params/cls', 'params/reg'): all of the prefix tokens, or none (no_embed_class), whichever
  leaves both grids whole (square, or new_len's `grid`). timm decides it from the model the
  same way (no_embed_class, num_prefix_tokens)."""
  prefix = int('params/cls' in template)
  if 'params/reg' in template:
    prefix += int(template['params/reg'].shape[1])
  if not prefix:
    return 0

  def whole(n: int, target: Sequence[int] | None = None) -> bool:
    if n <= 0:
      return False
    return n == math.prod(target) if target else math.isqrt(n) ** 2 == n

  fits = [p for p in (prefix, 0) if whole(old_len - p) and whole(new_len - p, grid)]
  if len(fits) != 1:
    raise ValueError(
        f'Cannot tell whether the position embeddings ({old_len} rows in the checkpoint, '
        f'{new_len} in the model) include the {prefix} class/register tokens: pass grid=(rows, '
        'cols) of the model.')
  return fits[0]


# ----------------------------------------------------------------------------- modules


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


def _pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
  if size is None:
    return None
  return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(size)


class ViT(nn.Module):
  """Vision Transformer. Give `variant` ('NAME/PATCH': 'B/16', 'Ti/4', ...) and/or explicit
  width, depth, mlp_dim, num_heads, patch_size (explicit ones win).

  pool: 'tok' (class token), 'gap' (mean of the patch tokens) or 'map' (attention pooling over
  the patch tokens). posemb: 'learn' (added after the class token is prepended, as the official
  ViT) or 'sincos2d' (fixed, added to the patches only). `dtype` is the compute dtype;
  parameters are kept in `param_dtype` and logits are float32. approximate_gelu: the tanh GELU
  of Flax and the official JAX checkpoints (default); False gives the exact erf GELU of
  timm/PyTorch. `lowering`: how the patch conv and the encoder's matmuls are computed
  (layers.Lowering).

  The options of today's backbones (timm's argument in brackets):
    class_token [class_token]: None = with pool 'tok' only; reg_tokens [reg_tokens]: register
    tokens after it; no_embed_class [no_embed_class]: the position embedding covers the patches
    only; pre_norm [pre_norm, CLIP]; init_values [init_values]: LayerScale; act [act_layer]:
    one of ACTS, None = from approximate_gelu; mlp_type [mlp_layer]: 'mlp', 'swiglu_packed'
    (SwiGLUPacked, mlp_dim = its fc1 width), 'swiglu'; fc_norm [fc_norm]: the final norm after
    pooling instead of before; qkv_bias [qkv_bias]; patch_bias (False with pre_norm in timm);
    norm_eps (timm 1e-6, CLIP 1e-5); strict_img_size: False lets the patch conv drop pixels past
    the last whole patch (timm's so400m/14 at 384); img_size [img_size] with dynamic_img_size
    [dynamic_img_size]: the position embedding is built for img_size and resized at run time
    (posemb_resize, timm's antialiased bicubic) to the input's grid.

  Memory and compile time (the values and parameters stay the same): remat, a
  layers.REMAT_POLICIES name, recomputes each block's activations in the backward pass; scan
  compiles one block and loops it over stacked parameters (nn.scan). The parameters of a
  scanned ViT keep the unrolled names (encoderblock_0 ... encoderblock_{depth-1}) in every
  variable tree it takes or returns, stacked only inside the encoder, so its state,
  checkpoints and weight files are those of the unscanned ViT. Under scan, stochastic depth
  draws its masks from the scan's split rngs (other masks than unrolled, same rates).
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
  class_token: bool | None = None
  reg_tokens: int = 0
  no_embed_class: bool = False
  pre_norm: bool = False
  init_values: float | None = None
  act: str | None = None
  mlp_type: str = 'mlp'
  fc_norm: bool = False
  qkv_bias: bool = True
  patch_bias: bool = True
  norm_eps: float = 1e-6
  strict_img_size: bool = True
  img_size: int | Sequence[int] | None = None
  dynamic_img_size: bool = False
  posemb_resize: str = 'bicubic_timm'
  remat: str = ''
  scan: bool = False
  lowering: Lowering = PLAIN

  def __post_init__(self):
    layers.check_remat(self.remat)
    super().__post_init__()

  def dims(self) -> dict[str, int]:
    """width, depth, mlp_dim, num_heads, patch_size after applying the overrides."""
    return resolve_dims(self.variant, **{k: getattr(self, k) for k in DIMS})

  def has_class_token(self) -> bool:
    return self.pool == 'tok' if self.class_token is None else bool(self.class_token)

  def num_prefix_tokens(self) -> int:
    """Tokens before the patches: the class token, then the register tokens."""
    return int(self.has_class_token()) + self.reg_tokens

  def _check(self) -> None:
    if self.pool not in POOLS:
      raise ValueError(f'Unknown pool {self.pool!r}; expected one of {POOLS}.')
    if self.posemb not in POSEMBS:
      raise ValueError(f'Unknown posemb {self.posemb!r}; expected one of {POSEMBS}.')
    for key in ('dropout', 'stoch_depth'):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f'ViT {key} must be in [0, 1), got {getattr(self, key)}.')
    if self.pool == 'tok' and not self.has_class_token():
      raise ValueError("pool='tok' needs the class token: set class_token=True or pool "
                       "'gap' or 'map'.")
    if self.act is not None and self.act not in ACTS:
      raise ValueError(f'Unknown ViT act {self.act!r}; expected one of {", ".join(ACTS)}.')
    if self.posemb_resize not in POSEMB_RESIZE_METHODS:
      raise ValueError(f'Unknown posemb_resize {self.posemb_resize!r}; expected one of '
                       f'{", ".join(POSEMB_RESIZE_METHODS)}.')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] in float32; with return_features also the pre-logits features
    (pooled, after fc_norm and pre_logits: what the head reads, timm's pre_logits=True)."""
    self._check()
    d = self.dims()
    p = d['patch_size']
    if self.strict_img_size and (x.shape[1] % p or x.shape[2] % p):
      raise ValueError(f'Image size {x.shape[1]}x{x.shape[2]} is not divisible by the patch '
                       f'size {p}.')
    grid = (x.shape[1] // p, x.shape[2] // p)
    param_grid = _pair(self.img_size)
    if param_grid is not None:
      param_grid = (param_grid[0] // p, param_grid[1] // p)
      if param_grid != grid and not self.dynamic_img_size:
        raise ValueError(
            f'This ViT is built for img_size={self.img_size} ({param_grid[0]}x{param_grid[1]} '
            f'patches) and got {x.shape[1]}x{x.shape[2]} images: set dynamic_img_size=True to '
            'resize its position embedding at run time, or leave img_size unset.')

    x = jnp.asarray(x, self.dtype)
    x = PatchEmbed(d['width'], p, kernel_init=patch_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, use_bias=self.patch_bias,
                   lowering=self.lowering, name='embedding')(x)
    n, gh, gw, c = x.shape
    x = x.reshape(n, gh * gw, c)
    if self.posemb == 'sincos2d':
      x = x + jnp.asarray(posemb_sincos_2d(gh, gw, c), x.dtype)
    prefix = []
    if self.has_class_token():
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c), self.param_dtype)
      prefix.append(jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)))
    if self.reg_tokens:
      reg = self.param('reg', nn.initializers.normal(1e-6), (1, self.reg_tokens, c),
                       self.param_dtype)
      prefix.append(jnp.broadcast_to(reg.astype(x.dtype), (n, self.reg_tokens, c)))
    num_prefix = self.num_prefix_tokens()
    if prefix:
      x = jnp.concatenate([*prefix, x], axis=1)

    # model.scan stacks the blocks inside the encoder only: outside it (state, checkpoints,
    # weight files) the parameters keep their unrolled names (stack_blocks / unstack_blocks).
    encoder = Encoder
    if self.scan:
      encoder = nn.map_variables(Encoder, 'params', stack_blocks, unstack_blocks,
                                 init=self.is_initializing())
    x = encoder(d['depth'], d['mlp_dim'], d['num_heads'], self.dropout, self.stoch_depth,
                learned_posemb=self.posemb == 'learn', dtype=self.dtype,
                param_dtype=self.param_dtype, approximate_gelu=self.approximate_gelu,
                act=self.act, mlp_type=self.mlp_type, init_values=self.init_values,
                qkv_bias=self.qkv_bias, norm_eps=self.norm_eps, pre_norm=self.pre_norm,
                final_norm=not self.fc_norm,
                posemb_skip=num_prefix if self.no_embed_class else 0, grid=grid,
                posemb_grid=param_grid, posemb_resize=self.posemb_resize,
                remat=self.remat, scan=self.scan, lowering=self.lowering,
                name='Transformer')(x, deterministic=not train)

    if self.pool == 'tok':
      x = x[:, 0]
    elif self.pool == 'gap':
      x = jnp.mean(x[:, num_prefix:], axis=1)
    else:
      x = MAPHead(d['mlp_dim'], d['num_heads'], self.dtype, self.param_dtype,
                  self.approximate_gelu, act=self.act, norm_eps=self.norm_eps,
                  lowering=self.lowering, name='MAPHead_0')(x[:, num_prefix:])
    if self.fc_norm:
      x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       use_fast_variance=False, name='fc_norm')(x)
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
# The preprocessing the weights expect comes with each name (imgcls.data's normalize_preset).
MODELS.register('vit', ViT, family='vit', generic=True)
for _name, _variant in (('vit_ti16', 'Ti/16'), ('vit_s16', 'S/16'), ('vit_b16', 'B/16'),
                        ('vit_l16', 'L/16'), ('vit_b32', 'B/32'),
                        # the other sizes of the original papers (Dosovitskiy et al. 2021; ViT-g:
                        # Zhai et al. 2022), as timm's vit_{small_patch32,base_patch8,
                        # large_patch32,huge_patch14,giant_patch14}_224
                        ('vit_s32', 'S/32'), ('vit_b8', 'B/8'), ('vit_l32', 'L/32'),
                        ('vit_h14', 'H/14'), ('vit_g14', 'g/14')):
  MODELS.register(_name, functools.partial(ViT, variant=_variant), family='vit',
                  resolution=224, normalize='inception')

# timm's names: (variant, resolutions, options); each name is the one family with options.
_SIZES = {'small': 'S', 'base': 'B', 'large': 'L', 'huge': 'H', 'giant': 'g', 'gigantic': 'G',
          'so400m': 'So400m', 'giantopt': 'giantopt'}
_DINOV2 = dict(init_values=1e-5, act='gelu')
_CLIP = dict(pre_norm=True, patch_bias=False, norm_eps=1e-5)
_TANH = dict(act='gelu_tanh')
_ERF = dict(act='gelu')
TIMM_NAMES: dict[str, tuple[dict[str, Any], int, str]] = {}  # name: (ViT kwargs, resolution,
#                                                               normalize preset)


def _timm(name: str, variant: str, resolution: int, normalize: str, **options: Any) -> None:
  patch = int(variant.split('/')[1])
  if resolution % patch:
    options['strict_img_size'] = False  # timm's conv drops the pixels past the last patch
  kwargs = dict(variant=variant, **options)
  TIMM_NAMES[name] = (kwargs, resolution, normalize)
  MODELS.register(name, functools.partial(ViT, **kwargs), family='vit', timm=True,
                  resolution=resolution, normalize=normalize)


for _size in ('small', 'base', 'large', 'giant'):
  _kw = dict(_DINOV2, mlp_type='swiglu_packed', act='silu') if _size == 'giant' else _DINOV2
  _variant = 'dinov2_g/14' if _size == 'giant' else f'{_SIZES[_size]}/14'
  _timm(f'vit_{_size}_patch14_dinov2', _variant, 518, 'imagenet', **_kw)
  _timm(f'vit_{_size}_patch14_reg4_dinov2', _variant, 518, 'imagenet', reg_tokens=4,
        no_embed_class=True, **_kw)

# SigLIP (and SigLIP 2: the same architectures, timm tags '.v2_webli'): MAP head or average
# pool, no class token; [-1, 1] input. act as timm sets it per name.
for _size, _patch, _resolutions, _act in (
    ('base', 32, (256,), _TANH), ('base', 16, (224, 256, 384, 512), _ERF),
    ('large', 16, (256, 384), _ERF), ('large', 16, (512,), _TANH),
    ('so400m', 14, (224, 378, 384), _ERF), ('so400m', 16, (256, 384, 512), _TANH),
    ('giantopt', 16, (256, 384), _TANH)):
  for _res in _resolutions:
    _timm(f'vit_{_size}_patch{_patch}_siglip_{_res}', f'{_SIZES[_size]}/{_patch}', _res,
          'siglip', pool='map', **_act)
for _size, _patch, _resolutions, _act in (
    ('base', 32, (256,), _TANH), ('base', 16, (224, 256, 384, 512), _ERF),
    ('large', 16, (256, 384), _ERF), ('large', 16, (512,), _TANH),
    ('so400m', 14, (224, 378, 384, 448, 896), _ERF), ('so400m', 16, (256, 384, 512), _TANH),
    ('giantopt', 16, (256, 384), _TANH)):
  for _res in _resolutions:
    _timm(f'vit_{_size}_patch{_patch}_siglip_gap_{_res}', f'{_SIZES[_size]}/{_patch}', _res,
          'siglip', pool='gap', **_act)

# CLIP image towers (OpenAI, OpenCLIP): pre-norm, no patch bias, LayerNorm eps 1e-5; QuickGELU
# for the OpenAI weights (the _quickgelu_ names).
for _size, _patch, _resolutions in (
    ('base', 32, (224, 256, 384, 448)), ('base', 16, (224, 384)), ('large', 14, (224, 336)),
    ('huge', 14, (224, 336, 378)), ('giant', 14, (224,)), ('gigantic', 14, (224, 378))):
  for _res in _resolutions:
    _timm(f'vit_{_size}_patch{_patch}_clip_{_res}', f'{_SIZES[_size]}/{_patch}', _res, 'clip',
          act='gelu', **_CLIP)
for _size, _patch, _resolutions in (
    ('base', 32, (224,)), ('base', 16, (224,)), ('large', 14, (224, 336)),
    ('huge', 14, (224, 378)), ('gigantic', 14, (224,))):
  for _res in _resolutions:
    _timm(f'vit_{_size}_patch{_patch}_clip_quickgelu_{_res}', f'{_SIZES[_size]}/{_patch}', _res,
          'clip', act='quick_gelu', **_CLIP)
