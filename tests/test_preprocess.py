"""pp ops: parsing, shapes, dtypes, value ranges, stateless determinism."""

import numpy as np
import pytest
import tensorflow as tf

from imgcls.data import DataError, get_pp_fn, list_ops


def _image(h=20, w=24, c=1, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _run(spec, image, seed=(1, 2), **extra):
  features = {'image': tf.constant(image), 'label': tf.constant(3, tf.int64),
              '_rng': tf.constant(seed, tf.int64), **extra}
  return {k: v.numpy() for k, v in get_pp_fn(spec)(features).items()}


def test_list_ops_has_the_documented_ops():
  for name in ('decode', 'resize', 'resize_small', 'central_crop', 'random_crop', 'flip_lr',
               'value_range', 'normalize', 'onehot', 'keep', 'to_rgb', 'grayscale_to_rgb'):
    assert name in list_ops()


@pytest.mark.parametrize('spec, words', [
    ('decode|no_such_op(3)', ['no_such_op', 'random_crop']),
    ('decode|resize(', ['resize(']),
    ('decode|resize(size)', ['resize(size)']),
    ('resize(0)', ['resize(0)']),
    ('resize(8, method="cubic")', ['bicubic']),
    ('resize_small((8, 8))', ['positive int']),
    ('onehot(10, colour=1)', ['onehot', 'colour']),
    ('value_range(1, 2, in_min=3, in_max=3)', ['in_max']),
])
def test_bad_strings_fail_when_built(spec, words):
  with pytest.raises(DataError) as e:
    get_pp_fn(spec)
  for word in words:
    assert word in str(e.value)


def test_decode_png_and_channels():
  image = _image()
  encoded = tf.io.encode_png(image)
  out = get_pp_fn('decode')({'image': encoded})['image'].numpy()
  np.testing.assert_array_equal(out, image)
  rgb = get_pp_fn('decode(channels=3)')({'image': encoded})['image']
  assert rgb.shape == (20, 24, 3) and rgb.dtype == tf.uint8
  # Already-decoded images pass through.
  np.testing.assert_array_equal(_run('decode', image)['image'], image)


def test_resize_ops_keep_dtype():
  out = _run('resize(8)|central_crop((4, 6))', _image())['image']
  assert out.shape == (4, 6, 1) and out.dtype == np.uint8
  assert _run('resize((8, 12))', _image())['image'].shape == (8, 12, 1)
  assert _run('resize_small(10)', _image(20, 40))['image'].shape == (10, 20, 1)
  assert _run('resize_small(10)', _image(40, 20))['image'].shape == (20, 10, 1)


def test_central_crop_is_the_center():
  image = _image(10, 10)
  np.testing.assert_array_equal(_run('central_crop(4)', image)['image'], image[3:7, 3:7])


def test_random_crop_shape_and_content():
  image = _image(28, 28)
  out = _run('random_crop(28, pad=4)', image)['image']
  assert out.shape == (28, 28, 1) and out.dtype == np.uint8
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  assert any(np.array_equal(out, padded[i:i + 28, j:j + 28])
             for i in range(9) for j in range(9))
  reflect = _run('random_crop(28, pad=4, mode="reflect")', image)['image']
  assert reflect.shape == (28, 28, 1)
  assert _run('random_crop((10, 12))', image)['image'].shape == (10, 12, 1)


def test_random_ops_are_deterministic_per_seed():
  spec = 'random_crop(28, pad=4)|flip_lr'
  image = _image(28, 28)
  a = _run(spec, image, seed=(5, 6))
  np.testing.assert_array_equal(a['image'], _run(spec, image, seed=(5, 6))['image'])
  others = [_run(spec, image, seed=(5, s))['image'] for s in range(7, 12)]
  assert any(not np.array_equal(a['image'], o) for o in others)
  assert not np.array_equal(a['_rng'], [5, 6])  # The seed is split, not reused.


def test_flip_lr_flips_for_some_seeds_only():
  image = _image()
  outs = [_run('flip_lr', image, seed=(0, s))['image'] for s in range(16)]
  flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
  kept = [np.array_equal(o, image) for o in outs]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_random_op_without_seed_fails():
  with pytest.raises(DataError, match='_rng'):
    get_pp_fn('flip_lr')({'image': tf.constant(_image())})


def test_value_range_and_normalize():
  image = np.array([[[0], [255]], [[51], [102]]], np.uint8)
  out = _run('value_range(-1, 1)', image)['image']
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], [[-1, 1], [-0.6, -0.2]], atol=1e-6)
  out = _run('value_range(0, 1, in_min=0, in_max=1, clip_values=True)', image)['image']
  assert out.min() == 0 and out.max() == 1
  rgb = np.full((2, 2, 3), 100, np.uint8)
  out = _run('normalize((100, 50, 0), (1, 2, 4))', rgb)['image']
  np.testing.assert_allclose(out[0, 0], [0, 25, 25])


def test_onehot_and_keep():
  out = _run('onehot(5)|keep("image", "labels")', _image())
  assert set(out) == {'image', 'labels', '_rng'}
  np.testing.assert_array_equal(out['labels'], [0, 0, 0, 1, 0])
  assert out['labels'].dtype == np.float32
  smooth = _run('onehot(4, on=0.9, off=0.1)', _image())['labels']
  np.testing.assert_allclose(smooth, [0.1, 0.1, 0.1, 0.9])


def test_to_rgb_static_and_dynamic_channels():
  assert _run('to_rgb', _image(c=1))['image'].shape == (20, 24, 3)
  assert _run('grayscale_to_rgb', _image(c=1))['image'].shape == (20, 24, 3)
  rgba = _image(c=4)
  np.testing.assert_array_equal(_run('to_rgb', rgba)['image'], rgba[..., :3])
  # Inside tf.data the decoded channel count is unknown until run time.
  ds = tf.data.Dataset.from_tensors({'image': tf.io.encode_png(_image(c=1))})
  ds = ds.map(get_pp_fn('decode|to_rgb|value_range(0, 1)'))
  assert ds.element_spec['image'].shape.as_list() == [None, None, 3]
  assert next(iter(ds))['image'].shape == (20, 24, 3)


def test_inception_crop_shapes_determinism_and_area():
  image = _image(60, 80, 3)
  a = _run('inception_crop(32)', image, seed=(3, 4))['image']
  b = _run('inception_crop(32)', image, seed=(3, 4))['image']
  c = _run('inception_crop(32)', image, seed=(5, 6))['image']
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  areas, ratios = [], []
  for i in range(40):  # without a size, the window itself is returned
    crop = _run('inception_crop(area_min=30, area_max=60, ratio_min=0.5, ratio_max=2)', image,
                seed=(i, 1))['image']
    areas.append(crop.shape[0] * crop.shape[1] / (60 * 80))
    ratios.append(crop.shape[1] / crop.shape[0])
  assert 0.25 <= min(areas) and max(areas) <= 0.65  # 30-60 % up to integer rounding
  assert 0.45 <= min(ratios) and max(ratios) <= 2.2
  with pytest.raises(DataError, match='area_min'):
    get_pp_fn('inception_crop(32, area_min=0)')
