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
import math
from typing import Any, Callable

import tensorflow as tf

from imgcls.data.sources import DataError
from imgcls.registry import Registry

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


@register('random_erasing')
def get_random_erasing(prob: float = 0.5, area_min: float = 0.02, area_max: float = 1 / 3,
                       ratio_min: float = 0.3, ratio_max: float = 3.3, value=0.0,
                       key: str = 'image') -> Op:
  """Random erasing (Zhong et al. 2017; timm's RandomErasing): with probability `prob`, one
  rectangle of area_min..area_max of the image (a fraction) and log-uniform aspect ratio
  ratio_min..ratio_max is filled with `value`, or with standard-normal noise if value='normal'
  (timm's mode='pixel'). Put it after value_range/normalize, on the float image.

  Written by hand: tf.image has no erasing op. Instead of timm's ten rejection tries, the
  rectangle's sides are clipped to the image, so an op call always costs the same.
  """
  if not 0 <= prob <= 1:
    raise ValueError(f'prob must be in [0, 1], got {prob}')
  if not 0 < area_min <= area_max <= 1:
    raise ValueError(f'need 0 < area_min <= area_max <= 1 (fraction), got {area_min}, {area_max}')
  if not 0 < ratio_min <= ratio_max:
    raise ValueError(f'need 0 < ratio_min <= ratio_max, got {ratio_min}, {ratio_max}')
  if not (value == 'normal' or isinstance(value, (int, float))):
    raise ValueError(f"value must be a number or 'normal', got {value!r}")

  def random_erasing(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if not image.dtype.is_floating:
      raise DataError('random_erasing works on float images: put it after value_range or '
                      f'normalize (got {image.dtype.name}).')
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    uniform = lambda s, lo, hi: tf.random.stateless_uniform([], s, lo, hi)
    shape = tf.shape(image)
    h_img, w_img = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area = h_img * w_img * uniform(seeds[0], area_min, area_max)
    ratio = tf.exp(uniform(seeds[1], tf.math.log(float(ratio_min)),
                           tf.math.log(float(ratio_max))))
    h = tf.cast(tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1, h_img), tf.int32)
    w = tf.cast(tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1, w_img), tf.int32)
    y = tf.random.stateless_uniform([], seeds[2], 0, shape[0] - h + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], seeds[3], 0, shape[1] - w + 1, dtype=tf.int32)
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]
    inside = (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w)
    inside &= uniform(seeds[4], 0.0, 1.0) < prob
    if value == 'normal':
      fill = tf.random.stateless_normal(shape, seeds[5], dtype=image.dtype)
    else:
      fill = tf.cast(tf.fill(shape, value), image.dtype)
    return tf.where(inside, fill, image)
  return _on_image(random_erasing, key, random=True)


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


@register('onehot', label_op=True)
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


@register('keep', label_op=True)
def get_keep(*keys: str) -> Op:
  """Keeps only `keys` (and the internal '_' keys the pipeline needs)."""
  def keep(features: Features) -> Features:
    return {k: v for k, v in features.items() if k in keys or k.startswith('_')}
  return keep


# ------------------------------------------------- colour ops and RandAugment (uint8 images)
#
# Written by hand on tf ops: tf.image has no autocontrast, equalize, posterize, solarize,
# sharpness, rotate or shear, and tensorflow-addons (which had some of them) is gone. They take
# and return uint8 [H, W, C] with C = 1 or 3, known statically or only at run time (`decode`
# without `channels`), so they run inside tf.data before value_range.

def _check_uint8(image: tf.Tensor, op: str) -> None:
  if image.dtype != tf.uint8:
    raise DataError(f'{op} works on uint8 images (0..255): put it before value_range or '
                    f'normalize (got {image.dtype.name}).')
  if image.shape[-1] not in (None, 1, 3):
    raise DataError(f'{op} needs 1 or 3 channels, got {image.shape[-1]}: use decode(channels=3) '
                    'or to_rgb first.')


def _by_channels(image: tf.Tensor, rgb_fn: Callable, gray_fn: Callable) -> tf.Tensor:
  """rgb_fn(image) for 3 channels, else gray_fn(image); decided at run time if C is unknown."""
  c = image.shape[-1]
  if c is not None:
    return rgb_fn(image) if c == 3 else gray_fn(image)
  return tf.cond(tf.shape(image)[-1] == 3, lambda: rgb_fn(image), lambda: gray_fn(image))


