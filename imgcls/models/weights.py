"""Pretrained weights: read and write the published checkpoint formats, merge them into a model.

Formats (`FORMATS`), each converted to and from imgcls's own parameter names:
  vit_npz      ViT .npz of google-research/vision_transformer (AugReg etc.) and big_vision
               (its names, a 'params/' prefix, or a scanned `encoderblock` stack); written back
               in the vision_transformer layout, the one timm's npz loader also reads.
  bit_npz      BiT .npz of google-research/big_transfer.
  timm_vit     timm VisionTransformer state dict.
  timm_resnet  timm or torchvision ResNet state dict (the two share their key names).
  timm_bit     timm ResNetV2 (BiT) state dict.
Files may be .npz, .safetensors (numpy, no torch needed) or torch .pth/.pt/.bin (needs torch).

`load_pretrained` converts a checkpoint onto the variables of a freshly initialised model and
returns a `MergeReport`: what was loaded, missing, unused, reshaped (same size, other layout, e.g.
timm's fused attention), re-initialised (the head, when the class count differs) and resized
(position embeddings on a new grid). It is strict by default: anything missing or left over is
an error naming the keys, unless `strict=False` or the keys match an `ignore` regex.

Converters are hand-written key maps: no library covers these layouts for Flax (timm's own
loaders only go into torch), and each map below is checked against timm in the tests.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

Flat = dict[str, np.ndarray]

FORMATS = ('vit_npz', 'bit_npz', 'timm_vit', 'timm_resnet', 'timm_bit')
POSEMB_KEY = 'params/Transformer/posembed_input/pos_embedding'
HEAD_PREFIX = 'params/head/'


class WeightsError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


# ----------------------------------------------------------------------------- files


def read_file(path: str | epath.PathLike) -> Flat:
  """All arrays of a .npz, .safetensors or torch checkpoint file as {key: float32 numpy}."""
  path = epath.Path(path)
  if not path.exists():
    raise WeightsError(f'No such weights file: {path}.')
  suffix = path.suffix.lower()
  data = path.read_bytes()
  if suffix == '.npz':
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {k: np.asarray(npz[k]) for k in npz.files}
  if suffix == '.safetensors':
    from safetensors.numpy import load as load_safetensors  # pylint: disable=g-import-not-at-top
    return dict(load_safetensors(data))
  if suffix in ('.pth', '.pt', '.bin'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise WeightsError(
          f'{path} is a torch checkpoint and torch is not installed. Either install torch, or '
          'convert it once where torch is available: `import torch, numpy as np; sd = '
          "torch.load(PATH, map_location='cpu'); np.savez(OUT, **{k: v.float().numpy() for k, "
          "v in sd.items()})`, or use the model's .safetensors file.") from None
    sd = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):  # training checkpoints nest the weights
      if isinstance(sd, dict) and isinstance(sd.get(key), dict):
        sd = sd[key]
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, 'numpy')}
  raise WeightsError(f'Unknown weights file type {suffix!r} for {path}: expected .npz, '
                     '.safetensors, .pth, .pt or .bin.')


def write_npz(path: str | epath.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes an .npz through a temporary file, so a crash never leaves half a file behind."""
  path = epath.Path(path)
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_bytes(buf.getvalue())
  tmp.rename(path)


