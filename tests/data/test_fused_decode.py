"""decode|inception_crop fused (ops_fused.py): same windows, seeds and pixels as the two ops in
turn for JPEGs, the plain path for other bytes, the same errors for corrupt files; and the
bit-exact fast paths of resize and value_range."""

import io
import itertools
import os
import pathlib
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imgcls import data
from imgcls.data import ops_fused
from imgcls.data.ops_image import inception_window, resize_keep_dtype
from imgcls.data.preprocess import FUSE_ENV, get_pp_fn

TRAIN_PP = 'decode|inception_crop(32)|flip_lr|value_range(-1, 1)'


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
  """Smooth colour fields plus grain: chroma that varies, so chroma upsampling matters."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def _jpeg(h=75, w=101, subsampling=2, mode='RGB', progressive=False, seed=0) -> bytes:
  """subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0 (PIL's default, most photos)."""
  out = io.BytesIO()
  Image.fromarray(_photo(h, w, seed)).convert(mode).save(
      out, format='JPEG', quality=90, subsampling=subsampling, progressive=progressive)
  return out.getvalue()


def _png(h=40, w=30, mode='RGB') -> bytes:
  out = io.BytesIO()
  Image.fromarray(_photo(h, w)).convert(mode).save(out, format='PNG')
  return out.getvalue()


JPEGS = {
    '420': _jpeg(),
    '422': _jpeg(subsampling=1, seed=1),
    '444': _jpeg(subsampling=0, seed=2),
    'gray': _jpeg(mode='L', seed=3),
    'progressive': _jpeg(progressive=True, seed=4),
    'odd': _jpeg(h=37, w=53, seed=5),
    'cmyk': _jpeg(mode='CMYK', seed=6),
}


def _run(spec, image, seed, fuse):
  features = {'image': tf.constant(image), '_rng': tf.constant(seed, tf.int64)}
  return {k: v.numpy() for k, v in get_pp_fn(spec, fuse=fuse)(features).items()}


@pytest.fixture
def window_calls(monkeypatch):
  """Counts tf.image.decode_and_crop_jpeg calls (eager tf.cond runs only the branch taken)."""
  calls = []
  real = tf.image.decode_and_crop_jpeg

  def spy(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(tf.image, 'decode_and_crop_jpeg', spy)
  return calls


@pytest.mark.parametrize('kind', sorted(JPEGS))
def test_fused_equals_decode_then_crop_on_jpegs(kind, window_calls):
  specs = [TRAIN_PP, 'decode|inception_crop', 'decode(3)|inception_crop(24, area_min=30, '
           'ratio_min=0.5, ratio_max=2, method="bicubic")|flip_lr']
  for spec, s in itertools.product(specs, range(12)):
    fused = _run(spec, JPEGS[kind], (s, 7), fuse=True)
    plain = _run(spec, JPEGS[kind], (s, 7), fuse=False)
    assert fused['image'].shape == plain['image'].shape, (spec, s)
    np.testing.assert_array_equal(fused['image'], plain['image'], err_msg=f'{spec} seed {s}')
    np.testing.assert_array_equal(fused['_rng'], plain['_rng'])  # Later ops get the same seeds.
  assert len(window_calls) == len(specs) * 12  # Every one of them took the JPEG path.


def test_same_windows_over_many_draws():
  """Crop shapes (no resize) over 400 seeds: the same window sizes, draw by draw."""
  ds = tf.data.Dataset.range(400).map(lambda i: {'image': tf.constant(JPEGS['420']),
                                                 '_rng': tf.stack([i, 3])})
  shapes = {}
  for fuse in (True, False):
    pp = get_pp_fn('decode|inception_crop(area_min=8, area_max=100)', fuse=fuse)
    shapes[fuse] = [f['image'].shape for f in ds.map(pp).as_numpy_iterator()]
  assert shapes[True] == shapes[False]
  areas = np.array([h * w for h, w, _ in shapes[True]]) / (75 * 101)
  assert areas.min() >= 0.08 - 0.01 and len(set(shapes[True])) > 100  # Really random.


def test_window_pixels_equal_full_decode_and_need_the_margin(monkeypatch):
  """Decoding a window alone changes its border columns on 4:2:0 JPEGs (chroma upsampling at
  the decoded edge); the margin makes it exact."""
  rng = np.random.default_rng(0)
  margin = ops_fused.MARGIN
  data_ = JPEGS['420']
  full = tf.io.decode_image(data_, expand_animations=False).numpy()
  shape = tf.image.extract_jpeg_shape(data_)
  boxes = [(int(y), int(x), int(rng.integers(1, 75 - y + 1)), int(rng.integers(1, 101 - x + 1)))
           for y, x in zip(rng.integers(0, 60, 60), rng.integers(0, 90, 60))]

  def differing(margin):
    monkeypatch.setattr(ops_fused, 'MARGIN', margin)
    count = 0
    for y, x, h, w in boxes:
      window = ops_fused._decode_window(data_, shape, tf.constant([y, x, 0]),
                                        tf.constant([h, w, -1]), 0).numpy()
      count += not np.array_equal(window, full[y:y + h, x:x + w])
    return count
  assert differing(0) > 5  # The hazard is real ...
  assert differing(margin) == 0 == differing(1)  # ... and the margin removes it.


def test_window_from_the_header_is_the_window_from_the_pixels():
  for kind, s in itertools.product(JPEGS, range(20)):
    seed = tf.constant([s, 1], tf.int64)
    decoded = tf.io.decode_image(JPEGS[kind], expand_animations=False)
    a = inception_window(tf.image.extract_jpeg_shape(JPEGS[kind]), seed, 5, 100, 3 / 4, 4 / 3)
    b = inception_window(tf.shape(decoded), seed, 5, 100, 3 / 4, 4 / 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][:2], b[1][:2])


def test_bytes_after_the_end_marker_take_the_plain_path(window_calls):
  padded = JPEGS['420'] + b'\x00' * 16  # Some writers pad files; not a complete-looking JPEG.
  for s in range(5):
    np.testing.assert_array_equal(_run(TRAIN_PP, padded, (s, 1), fuse=True)['image'],
                                  _run(TRAIN_PP, padded, (s, 1), fuse=False)['image'])
  assert not window_calls


@pytest.mark.parametrize('mode', ['RGB', 'L', 'RGBA'])
def test_png_takes_the_plain_path(mode, window_calls):
  for spec, s in itertools.product([TRAIN_PP, 'decode|inception_crop'], range(5)):
    fused = _run(spec, _png(mode=mode), (s, 1), fuse=True)
    plain = _run(spec, _png(mode=mode), (s, 1), fuse=False)
    np.testing.assert_array_equal(fused['image'], plain['image'])
  assert fused['image'].shape[-1] == {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
  assert not window_calls


def test_decoded_images_and_other_keys_are_not_fused(window_calls):
  image = _photo(30, 40)
  for s in range(5):
    np.testing.assert_array_equal(_run(TRAIN_PP, image, (s, 2), True)['image'],
                                  _run(TRAIN_PP, image, (s, 2), False)['image'])
  # decode on 'image', crop on 'other': not one op, both still run as written.
  features = {'image': tf.constant(JPEGS['420']), 'other': tf.constant(image),
              '_rng': tf.constant([1, 2], tf.int64)}
  out = get_pp_fn('decode|inception_crop(8, key="other")', fuse=True)(features)
  assert out['image'].shape == (75, 101, 3) and out['other'].shape == (8, 8, 3)
  assert not window_calls


def test_the_switch_turns_fusion_off(window_calls, monkeypatch):
  monkeypatch.setenv(FUSE_ENV, '0')
  _run(TRAIN_PP, JPEGS['420'], (1, 2), fuse=None)
  assert not window_calls
  monkeypatch.setenv(FUSE_ENV, '1')
  _run(TRAIN_PP, JPEGS['420'], (1, 2), fuse=None)
  assert len(window_calls) == 1


def test_corrupt_images_still_fail():
  good = JPEGS['420']
  truncated = good[:len(good) * 9 // 10]
  spec = 'decode|inception_crop(16, area_min=5, area_max=15)|flip_lr'
  shape = tf.image.extract_jpeg_shape(truncated)
  # Seeds whose window alone decodes from the cut file (it lies above the cut): a fused op
  # that trusted the window would give an image where decoding the file fails.
  fooled = []
  for s in range(40):
    begin, size = inception_window(shape, tf.constant([s, 5], tf.int64), 5, 15, 3 / 4, 4 / 3)
    try:
      tf.image.decode_and_crop_jpeg(truncated, tf.concat([begin[:2], size[:2]], 0))
      fooled.append(s)
    except tf.errors.InvalidArgumentError:
      pass
  assert len(fooled) >= 3
  for s in fooled:
    for fuse in (True, False):
      with pytest.raises(tf.errors.InvalidArgumentError):
        _run(spec, truncated, (s, 5), fuse=fuse)
  garbage = good[:40] + bytes(range(256)) * 4 + good[40 + 1024:]
  for bad in (garbage, b'not an image at all', good[:200] + good[-2:]):
    for s in range(4):
      for fuse in (True, False):
        with pytest.raises(tf.errors.InvalidArgumentError):
          _run(TRAIN_PP, bad, (s, 5), fuse=fuse)


def test_corrupt_image_fails_inside_tf_data():
  truncated = JPEGS['420'][:len(JPEGS['420']) // 2]
  ds = tf.data.Dataset.from_tensors({'image': tf.constant(truncated),
                                     '_rng': tf.constant([0, 0], tf.int64)})
  with pytest.raises(tf.errors.InvalidArgumentError):
    list(ds.map(get_pp_fn(TRAIN_PP, fuse=True)))


def test_train_iterator_batches_are_the_same(tmp_path, monkeypatch):
  """The real pipeline on an image folder of JPEGs and PNGs: identical batches either way."""
  for i in range(12):
    folder = tmp_path / 'root' / 'train' / f'c{i % 2}'
    folder.mkdir(parents=True, exist_ok=True)
    if i % 4 == 3:
      Image.fromarray(_photo(50, 60, i)).save(folder / f'{i}.png')
    else:
      (folder / f'{i}.jpg').write_bytes(_jpeg(h=60 + i, w=80 - i, seed=i))
  builder = data.get_builder(f'folder:{tmp_path}/root', str(tmp_path / 'tfds'))
  batches = {}
  for fuse in ('0', '1'):
    monkeypatch.setenv(FUSE_ENV, fuse)
    it = data.train_iterator(builder, split='train', pp=f'decode(3)|{TRAIN_PP[7:]}|onehot(2)',
                             global_batch_size=4, seed=3, process_index=0, process_count=1,
                             threads=1)
    batches[fuse] = [next(it) for _ in range(6)]
  for a, b in zip(batches['0'], batches['1']):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


# ------------------------------------------------- bit-exact fast paths of resize, value_range

@pytest.mark.parametrize('args', [(-1, 1), (0, 1), (0, 2), (-1, 3), (0.5, 0.7), (1, -1), (0, -1),
                                  (-1, 1, 10, 200), (-0.5, 0.5, 3, 250)])
def test_value_range_is_bitwise_the_formula(args):
  vmin, vmax, in_min, in_max = (tuple(args) + (0, 255))[:4]
  x = tf.constant(np.arange(256, dtype=np.uint8).reshape(16, 16, 1))
  want = vmin + (tf.cast(x, tf.float32) - in_min) / (in_max - in_min) * (vmax - vmin)
  got = get_pp_fn(f'value_range{tuple(args)}')({'image': x})['image']
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))


def test_resize_is_bitwise_the_uint8_resize_rounded_and_clipped():
  rng = np.random.default_rng(0)
  methods = ('bilinear', 'area', 'gaussian', 'nearest', 'bicubic', 'lanczos3', 'mitchellcubic')
  for t, method, antialias in itertools.product(range(12), methods, (False, True)):
    h, w = rng.integers(2, 70, 2)
    pixels = rng.integers(0, 256, (h, w, 3)) if t % 2 else rng.choice([0, 255], (h, w, 3))
    image = tf.constant(pixels.astype(np.uint8))  # 0/255 edges: where kernels overshoot most.
    size = tuple(int(v) for v in rng.integers(1, 90, 2))
    out = tf.image.resize(image, size, method=method, antialias=antialias)
    if out.dtype != tf.uint8:
      out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    np.testing.assert_array_equal(resize_keep_dtype(image, size, method, antialias), out,
                                  err_msg=f'{method} antialias={antialias} {size}')


def test_bench_pipeline_measures_before_and_after(tmp_path):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / 'scripts'))
  import bench_pipeline  # pylint: disable=g-import-not-at-top
  before = os.environ.get(FUSE_ENV)
  for fuse in (False, True):
    out = bench_pipeline.measure('decode(3)|inception_crop(24)|flip_lr|value_range(-1, 1)',
                                 n_images=8, size=(64, 48), seconds=0.2, warmup_s=0.1,
                                 batch_size=4, threads=1, fuse=fuse, cache_dir=str(tmp_path))
    assert out['fuse'] is fuse and out['cores'] == 1 and out['images'] >= 4
    assert out['img_per_s'] > 0 and out['img_per_s_per_core'] == out['img_per_s']
  assert os.environ.get(FUSE_ENV) == before  # The switch is put back.
