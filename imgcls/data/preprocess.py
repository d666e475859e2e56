"""Preprocessing ops from strings, big_vision style: 'decode|flip_lr|value_range(-1, 1)|onehot(10)'.

Each op works on the feature dict of ONE example (tf tensors) and returns a new dict. The
pipelines read images still encoded (TFDS SkipDecoding, so shuffling and caching move bytes,
not pixels): `decode` must come first in every string that uses the image. Random ops take
their randomness from the per-example stateless seed that the pipelines put under `_rng`
(int64 [2]) and split it, so an example's augmentation is a pure function of that seed.
Keys starting with '_' are internal: ops keep them, and the pipelines drop them at the end.
"""

from __future__ import annotations

import ast
from typing import Any, Callable

import tensorflow as tf

from imgcls.data.sources import DataError

Features = dict[str, Any]
Op = Callable[[Features], Features]
RNG_KEY = '_rng'
_REGISTRY: dict[str, Callable[..., Op]] = {}


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Registers an op factory: `factory(*args, **kwargs)` returns the op (dict -> dict)."""
  def wrap(factory: Callable[..., Op]) -> Callable[..., Op]:
    if name in _REGISTRY:
      raise ValueError(f'pp op {name!r} is registered twice')
    _REGISTRY[name] = factory
    return factory
  return wrap


def list_ops() -> list[str]:
  """Names of all registered pp ops."""
  return sorted(_REGISTRY)


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
    if name not in _REGISTRY:
      raise DataError(f'Unknown pp op {name!r} in {spec!r}. Known ops: {", ".join(list_ops())}.')
    try:
      ops.append(_REGISTRY[name](*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise DataError(f'Bad arguments for pp op {text.strip()!r}: {e}') from None

  def pp(features: Features) -> Features:
    for op in ops:
      features = op(features)
    return features
  return pp


# ----------------------------------------------------------------- helpers

def _hw(size) -> tuple[int, int]:
  """int or (h, w) -> (h, w)."""
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
    raise ValueError(f'size must be a positive int or (h, w), got {size!r}')
  return h, w


def _next_seed(features: Features) -> tf.Tensor:
  """Splits the example's `_rng`: stores one half back, returns the other for one op."""
  if RNG_KEY not in features:
    raise DataError(f'A random pp op needs the per-example seed {RNG_KEY!r}; use it in a '
                    'pipeline from imgcls.data (train_iterator / eval_data).')
  rng, seed = tf.unstack(tf.random.experimental.stateless_split(features[RNG_KEY], 2))
  features[RNG_KEY] = rng
  return seed


def _on_image(fn: Callable[..., tf.Tensor], key: str, random: bool = False) -> Op:
  """The op applying `fn(image)`, or `fn(image, seed)` if random, to features[key]."""
  def apply(features: Features) -> Features:
    features = dict(features)
    args = (_next_seed(features),) if random else ()
    features[key] = fn(features[key], *args)
    return features
  return apply


def _check_method(method: str) -> None:
  methods = ('bilinear', 'nearest', 'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian',
             'mitchellcubic')
  if method not in methods:
    raise ValueError(f'method must be one of {methods}, got {method!r}')


def _resize(image: tf.Tensor, size, method: str, antialias: bool) -> tf.Tensor:
  """tf.image.resize that keeps the dtype (uint8 is rounded and clipped)."""
  out = tf.image.resize(image, size, method=method, antialias=antialias)
  if out.dtype != image.dtype and image.dtype.is_integer:
    out = tf.clip_by_value(tf.round(out), image.dtype.min, image.dtype.max)
  return tf.cast(out, image.dtype)


# --------------------------------------------------------------------- ops

@register('decode')
def get_decode(channels: int | None = None, key: str = 'image') -> Op:
  """Encoded image bytes -> uint8 [H, W, C]; channels=None keeps the file's (1 for MNIST)."""
  def decode(image: tf.Tensor) -> tf.Tensor:
    if image.dtype != tf.string:  # Already decoded (e.g. a dataset read with decoding).
      return image
    return tf.io.decode_image(image, channels=channels or 0, expand_animations=False)
  return _on_image(decode, key)


@register('resize')
def get_resize(size, method: str = 'bilinear', antialias: bool = False,
               key: str = 'image') -> Op:
  """Resizes to size (int or (h, w)); keeps the dtype."""
  hw = _hw(size)
  _check_method(method)
  return _on_image(lambda im: _resize(im, hw, method, antialias), key)


@register('resize_small')
def get_resize_small(size: int, method: str = 'bilinear', antialias: bool = False,
                     key: str = 'image') -> Op:
  """Resizes so the shorter side is `size`, keeping the aspect ratio and the dtype."""
  if not (isinstance(size, int) and size > 0):
    raise ValueError(f'size must be a positive int, got {size!r}')
  _check_method(method)

  def resize_small(image: tf.Tensor) -> tf.Tensor:
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.cast(tf.round(hw * (size / tf.reduce_min(hw))), tf.int32)
    return _resize(image, tf.maximum(new, size), method, antialias)
  return _on_image(resize_small, key)


