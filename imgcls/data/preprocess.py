"""Preprocessing ops from strings, big_vision style: 'decode|flip_lr|value_range(-1, 1)|onehot(10)'.

Each op works on the feature dict of ONE example (tf tensors) and returns a new dict. The
pipelines read images still encoded (TFDS SkipDecoding, so shuffling and caching move bytes,
not pixels): `decode` must come first in every string that uses the image. Random ops take
their randomness from the per-example stateless seed that the pipelines put under `_rng`
(int64 [2]) and split it, so an example's augmentation is a pure function of that seed.
Keys starting with '_' are internal: ops keep them, and the pipelines drop them at the end.

Fusion: get_pp_fn replaces a pair of adjacent ops registered in FUSIONS (decode followed by
inception_crop, see ops_fused.py) by one op that gives the same output faster, so existing
strings get the speed unchanged. IMGCLS_PP_FUSE=0 (or get_pp_fn(spec, fuse=False)) turns it
off, for A/B measurements (scripts/bench_pipeline.py) and as an escape hatch.

This module is the op registry and the parser; the ops live in ops_image.py, ops_label.py
(flagged label_op=True, so `image_only` can drop them for inference) and randaugment.py,
and importing imgcls.data (or imgcls.data.ops) registers them all. Checking a pp string
imports no TensorFlow: op factories only check their arguments, and TensorFlow is loaded
when an op first runs.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any, Callable

from imgcls.data.base import DataError
from imgcls.registry import Registry, lazy_import

tf = lazy_import('tensorflow')

Features = dict[str, Any]
Op = Callable[[Features], Features]
RNG_KEY = '_rng'
OPS: Registry[Callable[..., Op]] = Registry('pp op')
# (first op, second op) -> fuser(first's arguments, second's arguments) -> Op, or None when
# those arguments cannot be fused (the two ops then run as written).
Fuser = Callable[[dict[str, Any], dict[str, Any]], Op | None]
FUSIONS: dict[tuple[str, str], Fuser] = {}
FUSE_ENV = 'IMGCLS_PP_FUSE'


def register(name: str, label_op: bool = False) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Registers an op factory: `factory(*args, **kwargs)` returns the op (dict -> dict).

  label_op=True marks an op on the labels (onehot, multihot, keep), which `image_only`
  drops: inference runs the eval pp string without them.
  """
  return OPS.register(name, label_op=label_op)


def register_fusion(first: str, second: str) -> Callable[[Fuser], Fuser]:
  """Registers `fuser(first_args, second_args) -> Op | None` for `first|second` in a pp string.

  Each dict holds every argument of that op's factory by name, defaults filled in. The fused
  op must give the output of the two ops run in turn (same pixels, same seeds consumed).
  """
  def add(fuser: Fuser) -> Fuser:
    FUSIONS[(first, second)] = fuser
    return fuser
  return add


def list_ops() -> list[str]:
  """Names of all registered pp ops."""
  return OPS.names()


def image_only(pp: str) -> str:
  """The pp string without its label ops (those registered with label_op=True).

  Ops are split on '|' and stripped; unknown or unparsable ops are kept (get_pp_fn reports
  them). 'decode|value_range(-1, 1)|onehot(10)' -> 'decode|value_range(-1, 1)'.
  """
  label_ops = set(OPS.names(label_op=True))
  ops = [op.strip() for op in pp.split('|') if op.strip()]
  return '|'.join(op for op in ops if _op_name(op) not in label_ops)


# Model placeholders in a pp string, filled from the model's registry info (its name's
# resolution and normalize preset; imgcls.models.pp_values) by imgcls.config.validate after
# every --config override: '{resolution}', '{normalize}', and '{resolution/0.875}' for
# round(resolution / 0.875), the eval resize before a central crop of 0.875 (timm's crop_pct).
PLACEHOLDER = re.compile(r'\{(\w+)(?:\s*/\s*(\d*\.?\d+))?\}')


def fill_placeholders(spec: str, values: Mapping[str, Any], source: str) -> str:
  """`spec` with its PLACEHOLDERs replaced by `values` (those of `source`, for messages)."""
  def fill(match: re.Match) -> str:
    key, divisor = match[1], match[2]
    if key not in values:
      raise DataError(f'unknown placeholder {match[0]} in pp {spec!r}; known: '
                      f'{", ".join("{" + k + "}" for k in values)}.')
    value = values[key]
    if value is None:
      raise DataError(f'pp {spec!r} asks for {match[0]}, but {source} has no default {key}: '
                      'write the value into the pp string.')
    if divisor is not None:
      if not isinstance(value, (int, float)) or float(divisor) <= 0:
        raise DataError(f'{match[0]} in pp {spec!r}: only a number divides by a positive '
                        'number, e.g. {resolution/0.875}.')
      value = round(value / float(divisor))
    return str(value)
  return PLACEHOLDER.sub(fill, spec)


def _op_name(text: str) -> str:
  return text.split('(', 1)[0].strip()


