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
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imgcls.models import layers
from imgcls.models.layers import PLAIN, Lowering
from imgcls.models.registry import MODELS
from imgcls.models.posemb import POSEMB_RESIZE_METHODS, posemb_sincos_2d
from imgcls.models.vit_layers import (ACTS, MLP_TYPES, Encoder, MAPHead, PatchEmbed, block_index,
                                      patch_init, stack_blocks, unstack_blocks)

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
DIMS = ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size')
POSEMB_KEY = 'params/Transformer/posembed_input/pos_embedding'  # resized by weights.merge
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