def _grayscale(x: tf.Tensor) -> tf.Tensor:
  """Float [H, W, C] -> luma [H, W, 1] (ITU-R 601 weights, as PIL's 'L'); 1 channel is kept."""
  return _by_channels(x, tf.image.rgb_to_grayscale, lambda x: x[..., :1])


def _blend(degenerate, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), rounded and clipped to uint8.

  factor 0 gives the degenerate image, 1 the image itself; above 1 extrapolates.
  """
  x = tf.cast(image, tf.float32)
  out = degenerate + factor * (x - degenerate)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _adjust_brightness(image: tf.Tensor, factor) -> tf.Tensor:
  return _blend(0.0, image, factor)


def _adjust_contrast(image: tf.Tensor, factor) -> tf.Tensor:
  # Toward the mean grey level of the whole image (PIL, torchvision), not per channel as
  # tf.image.adjust_contrast does.
  return _blend(tf.reduce_mean(_grayscale(tf.cast(image, tf.float32))), image, factor)


def _adjust_saturation(image: tf.Tensor, factor) -> tf.Tensor:
  # Toward the image's own grey version (PIL's Color, torchvision's saturation): a no-op on
  # 1-channel images.
  return _blend(_grayscale(tf.cast(image, tf.float32)), image, factor)


def _transform(image: tf.Tensor, transform: list, fill: float, interpolation: str) -> tf.Tensor:
  """Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2), with
  transform = [a0, a1, a2, b0, b1, b2]; pixels from outside the image get `fill`."""
  transform = tf.cast(tf.stack(transform + [0.0, 0.0]), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(fill, tf.float32), interpolation=interpolation.upper(),
      fill_mode='CONSTANT')
  return out[0]


# The RandAugment sub-ops. `level` is magnitude / 10 (a Python float in [0, 1]); the geometric
# ops also get a random `sign` (+-1 tensor). Arguments follow timm's auto_augment.py
# (_RAND_TRANSFORMS, the *_level_to_arg functions), which are those of the TF TPU RandAugment
# that big_vision uses, except translation: timm's TranslateXRel/YRel (a fraction of the image)
# instead of TF TPU's 100 pixels, which would empty a 28x28 image.

def _ra_autocontrast(image, level, **_):
  """Stretches each channel to 0..255 (PIL's ImageOps.autocontrast); flat channels are kept."""
  x = tf.cast(image, tf.float32)
  lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255 / tf.maximum(hi - lo, 1), 1.0)
  lo = tf.where(hi > lo, lo, 0.0)
  return tf.cast(tf.clip_by_value(tf.round((x - lo) * scale), 0, 255), tf.uint8)


def _ra_equalize(image, level, **_):
  """Per-channel histogram equalisation with PIL's lookup table (ImageOps.equalize)."""
  shape = tf.shape(image)
  x = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, shape[2]]))  # [C, H*W]
  hist = tf.math.bincount(x, minlength=256, maxlength=256, axis=-1)  # [C, 256]
  # PIL: step = (pixels - count of the top value) // 255; a step of 0 keeps the channel.
  top = tf.gather(hist, tf.reduce_max(x, axis=1), batch_dims=1)
  step = ((tf.reduce_sum(hist, axis=1) - top) // 255)[:, None]
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + step // 2) // tf.maximum(step, 1)
  out = tf.where(step > 0, tf.gather(tf.minimum(lut, 255), x, batch_dims=1), x)
  return tf.cast(tf.reshape(tf.transpose(out), shape), tf.uint8)


def _ra_invert(image, level, **_):
  return 255 - image


def _ra_rotate(image, level, sign, fill, interpolation):
  """Rotates about the centre by up to 30 degrees."""
  angle = sign * (level * 30) * math.pi / 180
  cos, sin = tf.cos(angle), tf.sin(angle)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  cy, cx = (hw[0] - 1) / 2, (hw[1] - 1) / 2
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy], fill, interpolation)


def _ra_posterize(image, level, **_):
  """Keeps the int(4 * level) most significant bits (0 bits: black), TF TPU's / timm's range."""
  bits = int(level * 4)
  return tf.bitwise.bitwise_and(image, tf.constant(256 - 2 ** (8 - bits), tf.uint8))


