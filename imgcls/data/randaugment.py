"""Colour pp ops and RandAugment on uint8 images: randaugment, color_jitter."""

from __future__ import annotations

import math
from typing import Callable

from imgcls.data.base import DataError
from imgcls.data.preprocess import Op, on_image, register
from imgcls.registry import lazy_import

tf = lazy_import('tensorflow')


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
  return on_image(randaugment, key, random=True)


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
  return on_image(color_jitter, key, random=True)
