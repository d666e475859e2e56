"""timm ConvNeXt (v1 and v2) state dicts <-> imgcls convnext.py names (name map in convnext.py).

  timm_convnext  the family's official format: a timm state dict (.safetensors, .bin, .pth,
                 or .npz), as timm.create_model('convnext_tiny') and its Hub weights hold it.
The MLP's layout travels with the weights: timm's Linear [out, in] for convnext_tiny and
larger, 1x1 Conv2d [out, in, 1, 1] for atto..nano (`conv_mlp`), kept as a [in, out] Dense or a
[1, 1, in, out] conv kernel here, so export writes back what was read, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from imgcls.models import convert
from imgcls.models.convert import CONVERTERS, Converter, Flat

_BLOCK_MODULES = {'conv_dw': 'conv_dw', 'norm': 'norm', 'mlp.fc1': 'fc1', 'mlp.fc2': 'fc2',
                  'mlp.grn': 'grn'}
_TOP_MODULES = {'stem.0': 'stem_conv', 'stem.1': 'stem_norm', 'head.norm': 'head_norm',
                'head.fc': 'head'}
_LEAVES = {  # (module kind, timm leaf) -> imgcls leaf
    ('conv', 'weight'): 'kernel', ('conv', 'bias'): 'bias',
    ('norm', 'weight'): 'scale', ('norm', 'bias'): 'bias',
    ('grn', 'weight'): 'gamma', ('grn', 'bias'): 'beta',
}


def is_convnext(keys: Collection[str]) -> bool:
  """imgcls ConvNeXt variables: the patchify stem conv."""
  return 'params/stem_conv/kernel' in keys


def _is_timm_convnext(keys: Collection[str]) -> bool:
  return 'stem.0.weight' in keys and 'stages.0.blocks.0.conv_dw.weight' in keys


def _kind(module: str) -> str:
  if module.endswith('grn'):
    return 'grn'
  return 'norm' if re.search(r'(^|/|_)norm$', module) else 'conv'


def _module(key: str) -> str | None:
  """imgcls module path of a timm parameter's module ('stages.1.blocks.0.mlp.fc1' -> ...)."""
  if key in _TOP_MODULES:
    return _TOP_MODULES[key]
  if m := re.fullmatch(r'stages\.(\d+)\.downsample\.([01])', key):
    return f'stage{int(m[1]) + 1}_down_{"norm" if m[2] == "0" else "conv"}'
  if m := re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2|mlp\.grn)',
                       key):
    return f'stage{int(m[1]) + 1}_block{int(m[2]) + 1}/{_BLOCK_MODULES[m[3]]}'
  return None


def timm_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  out, unknown = {}, []
  for key, value in sd.items():
    if m := re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.gamma', key):
      out[f'params/stage{int(m[1]) + 1}_block{int(m[2]) + 1}/layer_scale'] = value
      continue
    tmod, _, leaf = key.rpartition('.')
    module = _module(tmod)
    kind = module and _kind(module)
    if module is None or (kind, leaf) not in _LEAVES:
      unknown.append(key)
      continue
    if kind == 'conv' and leaf == 'weight':
      value = convert.conv_t2f(value) if value.ndim == 4 else convert.linear(value)
    out[f'params/{module}/{_LEAVES[kind, leaf]}'] = value
  return out, unknown


def timm_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  to_timm_module = {v: k for k, v in _TOP_MODULES.items()}
  to_timm_block = {v: k for k, v in _BLOCK_MODULES.items()}
  to_timm_leaf = {(kind, ours): theirs for (kind, theirs), ours in _LEAVES.items()}
  sd = {}
  for key, value in flat.items():
    module, _, leaf = key.removeprefix('params/').rpartition('/')
    if m := re.fullmatch(r'stage(\d+)_block(\d+)', module):
      if leaf != 'layer_scale':
        raise ValueError(f'Unknown ConvNeXt parameter {key!r}.')
      sd[f'stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.gamma'] = value
      continue
    if m := re.fullmatch(r'stage(\d+)_block(\d+)/(\w+)', module):
      tmod = f'stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{to_timm_block[m[3]]}'
    elif m := re.fullmatch(r'stage(\d+)_down_(norm|conv)', module):
      tmod = f'stages.{int(m[1]) - 1}.downsample.{0 if m[2] == "norm" else 1}'
    else:
      tmod = to_timm_module[module]
    kind = _kind(module)
    if kind == 'conv' and leaf == 'kernel':
      value = convert.conv_f2t(value) if value.ndim == 4 else convert.linear(value)
    sd[f'{tmod}.{to_timm_leaf[kind, leaf]}'] = value
  return sd


CONVERTERS.register('timm_convnext', Converter(
    is_format=_is_timm_convnext, is_family=is_convnext, to_imgcls=timm_to_imgcls,
    from_imgcls=timm_from_imgcls),
    family='convnext', official=True,
    describe='timm ConvNeXt / ConvNeXt-V2 state dict (.safetensors, .bin, .pth, .npz)')