def _ra_solarize(image, level, **_):
  """Inverts the pixels at or above int(256 * level)."""
  threshold = int(level * 256)
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def _ra_solarize_add(image, level, **_):
  """Adds int(110 * level) to the pixels below 128, clipped."""
  added = tf.minimum(tf.cast(image, tf.int32) + int(level * 110), 255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def _enhance(adjust: Callable) -> Callable:
  """A PIL ImageEnhance sub-op: factor 0.1..1.9 (level 0..1), no sign (timm, TF TPU)."""
  return lambda image, level, **_: adjust(image, level * 1.8 + 0.1)


def _adjust_sharpness(image, factor):
  """PIL's ImageEnhance.Sharpness: blends with the image smoothed by the 3x3 kernel
  [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; the one-pixel border stays as it is."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)[:, :, None, None] / 13
  # Channels as a batch of 1-channel images: one conv for any channel count.
  smooth = tf.nn.conv2d(tf.transpose(x, [2, 0, 1])[..., None], kernel, 1, 'SAME')
  smooth = tf.transpose(smooth[..., 0], [1, 2, 0])
  shape = tf.shape(image)
  rows, cols = tf.range(shape[0])[:, None, None], tf.range(shape[1])[None, :, None]
  inner = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  return _blend(tf.where(inner, tf.round(smooth), x), image, factor)


def _ra_shear(axis: int) -> Callable:
  """Shears by up to 0.3 about the top-left corner (as PIL's affine in timm and TF TPU)."""
  def shear(image, level, sign, fill, interpolation):
    s = sign * (level * 0.3)
    transform = [1.0, s, 0.0, 0.0, 1.0, 0.0] if axis == 1 else [1.0, 0.0, 0.0, s, 1.0, 0.0]
    return _transform(image, transform, fill, interpolation)
  return shear


def _ra_translate(axis: int) -> Callable:
  """Translates by up to 45 % of the image's width (axis 1) or height (axis 0)."""
  def translate(image, level, sign, fill, interpolation):
    d = sign * (level * 0.45) * tf.cast(tf.shape(image)[axis], tf.float32)
    transform = [1.0, 0.0, d, 0.0, 1.0, 0.0] if axis == 1 else [1.0, 0.0, 0.0, 0.0, 1.0, d]
    return _transform(image, transform, fill, interpolation)
  return translate


_RAND_OPS: dict[str, Callable[..., tf.Tensor]] = {
    'AutoContrast': _ra_autocontrast,
    'Equalize': _ra_equalize,
    'Invert': _ra_invert,
    'Rotate': _ra_rotate,
    'Posterize': _ra_posterize,
    'Solarize': _ra_solarize,
    'SolarizeAdd': _ra_solarize_add,
    'Color': _enhance(_adjust_saturation),
    'Contrast': _enhance(_adjust_contrast),
    'Brightness': _enhance(_adjust_brightness),
    'Sharpness': _enhance(_adjust_sharpness),
    'ShearX': _ra_shear(1),
    'ShearY': _ra_shear(0),
    'TranslateX': _ra_translate(1),
    'TranslateY': _ra_translate(0),
}
RANDAUGMENT_OPS = tuple(_RAND_OPS)  # The default op set, for randaugment(ops=...).


@register('randaugment')
def get_randaugment(num_layers: int = 2, magnitude: float = 10, prob: float = 0.5, ops=None,
                    fill: float = 128, interpolation: str = 'nearest',
                    key: str = 'image') -> Op:
  """RandAugment (Cubuk et al. 2019) as timm's 'rand-m{magnitude}-n{num_layers}': num_layers
  times, one op drawn uniformly from `ops` (default RANDAUGMENT_OPS) is applied with
  probability `prob` at `magnitude` (0..10). On uint8 images: put it before value_range.

  prob=0.5 is timm's default; prob=1 is the TF TPU / big_vision version (whose Cutout is
  random_erasing here). Rotate, shear and translate fill uncovered pixels with `fill` (TF TPU's
  grey 128; 0 matches Fashion-MNIST's background) and sample with `interpolation` ('nearest',
  as TF TPU, or 'bilinear').
  """
  if not (isinstance(num_layers, int) and num_layers >= 0):
    raise ValueError(f'num_layers must be an int >= 0, got {num_layers!r}')
  if not (isinstance(magnitude, (int, float)) and 0 <= magnitude <= 10):
    raise ValueError(f'magnitude must be in [0, 10], got {magnitude!r}')
  if not 0 <= prob <= 1:
    raise ValueError(f'prob must be in [0, 1], got {prob}')
  if not 0 <= fill <= 255:
    raise ValueError(f'fill must be a pixel value in [0, 255], got {fill}')
  if interpolation not in ('nearest', 'bilinear'):
    raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
  names = RANDAUGMENT_OPS if ops is None else (ops,) if isinstance(ops, str) else tuple(ops)
  unknown = [n for n in names if n not in _RAND_OPS]
  if unknown or not names:
    raise ValueError(f'unknown RandAugment ops {unknown}; choose from {", ".join(_RAND_OPS)}')
  level = magnitude / 10

  def randaugment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    _check_uint8(image, 'randaugment')
    shape = image.shape
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
      s_op, s_apply, s_sign = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 3))
      index = tf.random.stateless_uniform([], s_op, 0, len(names), dtype=tf.int32)
      index = tf.where(tf.random.stateless_uniform([], s_apply) < prob, index, len(names))
      sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
      branches = [lambda fn=_RAND_OPS[n], im=image: fn(
          im, level=level, sign=sign, fill=float(fill), interpolation=interpolation)
                  for n in names]
      image = tf.switch_case(index, branches + [lambda im=image: im])  # last: not applied
      image = tf.ensure_shape(image, shape)
    return image
  return _on_image(randaugment, key, random=True)