def _parse_op(text: str) -> tuple[str, tuple, dict]:
  """'name(1, k=2)' or 'name' -> (name, args, kwargs); arguments must be literals."""
  try:
    node = ast.parse(text.strip(), mode='eval').body
    if isinstance(node, ast.Name):
      return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      raise ValueError('expected name or name(args)')
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    if None in kwargs:
      raise ValueError('**kwargs are not allowed')
    return node.func.id, args, kwargs
  except (SyntaxError, ValueError) as e:
    raise DataError(f'Cannot parse pp op {text!r} ({e}). Write ops as name or name(args) '
                    "with literal args, joined by '|'; known ops: "
                    f'{", ".join(list_ops())}.') from None


def get_pp_fn(spec: str, fuse: bool | None = None) -> Op:
  """The function (feature dict -> feature dict) for a pp string; bad strings fail here.

  fuse: replace adjacent ops registered in FUSIONS by their fused op (same output, faster);
  None reads IMGCLS_PP_FUSE (on unless '0').
  """
  if PLACEHOLDER.search(spec):
    raise DataError(f'pp {spec!r} still has model placeholders ({PLACEHOLDER.search(spec)[0]}): '
                    'imgcls.config.validate fills them from model.name; validate the config '
                    'first (or fill them with preprocess.fill_placeholders).')
  calls = []  # (name, args, kwargs, op)
  for text in filter(str.strip, spec.split('|')):
    name, args, kwargs = _parse_op(text)
    if name not in OPS:
      raise DataError(f'Unknown pp op {name!r} in {spec!r}. Known ops: {", ".join(list_ops())}.')
    try:
      calls.append((name, args, kwargs, OPS.get(name)(*args, **kwargs)))
    except (TypeError, ValueError) as e:
      raise DataError(f'Bad arguments for pp op {text.strip()!r}: {e}') from None
  if fuse is None:
    fuse = os.environ.get(FUSE_ENV, '1') != '0'
  ops = _fused(calls) if fuse else [call[-1] for call in calls]

  def pp(features: Features) -> Features:
    for op in ops:
      features = op(features)
    return features
  return pp


def _arguments(name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
  """The op factory's arguments by name, defaults filled in (the call already succeeded)."""
  bound = inspect.signature(OPS.get(name)).bind(*args, **kwargs)
  bound.apply_defaults()
  return dict(bound.arguments)


def _fused(calls: list[tuple[str, tuple, dict, Op]]) -> list[Op]:
  """The ops of `calls`, each adjacent pair in FUSIONS replaced by its fused op."""
  ops, i = [], 0
  while i < len(calls):
    if i + 1 < len(calls) and (calls[i][0], calls[i + 1][0]) in FUSIONS:
      fuser = FUSIONS[(calls[i][0], calls[i + 1][0])]
      op = fuser(_arguments(*calls[i][:3]), _arguments(*calls[i + 1][:3]))
      if op is not None:
        ops.append(op)
        i += 2
        continue
    ops.append(calls[i][-1])
    i += 1
  return ops


# ------------------------------------------------------- helpers for writing ops

def to_hw(size) -> tuple[int, int]:
  """int or (h, w) -> (h, w)."""
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
    raise ValueError(f'size must be a positive int or (h, w), got {size!r}')
  return h, w


def next_seed(features: Features) -> tf.Tensor:
  """Splits the example's `_rng`: stores one half back, returns the other for one op."""
  if RNG_KEY not in features:
    raise DataError(f'A random pp op needs the per-example seed {RNG_KEY!r}; use it in a '
                    'pipeline from imgcls.data (train_iterator / eval_data).')
  rng, seed = tf.unstack(tf.random.experimental.stateless_split(features[RNG_KEY], 2))
  features[RNG_KEY] = rng
  return seed


def on_image(fn: Callable[..., tf.Tensor], key: str, random: bool = False) -> Op:
  """The op applying `fn(image)`, or `fn(image, seed)` if random, to features[key]."""
  def apply(features: Features) -> Features:
    features = dict(features)
    args = (next_seed(features),) if random else ()
    features[key] = fn(features[key], *args)
    return features
  return apply


def split_value_range(pp: str, move: bool = True) -> tuple[str, dict[str, float] | None]:
  """(pp without its final value_range, that op's arguments) when value_range(...) on the
  image, unclipped, is the last op before the label ops; else, or when not `move`, (pp, None).

  Used by the pipelines (`value_range_on_device`): tf.data then batches uint8 images (4x
  fewer bytes) and the step applies `imgcls.value_range.value_range_math` on the device.
  'decode|flip_lr|value_range(-1, 1)|onehot(10)' -> ('decode|flip_lr|onehot(10)',
  {'vmin': -1, 'vmax': 1, 'in_min': 0, 'in_max': 255}).
  """
  if not move:
    return pp, None
  ops = [op.strip() for op in pp.split('|') if op.strip()]
  label_ops = set(OPS.names(label_op=True))
  image_ops = [i for i, op in enumerate(ops) if _op_name(op) not in label_ops]
  if not image_ops or _op_name(ops[image_ops[-1]]) != 'value_range':
    return pp, None
  i = image_ops[-1]
  name, args, kwargs = _parse_op(ops[i])
  try:
    arguments = _arguments(name, args, kwargs)
  except TypeError:
    return pp, None  # get_pp_fn reports it
  if arguments['clip_values'] or arguments['key'] != 'image':
    return pp, None
  return '|'.join(ops[:i] + ops[i + 1:]), {k: arguments[k] for k in
                                           ('vmin', 'vmax', 'in_min', 'in_max')}
