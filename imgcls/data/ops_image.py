"""Image pp ops: decode, resizes and crops, flips, random erasing, value ranges and
normalisation, channel conversion. Each works on one example's feature dict (see
preprocess.py); factories check their arguments, TensorFlow runs inside the returned op."""

from __future__ import annotations

from imgcls.data.base import DataError
from imgcls.data.preprocess import Op, on_image, register, to_hw
from imgcls.registry import lazy_import
from imgcls.value_range import value_range_math

tf = lazy_import('tensorflow')


def _check_method(method: str) -> None:
  methods = ('bilinear', 'nearest', 'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian',
             'mitchellcubic')
  if method not in methods:
    raise ValueError(f'method must be one of {methods}, got {method!r}')


# Kernels with negative lobes: only their results can leave the input's range. The others
# (bilinear, area, gaussian, nearest) average their inputs, so after rounding the result of
# an integer image is already in range and clipping it would change nothing.
_OVERSHOOT = ('bicubic', 'lanczos3', 'lanczos5', 'mitchellcubic')


def resize_keep_dtype(image: tf.Tensor, size, method: str, antialias: bool) -> tf.Tensor:
  """tf.image.resize that keeps the dtype: an integer image is rounded back, and clipped where
  the kernel overshoots.

  An integer image goes in as float32: TF's kernels compute in float32 from either input, so
  the result has the same bits, but their float32 input path runs faster than their uint8 one
  in TF 2.21, cast included (bilinear 300 -> 224 px: 0.61 against 0.79 ms; bicubic, area and
  antialiased bilinear too). 'nearest' copies pixels and keeps the dtype by itself.
  """
  if image.dtype.is_integer and method != 'nearest':
    out = tf.image.resize(tf.cast(image, tf.float32), size, method=method, antialias=antialias)
    out = tf.round(out)
    if method in _OVERSHOOT:
      out = tf.clip_by_value(out, image.dtype.min, image.dtype.max)
    return tf.cast(out, image.dtype)
  return tf.cast(tf.image.resize(image, size, method=method, antialias=antialias), image.dtype)