@register('central_crop')
def get_central_crop(size, key: str = 'image') -> Op:
  """Crops the central (h, w) window."""
  h, w = _hw(size)

  def central_crop(image: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(image)
    return tf.image.crop_to_bounding_box(image, (shape[0] - h) // 2, (shape[1] - w) // 2, h, w)
  return _on_image(central_crop, key)


@register('random_crop')
def get_random_crop(size, pad: int = 0, mode: str = 'constant', key: str = 'image') -> Op:
  """Pads each side by `pad` (mode 'constant': zeros, or 'reflect'), then crops (h, w) randomly."""
  h, w = _hw(size)
  if mode.upper() not in ('CONSTANT', 'REFLECT', 'SYMMETRIC'):
    raise ValueError(f"mode must be 'constant', 'reflect' or 'symmetric', got {mode!r}")

  def random_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if pad:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=mode.upper())
    crop = tf.concat([[h, w], tf.shape(image)[2:]], axis=0)
    return tf.image.stateless_random_crop(image, crop, seed=seed)
  return _on_image(random_crop, key, random=True)


@register('inception_crop')
def get_inception_crop(size=None, area_min: float = 5.0, area_max: float = 100.0,
                       ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                       method: str = 'bilinear', antialias: bool = False,
                       key: str = 'image') -> Op:
  """Random resized crop (Inception / timm's RandomResizedCrop): a window of area_min..area_max
  percent of the image and aspect ratio ratio_min..ratio_max, resized to `size` (None: no resize).

  tf.image.stateless_sample_distorted_bounding_box draws the window (ten tries, then the whole
  image), as big_vision and the official ViT/BiT input pipelines do.
  """
  hw = _hw(size) if size is not None else None
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f'need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}')
  if not 0 < ratio_min <= ratio_max:
    raise ValueError(f'need 0 < ratio_min <= ratio_max, got {ratio_min}, {ratio_max}')
  _check_method(method)

  def inception_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
        area_range=(area_min / 100, area_max / 100), aspect_ratio_range=(ratio_min, ratio_max),
        min_object_covered=0, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return _resize(crop, hw, method, antialias) if hw else crop
  return _on_image(inception_crop, key, random=True)


@register('flip_lr')
def get_flip_lr(key: str = 'image') -> Op:
  """Flips left-right with probability 1/2."""
  return _on_image(tf.image.stateless_random_flip_left_right, key, random=True)


@register('value_range')
def get_value_range(vmin: float, vmax: float, in_min: float = 0, in_max: float = 255,
                    clip_values: bool = False, key: str = 'image') -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax], as float32."""
  if in_max == in_min:
    raise ValueError('in_max must differ from in_min')

  def value_range(image: tf.Tensor) -> tf.Tensor:
    x = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
    x = vmin + x * (vmax - vmin)
    return tf.clip_by_value(x, vmin, vmax) if clip_values else x
  return _on_image(value_range, key)


@register('normalize')
def get_normalize(mean, std, key: str = 'image') -> Op:
  """(x - mean) / std per channel, float32; mean/std in the input's units (0..255 after decode)."""
  mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

  def normalize(image: tf.Tensor) -> tf.Tensor:
    return (tf.cast(image, tf.float32) - mean) / std
  return _on_image(normalize, key)


@register('to_rgb')
def get_to_rgb(key: str = 'image') -> Op:
  """1 channel -> 3 (repeated), 4 (RGBA) -> 3 (alpha dropped), 3 unchanged."""
  def to_rgb(image: tf.Tensor) -> tf.Tensor:
    c = image.shape[-1]
    if c is None:  # Unknown until run time: decode(channels=...) fixes it statically.
      image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                      lambda: image[..., :3])
      return tf.ensure_shape(image, [None, None, 3])
    return tf.tile(image, [1, 1, 3]) if c == 1 else image[..., :3]
  return _on_image(to_rgb, key)


register('grayscale_to_rgb')(get_to_rgb)


@register('onehot')
def get_onehot(num_classes: int, key: str = 'label', key_result: str = 'labels',
               on: float = 1.0, off: float = 0.0) -> Op:
  """Integer label -> float32 one-hot [num_classes] under key_result."""
  if not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')

  def onehot(features: Features) -> Features:
    features = dict(features)
    features[key_result] = tf.one_hot(features[key], num_classes, on, off, dtype=tf.float32)
    return features
  return onehot


@register('keep')
def get_keep(*keys: str) -> Op:
  """Keeps only `keys` (and the internal '_' keys the pipeline needs)."""
  def keep(features: Features) -> Features:
    return {k: v for k, v in features.items() if k in keys or k.startswith('_')}
  return keep
