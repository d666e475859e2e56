"""Preprocessing ops from strings, big_vision style: 'decode|flip_lr|value_range(-1, 1)|onehot(10)'.

Each op works on the feature dict of ONE example (tf tensors) and returns a new dict. The
pipelines read images still encoded (TFDS SkipDecoding, so shuffling and caching move bytes,
not pixels): `decode` must come first in every string that uses the image. Random ops take
their randomness from the per-example stateless seed that the pipelines put under `_rng`
(int64 [2]) and split it, so an example's augmentation is a pure function of that seed.
Keys starting with '_' are internal: ops keep them, and the pipelines drop them at the end.

This module is the op registry and the parser; the ops live in ops_image.py, ops_label.py
(flagged label_op=True, so `image_only` can drop them for inference) and randaugment.py,
and importing imgcls.data (or imgcls.data.ops) registers them all. Checking a pp string
imports no TensorFlow: op factories only check their arguments, and TensorFlow is loaded
when an op first runs.
"""

from __future__ import annotations

import ast
from typing import Any, Callable

from imgcls.data.base import DataError
from imgcls.registry import Registry, lazy_import

tf = lazy_import('tensorflow')

Features = dict[str, Any]
Op = Callable[[Features], Features]
RNG_KEY = '_rng'
OPS: Registry[Callable[..., Op]] = Registry('pp op')


def register(name: str, label_op: bool = False) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Registers an op factory: `factory(*args, **kwargs)` returns the op (dict -> dict).

  label_op=True marks an op on the labels (onehot, multihot, keep), which `image_only`
  drops: inference runs the eval pp string without them.
  """
  return OPS.register(name, label_op=label_op)


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


def get_pp_fn(spec: str) -> Op:
  """The function (feature dict -> feature dict) for a pp string; bad strings fail here."""
  ops = []
  for text in filter(str.strip, spec.split('|')):
    name, args, kwargs = _parse_op(text)
    if name not in OPS:
      raise DataError(f'Unknown pp op {name!r} in {spec!r}. Known ops: {", ".join(list_ops())}.')
    try:
      ops.append(OPS.get(name)(*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise DataError(f'Bad arguments for pp op {text.strip()!r}: {e}') from None

  def pp(features: Features) -> Features:
    for op in ops:
      features = op(features)
    return features
  return pp


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