def _floats(value, name: str) -> list[float] | float:
  """A number or a list of numbers (per channel), as floats; ValueError otherwise."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if (isinstance(value, (list, tuple)) and value and
      all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
    return [float(v) for v in value]
  raise ValueError(f'{name} must be a number or a list of numbers (per channel), got {value!r}')


# --------------------------------------------------------------------- ops

def decode_image(image: tf.Tensor, channels: int | None) -> tf.Tensor:
  """What the op `decode` does to one image (also the fused ops' path for non-JPEGs)."""
  if image.dtype != tf.string:  # Already decoded (e.g. a dataset read with decoding).
    return image
  return tf.io.decode_image(image, channels=channels or 0, expand_animations=False)


@register('decode')
def get_decode(channels: int | None = None, key: str = 'image') -> Op:
  """Encoded image bytes -> uint8 [H, W, C]; channels=None keeps the file's (1 for MNIST).

  Followed by inception_crop, get_pp_fn runs the two as one op that decodes only the
  window of a JPEG (ops_fused.py)."""
  return on_image(lambda image: decode_image(image, channels), key)


@register('resize')
def get_resize(size, method: str = 'bilinear', antialias: bool = False,
               key: str = 'image') -> Op:
  """Resizes to size (int or (h, w)); keeps the dtype."""
  hw = to_hw(size)
  _check_method(method)
  return on_image(lambda im: resize_keep_dtype(im, hw, method, antialias), key)


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
    return resize_keep_dtype(image, tf.maximum(new, size), method, antialias)
  return on_image(resize_small, key)


@register('central_crop')
def get_central_crop(size, key: str = 'image') -> Op:
  """Crops the central (h, w) window."""
  h, w = to_hw(size)

  def central_crop(image: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(image)
    return tf.image.crop_to_bounding_box(image, (shape[0] - h) // 2, (shape[1] - w) // 2, h, w)
  return on_image(central_crop, key)


@register('random_crop')
def get_random_crop(size, pad: int = 0, mode: str = 'constant', key: str = 'image') -> Op:
  """Pads each side by `pad` (mode 'constant': zeros, or 'reflect'), then crops (h, w) randomly."""
  h, w = to_hw(size)
  if mode.upper() not in ('CONSTANT', 'REFLECT', 'SYMMETRIC'):
    raise ValueError(f"mode must be 'constant', 'reflect' or 'symmetric', got {mode!r}")

  def random_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if pad:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=mode.upper())
    crop = tf.concat([[h, w], tf.shape(image)[2:]], axis=0)
    return tf.image.stateless_random_crop(image, crop, seed=seed)
  return on_image(random_crop, key, random=True)


@register('inception_crop')
def get_inception_crop(size=None, area_min: float = 5.0, area_max: float = 100.0,
                       ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                       method: str = 'bilinear', antialias: bool = False,
                       key: str = 'image') -> Op:
  """Random resized crop (Inception / timm's RandomResizedCrop): a window of area_min..area_max
  percent of the image and aspect ratio ratio_min..ratio_max, resized to `size` (None: no resize).

  tf.image.stateless_sample_distorted_bounding_box draws the window (100 tries, then the whole
  image), as big_vision and the official ViT/BiT input pipelines do. Right after decode, the
  two run as one op that decodes only the window of a JPEG (ops_fused.py).
  """
  hw = to_hw(size) if size is not None else None
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f'need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}')
  if not 0 < ratio_min <= ratio_max:
    raise ValueError(f'need 0 < ratio_min <= ratio_max, got {ratio_min}, {ratio_max}')
  _check_method(method)

  def inception_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    begin, crop_size = inception_window(tf.shape(image), seed, area_min, area_max, ratio_min,
                                        ratio_max)
    crop = tf.slice(image, begin, crop_size)
    return resize_keep_dtype(crop, hw, method, antialias) if hw else crop
  return on_image(inception_crop, key, random=True)


def inception_window(shape: tf.Tensor, seed: tf.Tensor, area_min: float, area_max: float,
                     ratio_min: float, ratio_max: float) -> tuple[tf.Tensor, tf.Tensor]:
  """The window of inception_crop for an image of `shape` ([h, w, c]): (begin [y, x, 0],
  size [h, w, -1]) for tf.slice. The one sampler of both inception_crop and its fusion with
  decode (ops_fused.py), so the two draw the same window from the same seed."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
      area_range=(area_min / 100, area_max / 100), aspect_ratio_range=(ratio_min, ratio_max),
      min_object_covered=0, use_image_if_no_bounding_boxes=True)
  return begin, size


@register('flip_lr')
def get_flip_lr(key: str = 'image') -> Op:
  """Flips left-right with probability 1/2."""
  return on_image(lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed),
                  key, random=True)


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
  return on_image(random_erasing, key, random=True)


@register('value_range')
def get_value_range(vmin: float, vmax: float, in_min: float = 0, in_max: float = 255,
                    clip_values: bool = False, key: str = 'image') -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax], as float32."""
  if in_max == in_min:
    raise ValueError('in_max must differ from in_min')

  def value_range(image: tf.Tensor) -> tf.Tensor:
    x = value_range_math(tf.cast(image, tf.float32), vmin, vmax, in_min, in_max)
    return tf.clip_by_value(x, vmin, vmax) if clip_values else x
  return on_image(value_range, key)


@register('normalize')
def get_normalize(mean, std, key: str = 'image') -> Op:
  """(x - mean) / std per channel, float32; mean/std in the input's units (0..255 after decode)."""
  mean, std = _floats(mean, 'mean'), _floats(std, 'std')
  if any(s == 0 for s in std):
    raise ValueError(f'std must not be 0, got {std}')

  def normalize(image: tf.Tensor) -> tf.Tensor:
    return (tf.cast(image, tf.float32) - mean) / std
  return on_image(normalize, key)


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
  return on_image(to_rgb, key)


register('grayscale_to_rgb')(get_to_rgb)


# Mean and std, in 0..1 units, that families of pretrained models were trained with.
NORMALIZE_PRESETS = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision, timm
    'inception': ((0.5,), (0.5,)),  # [-1, 1]: the official ViT and BiT checkpoints
    'clip': ((0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP
             (0.26862954, 0.26130258, 0.27577711)),
    'siglip': ((0.5,), (0.5,)),  # [-1, 1]: SigLIP / SigLIP 2 (big_vision, timm)
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
  check = on_image(check_rgb, key)
  return lambda features: normalize(check(features))
