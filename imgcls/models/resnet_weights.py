"""timm / torchvision ResNet state dicts <-> imgcls resnet.py names (the two share their keys).

  timm_resnet  the family's only and official format: exported as a state dict (.npz or
               .safetensors) that torchvision and timm load after torch.from_numpy.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from imgcls.models import convert
from imgcls.models.convert import CONVERTERS, Converter, Flat

_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def is_resnet(keys: Collection[str]) -> bool:
  """imgcls ResNet variables: the v1.5 stem conv (BiT names its stem root_conv)."""
  return 'params/conv_init/kernel' in keys


def timm_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  out, unknown = {}, []
  for key, value in sd.items():
    if key.endswith('num_batches_tracked'):
      continue  # a torch counter with no meaning for inference or fine-tuning
    m = re.fullmatch(r'(conv1|bn1|fc)\.(\w+)', key) or re.fullmatch(
        r'layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)', key)
    if not m:
      unknown.append(key)
      continue
    if m.re.groups == 2:
      module, leaf = {'conv1': 'conv_init', 'bn1': 'bn_init', 'fc': 'head'}[m[1]], m[2]
    else:
      sub = {'downsample.0': 'proj_conv', 'downsample.1': 'proj_bn'}.get(m[3], m[3])
      module, leaf = f'stage{m[1]}_block{int(m[2]) + 1}/{sub}', m[4]
    if module.endswith(('conv_init', 'proj_conv')) or re.search(r'/conv\d$', module):
      out[f'params/{module}/kernel'] = convert.conv_t2f(value)
    elif module == 'head':
      out[f'params/head/{"kernel" if leaf == "weight" else "bias"}'] = (
          convert.linear(value) if leaf == 'weight' else value)
    elif leaf in _BN:
      collection, name = _BN[leaf]
      out[f'{collection}/{module}/{name}'] = value
    else:
      unknown.append(key)
  return out, unknown


def timm_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  sd = {}
  inverse_bn = {v: k for k, v in _BN.items()}
  for key, value in flat.items():
    collection, *path, leaf = key.split('/')
    module = '/'.join(path)
    m = re.fullmatch(r'stage(\d)_block(\d+)/(\w+)', module)
    if m:
      sub = {'proj_conv': 'downsample.0', 'proj_bn': 'downsample.1'}.get(m[3], m[3])
      tmod = f'layer{m[1]}.{int(m[2]) - 1}.{sub}'
    else:
      tmod = {'conv_init': 'conv1', 'bn_init': 'bn1', 'head': 'fc'}[module]
    if leaf == 'kernel' and value.ndim == 4:
      sd[f'{tmod}.weight'] = convert.conv_f2t(value)
    elif module == 'head':
      sd[f'fc.{"weight" if leaf == "kernel" else "bias"}'] = (
          convert.linear(value) if leaf == 'kernel' else value)
    else:
      sd[f'{tmod}.{inverse_bn[(collection, leaf)]}'] = value
  return sd


CONVERTERS.register('timm_resnet', Converter(
    is_format=lambda keys: 'conv1.weight' in keys and 'fc.weight' in keys,
    is_family=is_resnet, to_imgcls=timm_to_imgcls, from_imgcls=timm_from_imgcls),
    family='resnet', official=True,
    describe='timm / torchvision state dict (.safetensors, .pth, .npz)')
