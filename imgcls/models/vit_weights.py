"""ViT checkpoints <-> imgcls vit.py names (the ViT family's `checkpoint_filter_fn`s).

  vit_npz   .npz of google-research/vision_transformer (AugReg etc.) and big_vision (its names,
            a 'params/' prefix, or a scanned `encoderblock` stack); written back in the
            vision_transformer layout, the one timm's npz loader also reads. Official export.
  timm_vit  timm VisionTransformer state dict (fused qkv; the merge reshapes it to [D, H, Dh]):
            DINOv2 (LayerScale, registers, SwiGLU), SigLIP (attn_pool = MAPHead_0), CLIP
            (norm_pre), fc_norm; from .safetensors, .bin, .pth or .npz. Export writes it back.
Each registers the way its source resizes a position embedding on load (`posemb_resize` info,
used by weights.load_pretrained(posemb_resize='source')): timm's antialiased bicubic, and
scipy.ndimage.zoom(order=1) for vision_transformer and big_vision.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from imgcls.models import convert
from imgcls.models.convert import CONVERTERS, Converter, Flat, WeightsError
from imgcls.models.vit import POSEMB_KEY


def is_vit(keys: Collection[str]) -> bool:
  """imgcls ViT variables: a patch embedding and an encoder."""
  return 'params/embedding/kernel' in keys and any(k.startswith('params/Transformer/')
                                                   for k in keys)


# vision_transformer layout <-> imgcls: the same names (imgcls follows that layout).
# big_vision differs by block sub-module numbers, a top-level pos_embedding and optional scan.
_BIG_VISION_RENAMES = (
    (r'pos_embedding', 'Transformer/posembed_input/pos_embedding'),
    (r'(Transformer/encoderblock_\d+)/MultiHeadDotProductAttention_0/(.*)',
     r'\1/MultiHeadDotProductAttention_1/\2'),
    (r'(Transformer/encoderblock_\d+)/LayerNorm_1/(.*)', r'\1/LayerNorm_2/\2'),
    (r'(Transformer/encoderblock_\d+)/MlpBlock_0/(.*)', r'\1/MlpBlock_3/\2'),
)


def _rename(flat: Mapping[str, np.ndarray], rules: Sequence[tuple[str, str]]) -> Flat:
  """Applies the first matching (regex, re `expand` template) rule to each key; others stay."""
  out = {}
  for key, value in flat.items():
    for pattern, template in rules:
      if m := re.fullmatch(pattern, key):
        key = m.expand(template)
        break
    out[key] = value
  return out


def npz_to_imgcls(flat: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  flat = convert.strip_prefix(flat, 'embedding/kernel')
  big_vision = 'pos_embedding' in flat or any(
      re.search(r'encoderblock(_\d+)?/MlpBlock_0/', k) for k in flat)
  unscanned = {}
  for key, value in flat.items():
    m = re.fullmatch(r'Transformer/encoderblock/(.*)', key)
    if m:  # big_vision's scan=True stacks the blocks on a leading axis
      for i, block in enumerate(value):
        unscanned[f'Transformer/encoderblock_{i}/{m[1]}'] = block
    else:
      unscanned[key] = value
  if big_vision:
    unscanned = _rename(unscanned, _BIG_VISION_RENAMES)
  return {'params/' + k: v for k, v in unscanned.items()}, []


def npz_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  return {k.removeprefix('params/'): v for k, v in flat.items()}


_TIMM_SIMPLE = {
    'cls_token': 'params/cls',
    'reg_token': 'params/reg',
    'pos_embed': POSEMB_KEY,
    'patch_embed.proj.bias': 'params/embedding/bias',
    'norm_pre.weight': 'params/Transformer/norm_pre/scale',
    'norm_pre.bias': 'params/Transformer/norm_pre/bias',
    'norm.weight': 'params/Transformer/encoder_norm/scale',
    'norm.bias': 'params/Transformer/encoder_norm/bias',
    'fc_norm.weight': 'params/fc_norm/scale',
    'fc_norm.bias': 'params/fc_norm/bias',
    'head.weight': 'params/head/kernel',
    'head.bias': 'params/head/bias',
    'attn_pool.latent': 'params/MAPHead_0/probe',
    'attn_pool.q.weight': 'params/MAPHead_0/MultiHeadDotProductAttention_0/query/kernel',
    'attn_pool.q.bias': 'params/MAPHead_0/MultiHeadDotProductAttention_0/query/bias',
    'attn_pool.proj.weight': 'params/MAPHead_0/MultiHeadDotProductAttention_0/out/kernel',
    'attn_pool.proj.bias': 'params/MAPHead_0/MultiHeadDotProductAttention_0/out/bias',
    'attn_pool.norm.weight': 'params/MAPHead_0/LayerNorm_0/scale',
    'attn_pool.norm.bias': 'params/MAPHead_0/LayerNorm_0/bias',
    'attn_pool.mlp.fc1.weight': 'params/MAPHead_0/MlpBlock_0/Dense_0/kernel',
    'attn_pool.mlp.fc1.bias': 'params/MAPHead_0/MlpBlock_0/Dense_0/bias',
    'attn_pool.mlp.fc2.weight': 'params/MAPHead_0/MlpBlock_0/Dense_1/kernel',
    'attn_pool.mlp.fc2.bias': 'params/MAPHead_0/MlpBlock_0/Dense_1/bias',
}
_TIMM_BLOCK = {
    'norm1.weight': 'LayerNorm_0/scale', 'norm1.bias': 'LayerNorm_0/bias',
    'norm2.weight': 'LayerNorm_2/scale', 'norm2.bias': 'LayerNorm_2/bias',
    'mlp.fc1.weight': 'MlpBlock_3/Dense_0/kernel', 'mlp.fc1.bias': 'MlpBlock_3/Dense_0/bias',
    'mlp.fc1_x.weight': 'MlpBlock_3/Dense_0/kernel', 'mlp.fc1_x.bias': 'MlpBlock_3/Dense_0/bias',
    'mlp.fc1_g.weight': 'MlpBlock_3/gate/kernel', 'mlp.fc1_g.bias': 'MlpBlock_3/gate/bias',
    'mlp.fc2.weight': 'MlpBlock_3/Dense_1/kernel', 'mlp.fc2.bias': 'MlpBlock_3/Dense_1/bias',
    'attn.proj.weight': 'MultiHeadDotProductAttention_1/out/kernel',
    'attn.proj.bias': 'MultiHeadDotProductAttention_1/out/bias',
    'ls1.gamma': 'layer_scale_1', 'ls2.gamma': 'layer_scale_2',
}
_QKV = ('query', 'key', 'value')


def _timm_value(key: str, value: np.ndarray) -> np.ndarray:
  """torch layout -> Flax: the patch conv OIHW -> HWIO, Linear [out, in] -> [in, out]."""
  if key == 'patch_embed.proj.weight':
    return convert.conv_t2f(value)
  return convert.linear(value) if key.endswith('weight') and value.ndim == 2 else value


def timm_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  """timm's fused qkv (blocks) and kv (attn_pool) are split; q/k/v/out stay [in, out] matrices
  that the merge reshapes to [D, H, Dh] (the head count is the model's, not in the file)."""
  out, unknown = {}, []
  blk = 'params/Transformer/encoderblock_{}/'
  pool = 'params/MAPHead_0/MultiHeadDotProductAttention_0/'
  for key, value in sd.items():
    ours = 'kernel' if key.rpartition('.')[2] == 'weight' else 'bias'
    m = re.fullmatch(r'blocks\.(\d+)\.(.*)', key)
    if key == 'patch_embed.proj.weight':
      out['params/embedding/kernel'] = _timm_value(key, value)
    elif key in _TIMM_SIMPLE:
      out[_TIMM_SIMPLE[key]] = _timm_value(key, value)
    elif key in ('attn_pool.kv.weight', 'attn_pool.kv.bias'):
      for part, piece in zip(_QKV[1:], np.split(value, 2, axis=0)):
        out[pool + f'{part}/{ours}'] = _timm_value(key, piece)
    elif m and m[2] in _TIMM_BLOCK:
      out[blk.format(m[1]) + _TIMM_BLOCK[m[2]]] = _timm_value(key, value)
    elif m and m[2] in ('attn.qkv.weight', 'attn.qkv.bias'):
      for part, piece in zip(_QKV, np.split(value, 3, axis=0)):
        out[blk.format(m[1]) + f'MultiHeadDotProductAttention_1/{part}/{ours}'] = _timm_value(
            key, piece)
    else:
      unknown.append(key)
  return out, unknown


def _attention_to_timm(p: Mapping[str, np.ndarray], a: str, width: int) -> dict[str, np.ndarray]:
  """One imgcls attention module's q/k/v/out -> {'q', 'k', 'v', 'proj'} weight/bias, torch
  layout ([out, in]); biases absent where the model has none."""
  out = {}
  for n, t in zip((*_QKV, 'out'), ('q', 'k', 'v', 'proj')):
    kernel = p[a + f'{n}/kernel']
    out[f'{t}.weight'] = (kernel.reshape(-1, width) if n == 'out' else
                          kernel.reshape(width, -1)).T
    if a + f'{n}/bias' in p:
      out[f'{t}.bias'] = p[a + f'{n}/bias'].reshape(-1)
  return out


def timm_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  p = {k.removeprefix('params/'): v for k, v in flat.items()}
  used = set()

  def take(key):
    used.add(key)
    return p[key]

  sd = {}
  simple = {v.removeprefix('params/'): k for k, v in _TIMM_SIMPLE.items()}
  for ours, theirs in simple.items():
    if ours in p and not ours.startswith('MAPHead_0/MultiHeadDotProductAttention_0/'):
      sd[theirs] = _timm_value(theirs, take(ours))
  sd['patch_embed.proj.weight'] = convert.conv_f2t(take('embedding/kernel'))
  width = p['embedding/kernel'].shape[-1]
  depth = len({k.split('/')[1] for k in p if k.startswith('Transformer/encoderblock_')})
  to_timm_block = {v: k for k, v in _TIMM_BLOCK.items() if 'fc1_x' not in k}
  for i in range(depth):
    b, t = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    gated = b + 'MlpBlock_3/gate/kernel' in p
    for ours, theirs in to_timm_block.items():
      if b + ours in p:
        if gated and theirs.startswith('mlp.fc1.'):
          theirs = theirs.replace('mlp.fc1.', 'mlp.fc1_x.')
        sd[t + theirs] = _timm_value(theirs, take(b + ours))
    a = b + 'MultiHeadDotProductAttention_1/'
    attn = _attention_to_timm(p, a, width)
    used.update(k for k in p if k.startswith(a))
    for part in ('weight', 'bias'):
      if f'q.{part}' in attn:
        sd[t + f'attn.qkv.{part}'] = np.concatenate([attn[f'{n}.{part}'] for n in 'qkv'])
    sd[t + 'attn.proj.weight'] = attn['proj.weight']
    sd[t + 'attn.proj.bias'] = attn['proj.bias']
  a = 'MAPHead_0/MultiHeadDotProductAttention_0/'
  if a + 'query/kernel' in p:
    attn = _attention_to_timm(p, a, width)
    used.update(k for k in p if k.startswith(a))
    sd['attn_pool.q.weight'], sd['attn_pool.q.bias'] = attn['q.weight'], attn['q.bias']
    sd['attn_pool.kv.weight'] = np.concatenate([attn['k.weight'], attn['v.weight']])
    sd['attn_pool.kv.bias'] = np.concatenate([attn['k.bias'], attn['v.bias']])
    sd['attn_pool.proj.weight'], sd['attn_pool.proj.bias'] = attn['proj.weight'], attn[
        'proj.bias']
  left = sorted(set(p) - used)
  if left:
    raise WeightsError(f'timm_vit export does not cover {", ".join(left)} (timm has no '
                       "pre-logits layer in these models); export to 'vit_npz' instead.")
  return sd


CONVERTERS.register('vit_npz', Converter(
    is_format=lambda keys: any(k.endswith('embedding/kernel') for k in keys),
    is_family=is_vit, to_imgcls=npz_to_imgcls, from_imgcls=npz_from_imgcls),
    family='vit', official=True, posemb_resize='zoom_linear',
    describe='official ViT .npz (vision_transformer, big_vision incl. SigLIP) read + written')
CONVERTERS.register('timm_vit', Converter(
    is_format=lambda keys: 'patch_embed.proj.weight' in keys,
    is_family=is_vit, to_imgcls=timm_to_imgcls, from_imgcls=timm_from_imgcls),
    family='vit', official=False, posemb_resize='bicubic_timm',
    describe='timm VisionTransformer state dict (DINOv2, SigLIP, CLIP, AugReg ...)')
