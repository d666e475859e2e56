"""ViT checkpoints <-> imgcls vit.py names (the ViT family's `checkpoint_filter_fn`s).

  vit_npz   .npz of google-research/vision_transformer (AugReg etc.) and big_vision (its names,
            a 'params/' prefix, or a scanned `encoderblock` stack); written back in the
            vision_transformer layout, the one timm's npz loader also reads. Official export.
  timm_vit  timm VisionTransformer state dict (fused qkv; the merge reshapes it to [D, H, Dh]).
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
    'cls_token': ('params/cls', None),
    'pos_embed': (POSEMB_KEY, None),
    'patch_embed.proj.weight': ('params/embedding/kernel', convert.conv_t2f),
    'patch_embed.proj.bias': ('params/embedding/bias', None),
    'norm.weight': ('params/Transformer/encoder_norm/scale', None),
    'norm.bias': ('params/Transformer/encoder_norm/bias', None),
    'head.weight': ('params/head/kernel', convert.linear),
    'head.bias': ('params/head/bias', None),
}
_TIMM_BLOCK = {
    'norm1.weight': 'LayerNorm_0/scale', 'norm1.bias': 'LayerNorm_0/bias',
    'norm2.weight': 'LayerNorm_2/scale', 'norm2.bias': 'LayerNorm_2/bias',
    'mlp.fc1.weight': 'MlpBlock_3/Dense_0/kernel', 'mlp.fc1.bias': 'MlpBlock_3/Dense_0/bias',
    'mlp.fc2.weight': 'MlpBlock_3/Dense_1/kernel', 'mlp.fc2.bias': 'MlpBlock_3/Dense_1/bias',
    'attn.proj.weight': 'MultiHeadDotProductAttention_1/out/kernel',
    'attn.proj.bias': 'MultiHeadDotProductAttention_1/out/bias',
}


def timm_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  """timm's fused qkv / proj become [in, out] matrices; the merge reshapes them to [D, H, Dh]."""
  out, unknown = {}, []
  blk = 'params/Transformer/encoderblock_{}/'
  for key, value in sd.items():
    if key in _TIMM_SIMPLE:
      name, fn = _TIMM_SIMPLE[key]
      out[name] = fn(value) if fn else value
      continue
    m = re.fullmatch(r'blocks\.(\d+)\.(.*)', key)
    if m and m[2] in _TIMM_BLOCK:
      out[blk.format(m[1]) + _TIMM_BLOCK[m[2]]] = convert.linear(value) if m[2].endswith(
          'weight') and value.ndim == 2 else value
    elif m and m[2] in ('attn.qkv.weight', 'attn.qkv.bias'):
      kind = m[2].rsplit('.', 1)[1]
      for part, piece in zip(('query', 'key', 'value'), np.split(value, 3, axis=0)):
        out[blk.format(m[1]) + f'MultiHeadDotProductAttention_1/{part}/' + (
            'kernel' if kind == 'weight' else 'bias')] = convert.linear(piece) \
            if piece.ndim == 2 else piece
    else:
      unknown.append(key)
  return out, unknown


def timm_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  p = {k.removeprefix('params/'): v for k, v in flat.items()}
  sd = {}
  if 'cls' in p:
    sd['cls_token'] = p['cls']
  if 'Transformer/posembed_input/pos_embedding' in p:
    sd['pos_embed'] = p['Transformer/posembed_input/pos_embedding']
  sd['patch_embed.proj.weight'] = convert.conv_f2t(p['embedding/kernel'])
  sd['patch_embed.proj.bias'] = p['embedding/bias']
  depth = len({k.split('/')[1] for k in p if k.startswith('Transformer/encoderblock_')})
  for i in range(depth):
    b = f'Transformer/encoderblock_{i}/'
    t = f'blocks.{i}.'
    a = b + 'MultiHeadDotProductAttention_1/'
    width = p[a + 'query/kernel'].shape[0]
    sd[t + 'norm1.weight'], sd[t + 'norm1.bias'] = p[b + 'LayerNorm_0/scale'], p[
        b + 'LayerNorm_0/bias']
    sd[t + 'attn.qkv.weight'] = np.concatenate(
        [p[a + f'{n}/kernel'].reshape(width, -1).T for n in ('query', 'key', 'value')])
    sd[t + 'attn.qkv.bias'] = np.concatenate(
        [p[a + f'{n}/bias'].reshape(-1) for n in ('query', 'key', 'value')])
    sd[t + 'attn.proj.weight'] = p[a + 'out/kernel'].reshape(-1, width).T
    sd[t + 'attn.proj.bias'] = p[a + 'out/bias']
    sd[t + 'norm2.weight'], sd[t + 'norm2.bias'] = p[b + 'LayerNorm_2/scale'], p[
        b + 'LayerNorm_2/bias']
    for j in (0, 1):
      sd[t + f'mlp.fc{j + 1}.weight'] = p[b + f'MlpBlock_3/Dense_{j}/kernel'].T
      sd[t + f'mlp.fc{j + 1}.bias'] = p[b + f'MlpBlock_3/Dense_{j}/bias']
  sd['norm.weight'] = p['Transformer/encoder_norm/scale']
  sd['norm.bias'] = p['Transformer/encoder_norm/bias']
  sd['head.weight'] = p['head/kernel'].T
  sd['head.bias'] = p['head/bias']
  left = set(p) - {k for k in p if k.startswith(('Transformer/', 'embedding/', 'head/'))} - {
      'cls'}
  if left:
    raise WeightsError(f'timm_vit export does not cover {", ".join(sorted(left))} (timm names '
                       "pre-logits and MAP heads differently); export to 'vit_npz' instead.")
  return sd


CONVERTERS.register('vit_npz', Converter(
    is_format=lambda keys: any(k.endswith('embedding/kernel') for k in keys),
    is_family=is_vit, to_imgcls=npz_to_imgcls, from_imgcls=npz_from_imgcls),
    family='vit', official=True,
    describe='official ViT .npz (vision_transformer, big_vision) read + written')
CONVERTERS.register('timm_vit', Converter(
    is_format=lambda keys: 'patch_embed.proj.weight' in keys,
    is_family=is_vit, to_imgcls=timm_to_imgcls, from_imgcls=timm_from_imgcls),
    family='vit', official=False, describe='timm state dict')
