"""Fused pp ops: adjacent ops that get_pp_fn runs as one, with the same output, faster.

decode|inception_crop: for JPEG bytes the window is drawn from the header's shape
(tf.image.extract_jpeg_shape) by the sampler of inception_crop (ops_image.inception_window)
with the same seed, and only that window is decoded (tf.image.decode_and_crop_jpeg: libjpeg
skips the IDCT and colour conversion outside it and stops after its last row). Other bytes
(PNG, GIF, BMP), JPEGs that do not end with the EOI marker, and images that are already
decoded take the plain path: decode, then crop. The window, the seeds consumed and the
pixels are those of the two ops run in turn (tests/test_fused_decode.py).

Why fusion in the parser instead of a new op name (big_vision's
decode_jpeg_and_inception_crop): every existing config gets the speed without being
rewritten, and since the output is the same, no pp string changes meaning.
IMGCLS_PP_FUSE=0 turns fusion off (preprocess.get_pp_fn).

Exactness, three details:
- Chroma upsampling: libjpeg's fancy upsampling treats the edge of the decoded region as the
  edge of the image, so for 4:2:0 and 4:2:2 JPEGs (most photos) a window decoded alone
  differs from the full decode by a few levels in its border columns. Decoding a window
  MARGIN pixels larger on each side (clipped to the image) and slicing the window out of it
  gives exactly the full decode's pixels.
- The DCT method: decode_image and decode_and_crop_jpeg both use TF's default (libjpeg's
  fast integer DCT); neither sets dct_method, so they cannot drift apart.
- Errors: a JPEG cut short (a partial download, the common corruption) lacks the EOI marker
  at its end, so it takes the plain path and fails as before, even where its window alone
  would decode. Corrupt entropy-coded data below the window is never read, so there the
  fused op gives the window where full decoding fails; image folders cannot hold such files
  (preparation decodes every file with PIL and rejects those that fail).

Not fused: random_crop and central_crop. No config puts them right after decode on large
JPEGs (the eval strings resize first, and a crop moved before a resize changes pixels), and
random_crop's offsets come from inside tf.image.stateless_random_crop, which a fused op
would have to copy.
"""

from __future__ import annotations

from typing import Any

from imgcls.data.ops_image import decode_image, inception_window, resize_keep_dtype
from imgcls.data.preprocess import Op, on_image, register_fusion, to_hw
from imgcls.registry import lazy_import

tf = lazy_import('tensorflow')

MARGIN = 2  # Pixels decoded around the window (>= 1 makes the chroma edges exact).
_EOI = b'\xff\xd9'  # JPEG end-of-image marker.


def _complete_jpeg(data: tf.Tensor) -> tf.Tensor:
  """Whether `data` (a scalar string) starts like a JPEG and ends with the EOI marker."""
  length = tf.strings.length(data)
  tail = tf.strings.substr(data, tf.maximum(length - 2, 0), 2)
  return tf.logical_and(tf.io.is_jpeg(data), tf.equal(tail, _EOI))


def _decode_window(data: tf.Tensor, shape: tf.Tensor, begin: tf.Tensor, size: tf.Tensor,
                   channels: int) -> tf.Tensor:
  """The [begin, begin + size) window of a JPEG of `shape`, equal to decoding it whole and
  slicing."""
  start = tf.maximum(begin[:2] - MARGIN, 0)
  stop = tf.minimum(begin[:2] + size[:2] + MARGIN, shape[:2])
  image = tf.image.decode_and_crop_jpeg(data, tf.concat([start, stop - start], 0),
                                        channels=channels)
  offset = begin[:2] - start
  return image[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]


@register_fusion('decode', 'inception_crop')
def decode_inception_crop(decode: dict[str, Any], crop: dict[str, Any]) -> Op | None:
  """decode(channels, key)|inception_crop(...) as one op; None if the keys differ."""
  if decode['key'] != crop['key']:
    return None
  channels = decode['channels'] or 0
  hw = to_hw(crop['size']) if crop['size'] is not None else None
  ranges = crop['area_min'], crop['area_max'], crop['ratio_min'], crop['ratio_max']

  def fused(data: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    def plain():
      image = decode_image(data, channels)
      begin, size = inception_window(tf.shape(image), seed, *ranges)
      return tf.slice(image, begin, size)

    def jpeg():
      shape = tf.image.extract_jpeg_shape(data)
      begin, size = inception_window(shape, seed, *ranges)
      return _decode_window(data, shape, begin, size, channels)

    image = plain() if data.dtype != tf.string else tf.cond(_complete_jpeg(data), jpeg, plain)
    if hw is None:
      return image
    return resize_keep_dtype(image, hw, crop['method'], crop['antialias'])
  return on_image(fused, crop['key'], random=True)