@register('color_jitter')
def get_color_jitter(brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                     hue: float = 0.0, key: str = 'image') -> Op:
  """torchvision's ColorJitter (timm's default jitter), in a fixed order: brightness, contrast
  and saturation factors uniform in [max(0, 1 - x), 1 + x], a hue shift uniform in [-hue, hue]
  (a fraction of the colour circle). Saturation and hue leave 1-channel images alone. uint8.

  Brightness, contrast and saturation blend as PIL/torchvision do: tf.image's random_brightness
  adds a delta, random_contrast uses per-channel means and random_saturation scales HSV
  saturation. The hue shift is tf.image's (the same HSV rotation as torchvision's).
  """
  for name, value in (('brightness', brightness), ('contrast', contrast),
                      ('saturation', saturation)):
    if not (isinstance(value, (int, float)) and value >= 0):
      raise ValueError(f'{name} must be a number >= 0, got {value!r}')
  if not (isinstance(hue, (int, float)) and 0 <= hue <= 0.5):
    raise ValueError(f'hue must be in [0, 0.5], got {hue!r}')

  def color_jitter(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    _check_uint8(image, 'color_jitter')
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    factor = lambda s, x: tf.random.stateless_uniform([], s, max(0.0, 1.0 - x), 1.0 + x)
    if brightness:
      image = _adjust_brightness(image, factor(seeds[0], brightness))
    if contrast:
      image = _adjust_contrast(image, factor(seeds[1], contrast))
    if saturation:
      image = _by_channels(image, lambda im: _adjust_saturation(im, factor(seeds[2], saturation)),
                           lambda im: im)
    if hue:
      image = _by_channels(image, lambda im: tf.image.stateless_random_hue(im, hue, seeds[3]),
                           lambda im: im)
    return image
  return _on_image(color_jitter, key, random=True)


# Mean and std, in 0..1 units, that families of pretrained models were trained with.
NORMALIZE_PRESETS = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision, timm
    'inception': ((0.5,), (0.5,)),  # [-1, 1]: the official ViT and BiT checkpoints
    'clip': ((0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP
             (0.26862954, 0.26130258, 0.27577711)),
}


@register('normalize_preset')
def get_normalize_preset(name: str, key: str = 'image') -> Op:
  """normalize with a preset of NORMALIZE_PRESETS, on 0..255 input (after decode, not after
  value_range). The per-channel presets need 3 channels: use to_rgb on grayscale data."""
  if name not in NORMALIZE_PRESETS:
    raise DataError(f'Unknown normalize preset {name!r}; known presets: '
                    f'{", ".join(NORMALIZE_PRESETS)}.')
  mean, std = NORMALIZE_PRESETS[name]
  normalize = get_normalize([255 * m for m in mean], [255 * s for s in std], key)
  if len(mean) == 1:
    return normalize
  message = f'normalize_preset({name!r}) needs 3-channel images: put to_rgb before it'

  def check_rgb(image: tf.Tensor) -> tf.Tensor:
    # Without this a 1-channel image would broadcast silently to 3 channels.
    if image.shape[-1] is None:
      with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(image)[-1], 3,
                                                              message=message)]):
        return tf.identity(image)
    if image.shape[-1] != 3:
      raise DataError(f'{message} (got {image.shape[-1]} channels).')
    return image
  check = _on_image(check_rgb, key)
  return lambda features: normalize(check(features))