def flatten(variables: Mapping[str, Any]) -> Flat:
  """{'params': {'a': {'b': x}}} -> {'params/a/b': x}."""
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(dict(variables)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def detect_format(flat: Mapping[str, np.ndarray]) -> str:
  """Guesses which of FORMATS a flat checkpoint is in, from its key names."""
  keys = set(flat)
  if any(k.endswith('embedding/kernel') for k in keys):
    return 'vit_npz'
  if any(k.endswith('root_block/standardized_conv2d/kernel') for k in keys):
    return 'bit_npz'
  if 'patch_embed.proj.weight' in keys:
    return 'timm_vit'
  if 'stem.conv.weight' in keys:
    return 'timm_bit'
  if 'conv1.weight' in keys and 'fc.weight' in keys:
    return 'timm_resnet'
  sample = ', '.join(sorted(keys)[:5])
  raise WeightsError(f'Cannot tell the format of a checkpoint with keys like {sample}; pass '
                     f'fmt= one of {", ".join(FORMATS)}.')


# ----------------------------------------------------------------------------- key maps

# Layout helpers: torch stores convs OIHW and linear layers [out, in]; Flax HWIO and [in, out].
def _conv_t2f(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def _conv_f2t(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (3, 2, 0, 1))


def _linear(w: np.ndarray) -> np.ndarray:  # its own inverse
  return np.transpose(w)


def _rename(flat: Mapping[str, np.ndarray],
            rules: Sequence[tuple[str, Any]]) -> tuple[Flat, list[str]]:
  """Applies the first matching (regex, replacement) rule to each key; returns (renamed, unknown).

  A replacement is a string for re's `expand` or a callable of the match; values pass unchanged.
  """
  out, unknown = {}, []
  for key, value in flat.items():
    for pattern, repl in rules:
      m = re.fullmatch(pattern, key)
      if m:
        out[repl(m) if callable(repl) else m.expand(repl)] = value
        break
    else:
      unknown.append(key)
  return out, unknown


# ViT, vision_transformer layout <-> imgcls: the same names (imgcls follows that layout).
# big_vision differs by block sub-module numbers, a top-level pos_embedding and optional scan.
_BIG_VISION_RENAMES = (
    (r'pos_embedding', 'Transformer/posembed_input/pos_embedding'),
    (r'(Transformer/encoderblock_\d+)/MultiHeadDotProductAttention_0/(.*)',
     r'\1/MultiHeadDotProductAttention_1/\2'),
    (r'(Transformer/encoderblock_\d+)/LayerNorm_1/(.*)', r'\1/LayerNorm_2/\2'),
    (r'(Transformer/encoderblock_\d+)/MlpBlock_0/(.*)', r'\1/MlpBlock_3/\2'),
    (r'(.*)', r'\1'),
)


def _strip_prefix(flat: Mapping[str, np.ndarray], anchor: str) -> Flat:
  """Drops whatever prefix ('params/', 'opt/target/', 'params/img/', ...) precedes `anchor`."""
  hits = [k[:-len(anchor)] for k in flat if k == anchor or k.endswith('/' + anchor)]
  if not hits:
    return dict(flat)
  prefix = min(hits, key=len)
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _vit_npz_to_imgcls(flat: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  flat = _strip_prefix(flat, 'embedding/kernel')
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
    unscanned, _ = _rename(unscanned, _BIG_VISION_RENAMES)
  return {'params/' + k: v for k, v in unscanned.items()}, []


def _vit_npz_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  return {k.removeprefix('params/'): v for k, v in flat.items()}


def _qkv_split(value: np.ndarray, which: int) -> np.ndarray:
  return np.split(value, 3, axis=0)[which]


def _timm_vit_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  """timm's fused qkv / proj become [in, out] matrices; the merge reshapes them to [D, H, Dh]."""
  out, unknown = {}, []
  blk = 'params/Transformer/encoderblock_{}/'
  simple = {
      'cls_token': ('params/cls', None),
      'pos_embed': (POSEMB_KEY, None),
      'patch_embed.proj.weight': ('params/embedding/kernel', _conv_t2f),
      'patch_embed.proj.bias': ('params/embedding/bias', None),
      'norm.weight': ('params/Transformer/encoder_norm/scale', None),
      'norm.bias': ('params/Transformer/encoder_norm/bias', None),
      'head.weight': ('params/head/kernel', _linear),
      'head.bias': ('params/head/bias', None),
  }
  block_map = {
      'norm1.weight': 'LayerNorm_0/scale', 'norm1.bias': 'LayerNorm_0/bias',
      'norm2.weight': 'LayerNorm_2/scale', 'norm2.bias': 'LayerNorm_2/bias',
      'mlp.fc1.weight': 'MlpBlock_3/Dense_0/kernel', 'mlp.fc1.bias': 'MlpBlock_3/Dense_0/bias',
      'mlp.fc2.weight': 'MlpBlock_3/Dense_1/kernel', 'mlp.fc2.bias': 'MlpBlock_3/Dense_1/bias',
      'attn.proj.weight': 'MultiHeadDotProductAttention_1/out/kernel',
      'attn.proj.bias': 'MultiHeadDotProductAttention_1/out/bias',
  }
  for key, value in sd.items():
    if key in simple:
      name, fn = simple[key]
      out[name] = fn(value) if fn else value
      continue
    m = re.fullmatch(r'blocks\.(\d+)\.(.*)', key)
    if m and m[2] in block_map:
      out[blk.format(m[1]) + block_map[m[2]]] = _linear(value) if m[2].endswith(
          'weight') and value.ndim == 2 else value
    elif m and m[2] in ('attn.qkv.weight', 'attn.qkv.bias'):
      kind = m[2].rsplit('.', 1)[1]
      for i, part in enumerate(('query', 'key', 'value')):
        piece = _qkv_split(value, i)
        out[blk.format(m[1]) + f'MultiHeadDotProductAttention_1/{part}/' + (
            'kernel' if kind == 'weight' else 'bias')] = _linear(piece) if piece.ndim == 2 \
            else piece
    else:
      unknown.append(key)
  return out, unknown


def _timm_vit_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  p = {k.removeprefix('params/'): v for k, v in flat.items()}
  sd = {}
  if 'cls' in p:
    sd['cls_token'] = p['cls']
  if 'Transformer/posembed_input/pos_embedding' in p:
    sd['pos_embed'] = p['Transformer/posembed_input/pos_embedding']
  sd['patch_embed.proj.weight'] = _conv_f2t(p['embedding/kernel'])
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


# ResNet (timm / torchvision) <-> imgcls resnet.py.
_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def _timm_resnet_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
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
      out[f'params/{module}/kernel'] = _conv_t2f(value)
    elif module == 'head':
      out[f'params/head/{"kernel" if leaf == "weight" else "bias"}'] = (
          _linear(value) if leaf == 'weight' else value)
    elif leaf in _BN:
      collection, name = _BN[leaf]
      out[f'{collection}/{module}/{name}'] = value
    else:
      unknown.append(key)
  return out, unknown


def _timm_resnet_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
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
      sd[f'{tmod}.weight'] = _conv_f2t(value)
    elif module == 'head':
      sd[f'fc.{"weight" if leaf == "kernel" else "bias"}'] = (
          _linear(value) if leaf == 'kernel' else value)
    else:
      sd[f'{tmod}.{inverse_bn[(collection, leaf)]}'] = value
  return sd


# BiT: official .npz and timm ResNetV2 <-> imgcls bit.py.
_BIT_NPZ_UNIT = {'a': ('norm1', 'conv1'), 'b': ('norm2', 'conv2'), 'c': ('norm3', 'conv3')}
_GN = {'gamma': 'scale', 'beta': 'bias'}


def _bit_npz_to_imgcls(flat: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  flat = _strip_prefix(flat, 'root_block/standardized_conv2d/kernel')
  out, unknown = {}, []
  for key, value in flat.items():
    if key == 'root_block/standardized_conv2d/kernel':
      out['params/root_conv/kernel'] = value
    elif m := re.fullmatch(r'group_norm/(gamma|beta)', key):
      out[f'params/norm/{_GN[m[1]]}'] = value.reshape(-1)
    elif m := re.fullmatch(r'head/conv2d/(kernel|bias)', key):
      out[f'params/head/{m[1]}'] = value.reshape(-1, value.shape[-1]) if m[1] == 'kernel' \
          else value
    elif m := re.fullmatch(r'block(\d)/unit(\d+)/([abc])/(.*)', key):
      unit = f'params/stage{m[1]}_unit{int(m[2])}/'
      norm, conv = _BIT_NPZ_UNIT[m[3]]
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


def _bit_npz_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  gn = {v: k for k, v in _GN.items()}
  out = {}
  for key, value in flat.items():
    path = key.removeprefix('params/')
    if path == 'root_conv/kernel':
      out['resnet/root_block/standardized_conv2d/kernel'] = value
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


def _timm_bit_to_imgcls(sd: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  out, unknown = {}, []
  leaf = {'weight': 'scale', 'bias': 'bias'}
  for key, value in sd.items():
    if key == 'stem.conv.weight':
      out['params/root_conv/kernel'] = _conv_t2f(value)
    elif m := re.fullmatch(r'norm\.(weight|bias)', key):
      out[f'params/norm/{leaf[m[1]]}'] = value
    elif key == 'head.fc.weight':
      out['params/head/kernel'] = _linear(value.reshape(value.shape[0], -1))
    elif key == 'head.fc.bias':
      out['params/head/bias'] = value
    elif m := re.fullmatch(r'stages\.(\d)\.blocks\.(\d+)\.(norm\d|conv\d|downsample\.conv)\.'
                           r'(weight|bias)', key):
      unit = f'params/stage{int(m[1]) + 1}_unit{int(m[2]) + 1}/'
      if m[3].startswith('norm'):
        out[unit + f'{m[3]}/{leaf[m[4]]}'] = value
      elif m[4] == 'weight':
        out[unit + ('proj' if m[3] == 'downsample.conv' else m[3]) + '/kernel'] = \
            _conv_t2f(value)
      else:
        unknown.append(key)
    else:
      unknown.append(key)
  return out, unknown


def _timm_bit_from_imgcls(flat: Mapping[str, np.ndarray]) -> Flat:
  sd = {}
  leaf = {'scale': 'weight', 'bias': 'bias'}
  for key, value in flat.items():
    path = key.removeprefix('params/')
    if path == 'root_conv/kernel':
      sd['stem.conv.weight'] = _conv_f2t(value)
    elif m := re.fullmatch(r'norm/(scale|bias)', path):
      sd[f'norm.{leaf[m[1]]}'] = value
    elif path == 'head/kernel':
      sd['head.fc.weight'] = _linear(value)[:, :, None, None]
    elif path == 'head/bias':
      sd['head.fc.bias'] = value
    elif m := re.fullmatch(r'stage(\d)_unit(\d+)/(\w+)/(\w+)', path):
      unit = f'stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.'
      if m[3].startswith('norm'):
        sd[unit + f'{m[3]}.{leaf[m[4]]}'] = value
      else:
        name = 'downsample.conv' if m[3] == 'proj' else m[3]
        sd[unit + f'{name}.weight'] = _conv_f2t(value)
    else:
      raise WeightsError(f'timm_bit export: no timm name for {key}.')
  return sd


_TO_IMGCLS: dict[str, Callable[[Mapping[str, np.ndarray]], tuple[Flat, list[str]]]] = {
    'vit_npz': _vit_npz_to_imgcls,
    'bit_npz': _bit_npz_to_imgcls,
    'timm_vit': _timm_vit_to_imgcls,
    'timm_resnet': _timm_resnet_to_imgcls,
    'timm_bit': _timm_bit_to_imgcls,
}
_FROM_IMGCLS: dict[str, Callable[[Mapping[str, np.ndarray]], Flat]] = {
    'vit_npz': _vit_npz_from_imgcls,
    'bit_npz': _bit_npz_from_imgcls,
    'timm_vit': _timm_vit_from_imgcls,
    'timm_resnet': _timm_resnet_from_imgcls,
    'timm_bit': _timm_bit_from_imgcls,
}


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise WeightsError(f'Unknown weights format {fmt!r}; expected one of {", ".join(FORMATS)}.')


def to_imgcls(flat: Mapping[str, np.ndarray], fmt: str | None = None) -> tuple[Flat, list[str]]:
  """(imgcls-named flat variables 'params/...', 'batch_stats/...'; keys no rule knows)."""
  fmt = fmt or detect_format(flat)
  _check_format(fmt)
  return _TO_IMGCLS[fmt]({k: np.asarray(v) for k, v in flat.items()})


def from_imgcls(variables: Mapping[str, Any], fmt: str) -> Flat:
  """An imgcls model's variables in `fmt`'s names and layouts (float32 numpy)."""
  _check_format(fmt)
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
  return _FROM_IMGCLS[fmt](flat)


def export(variables: Mapping[str, Any], path: str | epath.PathLike, fmt: str = 'vit_npz') -> None:
  """Writes `variables` as an .npz in `fmt` (e.g. the official ViT layout that timm can load)."""
  write_npz(path, from_imgcls(variables, fmt))


# ----------------------------------------------------------------------------- merging


@dataclasses.dataclass
class MergeReport:
  """What load_pretrained did with every key, for the log and the workdir."""
  source: str = ''
  fmt: str = ''
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)  # in the model, not loaded
  unused: list[str] = dataclasses.field(default_factory=list)  # in the checkpoint, not used
  ignored: list[str] = dataclasses.field(default_factory=list)  # matched an `ignore` regex
  reshaped: list[str] = dataclasses.field(default_factory=list)  # 'key: (a, b) -> (c, d, e)'
  resized: list[str] = dataclasses.field(default_factory=list)  # position embeddings
  reinitialised: list[str] = dataclasses.field(default_factory=list)  # fresh init kept
  mismatched: list[str] = dataclasses.field(default_factory=list)  # shapes that cannot fit

  def ok(self) -> bool:
    return not (self.missing or self.unused or self.mismatched)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    lines = [f'Loaded {len(self.loaded)} arrays from {self.source or "a checkpoint"} '
             f'(format {self.fmt}).']
    for name in ('missing', 'unused', 'ignored', 'reshaped', 'resized', 'reinitialised',
                 'mismatched'):
      items = getattr(self, name)
      if items:
        lines.append(f'  {name} ({len(items)}):')
        lines.extend(f'    {item}' for item in items)
    return '\n'.join(lines)


def resize_posemb(posemb: np.ndarray, num_prefix: int, new_grid: tuple[int, int],
                  method: str = 'bilinear') -> np.ndarray:
  """Resizes a [1, prefix + h * w, D] position embedding to new_grid; prefix tokens are kept.

  Bilinear is what the official ViT fine-tuning code uses; 'bicubic' is offered as in timm.
  """
  if method not in ('bilinear', 'bicubic'):
    raise WeightsError(f"Unknown position-embedding resize {method!r}: use 'bilinear' or "
                       "'bicubic'.")
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  side = math.isqrt(grid.shape[0])
  if side * side != grid.shape[0]:
    raise WeightsError(f'The checkpoint position embedding has {grid.shape[0]} patch tokens, not '
                       'a square grid; it cannot be resized.')
  grid = grid.reshape(side, side, -1)
  resized = jax.image.resize(jnp.asarray(grid, jnp.float32), (*new_grid, grid.shape[-1]),
                             method=method, antialias=False)
  resized = np.asarray(resized, posemb.dtype).reshape(1, -1, grid.shape[-1])
  return np.concatenate([prefix, resized], axis=1)


def _target_grid(num_tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
  if grid is not None:
    if grid[0] * grid[1] != num_tokens:
      raise WeightsError(f'grid={grid} does not hold the model\'s {num_tokens} patch tokens.')
    return tuple(grid)
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise WeightsError(f'The model has {num_tokens} patch tokens, not a square grid: pass '
                       'grid=(rows, cols).')
  return side, side


def merge(template: Mapping[str, Any], converted: Mapping[str, np.ndarray], *,
          strict: bool = True, ignore: Iterable[str] = (), posemb_resize: str = 'bilinear',
          grid: tuple[int, int] | None = None, report: MergeReport | None = None,
          ) -> tuple[dict[str, Any], MergeReport]:
  """Puts `converted` (imgcls-named) into a copy of `template` (initialised variables).

  - keys matching an `ignore` regex (re.search on 'params/...' names) keep the template's value;
  - the head is zeroed (a fresh zero init) when the class count differs;
  - the position embedding is resized when the patch grid differs;
  - an array of the right size but another shape (fused timm attention, BiT's 1x1-conv head)
    is reshaped and reported.
  strict: raise WeightsError if anything is missing, unused or cannot fit.
  """
  report = report or MergeReport()
  patterns = [re.compile(p) for p in ignore]
  flat_template = flatten(template)
  out = dict(flat_template)
  for key, value in converted.items():
    if any(p.search(key) for p in patterns):
      report.ignored.append(key)
      continue
    if key not in flat_template:
      report.unused.append(key)
      continue
    want = flat_template[key]
    value = np.asarray(value)
    if value.shape == tuple(want.shape):
      pass
    elif key.startswith(HEAD_PREFIX) and value.shape[-1] != want.shape[-1]:
      report.reinitialised.append(f'{key}: checkpoint {value.shape}, model {tuple(want.shape)}')
      out[key] = jnp.zeros(want.shape, want.dtype)  # logits start at zero, as BiT and ViT do
      continue
    elif key == POSEMB_KEY and value.shape[-1] == want.shape[-1]:
      prefix = 1 if 'params/cls' in flat_template else 0
      new_grid = _target_grid(want.shape[1] - prefix, grid)
      old = value.shape[1]
      value = resize_posemb(value, prefix, new_grid, posemb_resize)
      report.resized.append(f'{key}: {old} -> {value.shape[1]} tokens ({posemb_resize})')
    elif value.size == math.prod(want.shape):
      report.reshaped.append(f'{key}: {value.shape} -> {tuple(want.shape)}')
      value = value.reshape(want.shape)
    else:
      report.mismatched.append(f'{key}: checkpoint {value.shape}, model {tuple(want.shape)}')
      continue
    out[key] = jnp.asarray(value, dtype=want.dtype)
    report.loaded.append(key)
  done = set(report.loaded) | {r.split(':')[0] for r in report.reinitialised}
  report.missing = [k for k in flat_template if k not in done
                    and not any(p.search(k) for p in patterns)]
  if strict and not report.ok():
    raise WeightsError(
        f'The checkpoint does not fit the model.\n{report}\nFix the model arguments (variant, '
        'pool, representation_size, num_classes...), list keys to skip with ignore=[regex...], '
        'or pass strict=False to keep the fresh init for whatever is missing.')
  return unflatten(out), report


def load_pretrained(source: str | epath.PathLike | Mapping[str, np.ndarray],
                    template: Mapping[str, Any], *, fmt: str | None = None,
                    strict: bool = True, ignore: Iterable[str] = (),
                    posemb_resize: str = 'bilinear', grid: tuple[int, int] | None = None,
                    ) -> tuple[dict[str, Any], MergeReport]:
  """Loads a checkpoint onto a model's initialised variables: a weights file (FORMATS), a flat
  {key: array} dict, or an imgcls workdir / Orbax checkpoint folder (its best step).

  Example (an official AugReg ViT-B/16 fine-tuned to 10 classes at 384 px):
    model = imgcls.get_model('vit_b16', num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 384, 384, 3)))
    variables, report = imgcls.load_pretrained('B_16-i21k-....npz', variables)
    print(report)   # head re-initialised, pos_embedding resized 197 -> 577 tokens
  """
  if not isinstance(source, Mapping) and epath.Path(source).is_dir():
    # An imgcls workdir or Orbax checkpoint: its (best) weights, already in imgcls names.
    from imgcls import inference  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    variables, _ = inference.restore_weights(inference.find_checkpoint(source))
    fmt, converted, unknown = 'imgcls', flatten(variables), []
  else:
    flat = read_file(source) if not isinstance(source, Mapping) else dict(source)
    fmt = fmt or detect_format(flat)
    converted, unknown = to_imgcls(flat, fmt)
  report = MergeReport(source=str(source) if not isinstance(source, Mapping) else 'a dict',
                       fmt=fmt)
  report.unused.extend(k for k in unknown if not any(re.search(p, k) for p in ignore))
  report.ignored.extend(k for k in unknown if any(re.search(p, k) for p in ignore))
  return merge(template, converted, strict=strict, ignore=ignore, posemb_resize=posemb_resize,
               grid=grid, report=report)


# ----------------------------------------------------------------------------- heads, features


def reset_head(variables: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
  """The same variables with a fresh zero head for `num_classes` (every imgcls model's 'head').

  Build the model with the new num_classes to apply them: logits start at zero, as in the
  official fine-tuning recipes.
  """
  params = dict(variables['params'])
  if 'head' not in params:
    raise WeightsError("These variables have no 'head' parameters to reset.")
  kernel = params['head']['kernel']
  params['head'] = {'kernel': jnp.zeros((kernel.shape[0], num_classes), kernel.dtype),
                    'bias': jnp.zeros((num_classes,), params['head']['bias'].dtype)}
  return {**variables, 'params': params}


def features(model: flax.linen.Module, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
  """Pre-logits features [B, D] (float32) of any imgcls model, in eval mode."""
  return model.apply(variables, x, train=False, return_features=True)[1]
