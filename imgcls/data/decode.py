"""Image files -> RGB, with PIL: one decode path for folder preparation and inference.

  load(path_or_bytes)  -> uint8 [H, W, C]   (any format PIL reads; EXIF rotation applied;
                                             C = 3, or 1 / as stored with channels=)
  from_pil(image)      -> uint8 [H, W, C]   (the same rules for an already opened PIL image)
  open_rgb(...)        -> PIL RGB image      (the same, as a PIL image)
  to_rgb(image)        -> PIL RGB image      (any mode; transparency composited on white)
  for_dataset(path)    -> bytes              (what an image folder stores: JPEG/PNG, RGB)
  stored_as_is(bytes)  -> bool               (whether for_dataset keeps a file's bytes as they
                                             are: RGB JPEG/PNG, upright, opaque)
  problem(path)        -> None or why the file does not decode

Conversion rules: grayscale, palette, CMYK and 16-bit images become RGB (16-bit keeps its
top 8 bits); transparent images (RGBA, LA, palette with transparency) are composited on
white, since dropping alpha would show whatever colour the transparent pixels store (often
black); EXIF rotation is applied because TF's decoders ignore it; animated GIF/WebP keep
their first frame. No TensorFlow here.

The files an image folder keeps as they are (stored_as_is) are decoded by TensorFlow in
training (the pp op `decode`), and TF's JPEG decoder uses libjpeg's fast integer DCT: its
pixels differ from PIL's by up to a few levels. imgcls.load decodes those files with TF too.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from imgcls.data.base import DataError

Source = Union[str, os.PathLike, bytes]
_ORIENTATION = 0x0112  # EXIF tag.


def to_rgb(image: Image.Image) -> Image.Image:
  """PIL image of any mode -> RGB; transparency composited on white."""
  if image.mode == 'P':
    image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
  if image.mode.startswith('I'):  # 16-bit grayscale PNG: keep the top 8 bits, not clip.
    image = Image.fromarray((np.asarray(image, np.uint32) >> 8).astype(np.uint8))
  if image.mode in ('RGBA', 'LA', 'PA'):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return image.convert('RGB')


def _rotated(image: Image.Image) -> bool:
  return image.getexif().get(_ORIENTATION, 1) not in (0, 1)


def _read(source: Source) -> tuple[bytes, str]:
  """(bytes, a name for messages) of a path or of bytes."""
  if isinstance(source, (bytes, bytearray)):
    return bytes(source), 'the image bytes'
  with open(source, 'rb') as f:
    return f.read(), str(source)


def _open(source: Source) -> Image.Image:
  """The decoded, upright (EXIF) image of a file or of bytes; DataError if it does not decode."""
  data, what = _read(source)
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # Decodes everything: corrupt and truncated files fail here.
      return ImageOps.exif_transpose(image) if _rotated(image) else image.copy()
  except Image.DecompressionBombError as e:
    raise DataError(f'{what} is too large for PIL\'s safety limit ({e}): downscale it.') from None
  except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError.
    raise DataError(f'{what} is not a readable image (corrupt, truncated or not an image: '
                    f'{e or type(e).__name__}).') from None


def _gray(image: Image.Image) -> bool:
  """Whether the image stores one channel without transparency (L, 1, 16-bit I;16)."""
  if image.mode == 'P':
    return False
  return image.mode in ('1', 'L') or image.mode.startswith('I') or image.mode == 'F'


def open_rgb(source: Source) -> Image.Image:
  """The image of a file or of bytes, upright (EXIF) and RGB; DataError if it does not decode."""
  return to_rgb(_open(source))


def load(source: Source, channels: int | None = 3) -> np.ndarray:
  """The image of a file or of bytes as uint8 [H, W, C], upright (EXIF rotation applied).

  channels=3: RGB (see to_rgb); 1: grayscale (luma of the RGB image, ITU-R 601 as PIL's
  'L'); None: as stored, as the pp op `decode` does: 1 for a grayscale file without
  transparency, else 3 (RGB, transparency composited on white).
  """
  _check_channels(channels)
  return _pixels(_open(source), channels)


def from_pil(image: Image.Image, channels: int | None = 3) -> np.ndarray:
  """An opened PIL image (any mode; EXIF rotation applied if it still has it) as `load` gives
  it: what imgcls.load(...).predict does with PIL images, so they match files."""
  _check_channels(channels)
  image.load()
  return _pixels(ImageOps.exif_transpose(image) if _rotated(image) else image, channels)


def _check_channels(channels: int | None) -> None:
  if channels not in (None, 1, 3):
    raise ValueError(f'channels must be 1, 3 or None (as stored), got {channels!r}')


def _pixels(image: Image.Image, channels: int | None) -> np.ndarray:
  if channels is None:
    channels = 1 if _gray(image) else 3
  if channels == 1 and _gray(image) and not image.mode.startswith('I'):
    return np.asarray(image.convert('L'), np.uint8)[..., None]
  rgb = to_rgb(image)
  if channels == 1:
    return np.asarray(rgb.convert('L'), np.uint8)[..., None]
  return np.asarray(rgb, np.uint8)


def for_dataset(path: str) -> bytes:
  """The image's bytes for a prepared dataset: RGB JPEG and PNG as they are (no generation
  loss, no work), everything else converted by the rules above and stored as lossless PNG."""
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    if _as_is(image):
      return data
    image = to_rgb(ImageOps.exif_transpose(image) if _rotated(image) else image)
  out = io.BytesIO()
  image.save(out, format='PNG')
  return out.getvalue()


def _as_is(image: Image.Image) -> bool:
  # An RGB PNG with a transparent colour (tRNS) may decode to 4 channels in TF: convert it.
  return (image.format in ('JPEG', 'PNG') and image.mode == 'RGB' and not _rotated(image) and
          'transparency' not in image.info)


def stored_as_is(data: bytes) -> bool:
  """Whether for_dataset keeps these bytes unchanged (so training decodes them with TF);
  False for anything PIL cannot identify. Reads the header only."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return _as_is(image)
  except (OSError, ValueError, SyntaxError):
    return False


def problem(path: str) -> str | None:
  """None if the file decodes fully, else why not."""
  try:
    with Image.open(path) as image:
      image.load()
  except Image.DecompressionBombError as e:
    return f'too large for PIL\'s safety limit ({e}); downscale it'
  except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
    return str(e) or type(e).__name__
  return None
