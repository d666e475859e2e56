"""BiT checkpoints <-> imgcls bit.py names (name map in bit.py's docstring).

  bit_npz   .npz of google-research/big_transfer. Official export.
  timm_bit  timm ResNetV2 (resnetv2_*_bit) state dict.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from imgcls.models import convert
from imgcls.models.convert import CONVERTERS, Converter, Flat, WeightsError

_NPZ_UNIT = {'a': ('norm1', 'conv1'), 'b': ('norm2', 'conv2'), 'c': ('norm3', 'conv3')}
_GN = {'gamma': 'scale', 'beta': 'bias'}
_ROOT = 'root_block/standardized_conv2d/kernel'


def is_bit(keys: Collection[str]) -> bool:
  """imgcls BiT variables: the weight-standardised stem conv."""
  return 'params/root_conv/kernel' in keys


def npz_to_imgcls(flat: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  flat = convert.strip_prefix(flat, _ROOT)
  out, unknown = {}, []
  for key, value in flat.items():
    if key == _ROOT:
      out['params/root_conv/kernel'] = value
    elif m := re.fullmatch(r'group_norm/(gamma|beta)', key):
      out[f'params/norm/{_GN[m[1]]}'] = value.reshape(-1)
    elif m := re.fullmatch(r'head/conv2d/(kernel|bias)', key):
      out[f'params/head/{m[1]}'] = value.reshape(-1, value.shape[-1]) if m[1] == 'kernel' \
          else value
    elif m := re.fullmatch(r'block(\d)/unit(\d+)/([abc])/(.*)', key):
      unit = f'params/stage{m[1]}_unit{int(m[2])}/'
      norm, conv = _NPZ_UNIT[m[3]]
      if m[4] == 'standardized_conv2d/kernel':
        out[unit + conv + '/kernel'] = value
      elif m[3] == 'a' and m[4] == 'proj/standardized_conv2d/kernel':
        out[unit + 'proj/kernel'] = value
      elif g := re.fullmatch(r'group_norm/(gamma|beta)', m[4]):
        out[unit + f'{norm}/{_GN[g[1]]}'] = value.reshape(-1)
      else:
        unknown.append(key)
    else:
      unknown.append(key)
  return out, unknown


def npz_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  gn = {v: k for k, v in _GN.items()}
  out = {}
  for key, value in flat.items():
    path = key.removeprefix('params/')
    if path == 'root_conv/kernel':
      out['resnet/' + _ROOT] = value
    elif m := re.fullmatch(r'norm/(scale|bias)', path):
      out[f'resnet/group_norm/{gn[m[1]]}'] = value
    elif m := re.fullmatch(r'head/(kernel|bias)', path):
      out[f'resnet/head/conv2d/{m[1]}'] = value.reshape(1, 1, *value.shape) if m[1] == 'kernel' \
          else value
    elif m := re.fullmatch(r'stage(\d)_unit(\d+)/(\w+)/(\w+)', path):
      unit = f'resnet/block{m[1]}/unit{int(m[2]):02d}/'
      if m[3] == 'proj':
        out[unit + 'a/proj/standardized_conv2d/kernel'] = value
        continue
      letter = 'abc'[int(m[3][-1]) - 1]
      if m[3].startswith('conv'):
        out[unit + f'{letter}/standardized_conv2d/kernel'] = value
      else:
        out[unit + f'{letter}/group_norm/{gn[m[4]]}'] = value
    else:
      raise WeightsError(f'bit_npz export: no BiT name for {key}.')
  return out


def timm_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  out, unknown = {}, []
  leaf = {'weight': 'scale', 'bias': 'bias'}
  for key, value in sd.items():
    if key == 'stem.conv.weight':
      out['params/root_conv/kernel'] = convert.conv_t2f(value)
    elif m := re.fullmatch(r'norm\.(weight|bias)', key):
      out[f'params/norm/{leaf[m[1]]}'] = value
    elif key == 'head.fc.weight':
      out['params/head/kernel'] = convert.linear(value.reshape(value.shape[0], -1))
    elif key == 'head.fc.bias':
      out['params/head/bias'] = value
    elif m := re.fullmatch(r'stages\.(\d)\.blocks\.(\d+)\.(norm\d|conv\d|downsample\.conv)\.'
                           r'(weight|bias)', key):
      unit = f'params/stage{int(m[1]) + 1}_unit{int(m[2]) + 1}/'
      if m[3].startswith('norm'):
        out[unit + f'{m[3]}/{leaf[m[4]]}'] = value
      elif m[4] == 'weight':
        out[unit + ('proj' if m[3] == 'downsample.conv' else m[3]) + '/kernel'] = \
            convert.conv_t2f(value)
      else:
        unknown.append(key)
    else:
      unknown.append(key)
  return out, unknown


def timm_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  sd = {}
  leaf = {'scale': 'weight', 'bias': 'bias'}
  for key, value in flat.items():
    path = key.removeprefix('params/')
    if path == 'root_conv/kernel':
      sd['stem.conv.weight'] = convert.conv_f2t(value)
    elif m := re.fullmatch(r'norm/(scale|bias)', path):
      sd[f'norm.{leaf[m[1]]}'] = value
    elif path == 'head/kernel':
      sd['head.fc.weight'] = convert.linear(value)[:, :, None, None]
    elif path == 'head/bias':
      sd['head.fc.bias'] = value
    elif m := re.fullmatch(r'stage(\d)_unit(\d+)/(\w+)/(\w+)', path):
      unit = f'stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.'
      if m[3].startswith('norm'):
        sd[unit + f'{m[3]}.{leaf[m[4]]}'] = value
      else:
        name = 'downsample.conv' if m[3] == 'proj' else m[3]
        sd[unit + f'{name}.weight'] = convert.conv_f2t(value)
    else:
      raise WeightsError(f'timm_bit export: no timm name for {key}.')
  return sd


CONVERTERS.register('bit_npz', Converter(
    is_format=lambda keys: any(k.endswith(_ROOT) for k in keys),
    is_family=is_bit, to_imgcls=npz_to_imgcls, from_imgcls=npz_from_imgcls),
    family='bit', official=True, describe='BiT .npz read + written')
CONVERTERS.register('timm_bit', Converter(
    is_format=lambda keys: 'stem.conv.weight' in keys,
    is_family=is_bit, to_imgcls=timm_to_imgcls, from_imgcls=timm_from_imgcls),
    family='bit', official=False, describe='timm state dict')
