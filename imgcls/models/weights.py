"""Pretrained weights: read and write checkpoint files, detect their format, merge them into a model.

Formats (`FORMATS`) are registered by the model families beside their code (convert.CONVERTERS):
  vit_npz      ViT .npz of google-research/vision_transformer and big_vision (vit_weights.py).
  timm_vit     timm VisionTransformer state dict: AugReg, DINOv2, SigLIP, CLIP (vit_weights.py).
  bit_npz      BiT .npz of google-research/big_transfer (bit_weights.py).
  timm_bit     timm ResNetV2 (BiT) state dict (bit_weights.py).
  timm_resnet  timm or torchvision ResNet state dict (resnet_weights.py).
  timm_convnext timm ConvNeXt / ConvNeXt-V2 state dict (convnext_weights.py).
Files may be .npz, .safetensors (numpy, no torch needed) or torch .pth/.pt/.bin (needs torch);
'FILE.npz:img' reads the subtree 'img' only (big_vision's load_params selection, e.g. a SigLIP
checkpoint's image tower under params/img/).
`export` writes a family's official format (vit_npz, bit_npz, timm_resnet, timm_convnext) unless
told another.

`load_pretrained` converts a checkpoint onto the variables of a freshly initialised model and
returns a `MergeReport`: what was loaded, missing, unused, reshaped (same size, other layout, e.g.
timm's fused attention), re-initialised (the head, when the class count differs) and resized
(position embeddings on a new grid, `posemb_resize`: 'source' resizes as the checkpoint's
source does, e.g. timm's antialiased bicubic). A checkpoint without a head (a backbone) leaves
the model's head at its fresh init, reported as re-initialised. It is strict by default: anything missing or left over is
an error naming the keys, unless `strict=False` or the keys match an `ignore` regex.

Converters are hand-written key maps: no library covers these layouts for Flax (timm's own
loaders only go into torch), and each map is checked against timm in the tests.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

# Each family's converters register themselves when CONVERTERS is first read.
from imgcls.models.convert import CONVERTERS, Flat, WeightsError
from imgcls.models import posemb as posemb_lib
from imgcls.models.vit import POSEMB_KEY

IMGCLS = 'imgcls'  # imgcls's own names (e.g. a workdir's weights): nothing to convert
HEAD_PREFIX = 'params/head/'
# How a position embedding is resized (posemb_lib.POSEMB_RESIZE_METHODS), or 'source': as the format's
# own source does (its converter's `posemb_resize` info; bilinear for imgcls's own names).
POSEMB_RESIZE_METHODS = (*posemb_lib.POSEMB_RESIZE_METHODS, 'source')


def formats() -> tuple[str, ...]:
  """The registered weights formats (`weights.FORMATS`); imports the converters."""
  return tuple(CONVERTERS.names())


def __getattr__(name: str):
  if name == 'FORMATS':  # read on use, so importing this module loads no converter
    return formats()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# ----------------------------------------------------------------------------- files


def read_file(path: str | epath.PathLike) -> Flat:
  """All arrays of a .npz, .safetensors or torch checkpoint file as {key: float32 numpy}."""
  path, subtree = _split_subtree(path)
  if subtree:
    return _select(read_file(path), subtree, path)
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


def _split_subtree(path: str | epath.PathLike) -> tuple[epath.Path, str]:
  """'ckpt.npz:img' -> (ckpt.npz, 'img') when ckpt.npz exists and the whole name does not."""
  text = str(path)
  head, sep, tail = text.rpartition(':')
  if sep and tail and '/' not in tail and not epath.Path(text).exists() and epath.Path(
      head).exists():
    return epath.Path(head), tail
  return epath.Path(path), ''


def _select(flat: Flat, subtree: str, path: epath.Path) -> Flat:
  """The arrays under the first '<subtree>/' level of their keys ('params/img/...' for 'img'),
  with everything up to it dropped."""
  out = {}
  for key, value in flat.items():
    parts = key.split('/')
    if subtree in parts[:-1]:
      out['/'.join(parts[parts.index(subtree) + 1:])] = value
  if not out:
    tops = sorted({'/'.join(k.split('/')[:2]) for k in flat})[:8]
    raise WeightsError(f'{path} has no subtree {subtree!r} (its keys start {", ".join(tops)}); '
                       'name one of those after the colon.')
  return out


def write_npz(path: str | epath.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes an .npz through a temporary file, so a crash never leaves half a file behind."""
  path = epath.Path(path)
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_bytes(buf.getvalue())
  tmp.rename(path)


def write_file(path: str | epath.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes .safetensors for a path ending so, else .npz; torch files are refused (they are
  read back with torch.load, which would not read what numpy writes)."""
  path = epath.Path(path)
  suffix = path.suffix.lower()
  if suffix in ('.pth', '.pt', '.bin'):
    raise WeightsError(f'Cannot write torch file {path}: write .npz or .safetensors, which '
                       'torch users load with numpy or safetensors.torch.load_file.')
  if suffix != '.safetensors':
    write_npz(path, arrays)
    return
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
  tmp.rename(path)


def flatten(variables: Mapping[str, Any]) -> Flat:
  """{'params': {'a': {'b': x}}} -> {'params/a/b': x}."""
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(dict(variables)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


# ----------------------------------------------------------------------------- formats


def _family(flat: Mapping[str, Any]) -> str | None:
  """The model family whose imgcls names `flat` has, or None."""
  keys = set(flat)
  found = {CONVERTERS.info(n)['family'] for n, c in CONVERTERS.items() if c.is_family(keys)}
  return found.pop() if len(found) == 1 else None


def detect_format(flat: Mapping[str, np.ndarray]) -> str:
  """Which of FORMATS a flat checkpoint is in, from its key names (each converter's own test);
  IMGCLS for a model's variables in imgcls's names that no format claims."""
  keys = set(flat)
  found = [name for name, c in CONVERTERS.items() if c.is_format(keys)]
  if len(found) == 1:
    return found[0]
  if not found and _family(keys):
    return IMGCLS
  sample = ', '.join(sorted(keys)[:5])
  what = f'looks like several formats ({", ".join(found)})' if found else 'has an unknown format'
  raise WeightsError(f'Cannot tell the format of a checkpoint with keys like {sample}: it '
                     f'{what}; pass fmt= one of {", ".join(formats())}.')


def _check_format(fmt: str) -> None:
  if fmt not in formats():
    raise WeightsError(f'Unknown weights format {fmt!r}; expected one of {", ".join(formats())}.')


def to_imgcls(flat: Mapping[str, np.ndarray], fmt: str | None = None) -> tuple[Flat, list[str]]:
  """(imgcls-named flat variables 'params/...', 'batch_stats/...'; keys no rule knows)."""
  fmt = fmt or detect_format(flat)
  flat = {k: np.asarray(v) for k, v in flat.items()}
  if fmt == IMGCLS:
    return flat, []
  _check_format(fmt)
  return CONVERTERS.get(fmt).to_imgcls(flat)


def from_imgcls(variables: Mapping[str, Any], fmt: str) -> Flat:
  """An imgcls model's variables in `fmt`'s names and layouts (float32 numpy)."""
  _check_format(fmt)
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
  return CONVERTERS.get(fmt).from_imgcls(flat)


def export_format(variables: Mapping[str, Any]) -> str:
  """The official format of the family the variables' structure belongs to."""
  family = _family(flatten(variables))
  if family is None:
    official = ', '.join(f'{n} ({CONVERTERS.info(n)["family"]})'
                         for n in CONVERTERS.names(official=True))
    raise WeightsError('Cannot tell which model family these variables come from (their names '
                       f'are not those of an imgcls ResNet, ViT, BiT or ConvNeXt); pass fmt= one of '
                       f'{", ".join(formats())}. Each family\'s own format: {official}.')
  return CONVERTERS.names(family=family, official=True)[0]


def export(variables: Mapping[str, Any], path: str | epath.PathLike,
           fmt: str | None = None) -> str:
  """Writes `variables` in `fmt` (default: their family's official format: vit_npz, bit_npz,
  timm_resnet or timm_convnext; fmt='timm_vit' for a timm ViT backbone) as .npz, or .safetensors if the path says so; returns the format written."""
  fmt = fmt or export_format(variables)
  write_file(path, from_imgcls(variables, fmt))
  return fmt


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
  if method not in posemb_lib.POSEMB_RESIZE_METHODS:
    raise WeightsError(f'Unknown position-embedding resize {method!r}: use one of '
                       f'{", ".join(posemb_lib.POSEMB_RESIZE_METHODS)}.')
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  side = math.isqrt(grid.shape[0])
  if side * side != grid.shape[0]:
    raise WeightsError(f'The checkpoint position embedding has {grid.shape[0]} patch tokens, not '
                       'a square grid; it cannot be resized.')
  if method not in ('bilinear', 'bicubic'):  # the sources' own resizes (posemb_lib.resample_grid)
    return posemb_lib.resample_posemb(np.asarray(posemb), num_prefix, (side, side), new_grid, method)
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
  posemb_resize = 'bilinear' if posemb_resize == 'source' else posemb_resize  # imgcls's own
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
      try:
        prefix = posemb_lib.posemb_prefix(flat_template, value.shape[1], want.shape[1], grid)
      except ValueError as e:
        raise WeightsError(str(e)) from None
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
  if not any(k.startswith(HEAD_PREFIX) for k in converted):  # a backbone without a head
    for key in flat_template:
      if key.startswith(HEAD_PREFIX):
        report.reinitialised.append(f'{key}: not in the checkpoint, fresh init kept')
  done = set(report.loaded) | {r.split(':')[0] for r in report.reinitialised}
  report.missing = [k for k in flat_template if k not in done
                    and not any(p.search(k) for p in patterns)]
  if strict and not report.ok():
    raise WeightsError(
        f'The checkpoint does not fit the model.\n{report}\nFix the model arguments (variant, '
        'pool, representation_size, num_classes...), list keys to skip with ignore=[regex...], '
        'or pass strict=False to keep the fresh init for whatever is missing.')
  return unflatten(out), report


def load_pretrained(source: str | epath.PathLike | Mapping[str, Any],
                    template: Mapping[str, Any], *, fmt: str | None = None,
                    strict: bool = True, ignore: Iterable[str] = (),
                    posemb_resize: str = 'bilinear', grid: tuple[int, int] | None = None,
                    ) -> tuple[dict[str, Any], MergeReport]:
  """Loads a checkpoint onto a model's initialised variables: a weights file (FORMATS), or a
  {key: array} mapping, flat or nested (e.g. the weights of an imgcls workdir, in IMGCLS names).

  Example (an official AugReg ViT-B/16 fine-tuned to 10 classes at 384 px):
    model = imgcls.get_model('vit_b16', num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 384, 384, 3)))
    variables, report = imgcls.load_pretrained('B_16-i21k-....npz', variables)
    print(report)   # head re-initialised, pos_embedding resized 197 -> 577 tokens
  """
  if isinstance(source, Mapping):
    flat = flatten(source) if any(isinstance(v, Mapping) for v in source.values()) \
        else dict(source)
  elif epath.Path(source).is_dir():
    raise WeightsError(
        f'{source} is a directory, not a weights file. An imgcls workdir is read with '
        "imgcls.checkpoints: pass its weights as a mapping, e.g. load_pretrained(checkpoints."
        "find(workdir, 'best').weights(), variables); config.model_init accepts workdirs.")
  else:
    flat = read_file(source)
  fmt = fmt or detect_format(flat)
  if posemb_resize == 'source':
    posemb_resize = CONVERTERS.info(fmt).get('posemb_resize', 'bilinear') if fmt in formats() \
        else 'bilinear'
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
