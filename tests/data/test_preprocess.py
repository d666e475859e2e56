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


def test_random_erasing_rectangle_area_fill_and_determinism():
  image = np.ones((40, 50, 3), np.float32)
  spec = 'random_erasing(prob=1.0, area_min=0.1, area_max=0.3)'
  a = _run(spec, image, seed=(3, 4))['image']
  np.testing.assert_array_equal(a, _run(spec, image, seed=(3, 4))['image'])
  fractions = []
  for i in range(30):
    out = _run(spec, image, seed=(i, 7))['image']
    assert out.shape == image.shape and out.dtype == np.float32
    erased = out[..., 0] == 0
    assert np.all((out == 0) == erased[..., None])  # all channels of a pixel together
    ys, xs = np.nonzero(erased)
    assert erased.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one filled rectangle
    fractions.append(erased.mean())
  assert 0.07 <= min(fractions) and max(fractions) <= 0.35  # 10-30 % up to rounding/clipping
  kept = [_run('random_erasing(prob=0.3)', image, seed=(i, 1))['image'] for i in range(60)]
  untouched = np.mean([np.array_equal(k, image) for k in kept])
  assert 0.5 < untouched < 0.9  # about 1 - prob of the images are left alone
  noisy = _run('random_erasing(prob=1.0, value="normal")', image, seed=(1, 1))['image']
  assert np.any((noisy != 1) & (noisy != 0))
  with pytest.raises(DataError, match='float images'):
    _run('random_erasing', np.zeros((8, 8, 1), np.uint8))
  with pytest.raises(DataError, match='area_min'):
    get_pp_fn('random_erasing(area_min=0)')


# ------------------------------------------------------- randaugment, color_jitter, presets

from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from imgcls.data.ops_image import NORMALIZE_PRESETS  # noqa: E402
from imgcls.data.randaugment import RANDAUGMENT_OPS  # noqa: E402

_GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


def _ra(op, magnitude, **kwargs):
  """randaugment that always applies `op` once."""
  extra = ''.join(f', {k}={v!r}' for k, v in kwargs.items())
  return f'randaugment(1, {magnitude}, prob=1.0, ops=({op!r},){extra})'


def test_list_ops_has_the_new_ops():
  for name in ('randaugment', 'color_jitter', 'normalize_preset', 'random_erasing'):
    assert name in list_ops()
  assert len(RANDAUGMENT_OPS) == 15 and 'SolarizeAdd' in RANDAUGMENT_OPS


@pytest.mark.parametrize('c', [1, 3])
@pytest.mark.parametrize('op', RANDAUGMENT_OPS)
def test_each_randaugment_op_runs_eagerly_and_in_graph_mode(op, c):
  image = _image(16, 18, c)
  out = _run(_ra(op, 9), image)['image']
  assert out.shape == image.shape and out.dtype == np.uint8
  # Graph mode with the channel count unknown until run time, as after decode in tf.data.
  pp = get_pp_fn(_ra(op, 9))
  fn = tf.function(lambda im, rng: pp({'image': im, '_rng': rng})['image'],
                   input_signature=[tf.TensorSpec([None, None, None], tf.uint8),
                                    tf.TensorSpec([2], tf.int64)])
  np.testing.assert_array_equal(fn(image, tf.constant([1, 2], tf.int64)).numpy(), out)


@pytest.mark.parametrize('c', [1, 3])
@pytest.mark.parametrize('op, magnitude, reference', [
    ('AutoContrast', 5, ImageOps.autocontrast),
    ('Equalize', 5, ImageOps.equalize),
    ('Invert', 5, ImageOps.invert),
    ('Posterize', 9, lambda im: ImageOps.posterize(im, 3)),  # int(0.9 * 4) bits
    ('Solarize', 5, lambda im: ImageOps.solarize(im, 128)),  # threshold int(0.5 * 256)
    ('Color', 9, lambda im: ImageEnhance.Color(im).enhance(1.72)),  # factor 0.9 * 1.8 + 0.1
    ('Contrast', 3, lambda im: ImageEnhance.Contrast(im).enhance(0.64)),
    ('Brightness', 9, lambda im: ImageEnhance.Brightness(im).enhance(1.72)),
    ('Sharpness', 9, lambda im: ImageEnhance.Sharpness(im).enhance(1.72)),
    ('Sharpness', 0, lambda im: ImageEnhance.Sharpness(im).enhance(0.1)),
])
def test_randaugment_colour_ops_match_pil(op, magnitude, reference, c):
  # PIL (what timm's RandAugment calls) truncates where these round: off by at most 1.
  image = _image(16, 18, c, seed=4) // 2 + 40  # 40..167: autocontrast and solarize both act
  expected = np.asarray(reference(Image.fromarray(image[..., 0] if c == 1 else image)))
  out = _run(_ra(op, magnitude), image)['image']
  np.testing.assert_allclose(out, expected.reshape(image.shape), atol=1)


def test_randaugment_solarize_add_and_clipping():
  image = np.array([[[0], [100], [127], [128], [250]]], np.uint8)
  np.testing.assert_array_equal(_run(_ra('SolarizeAdd', 10), image)['image'][0, :, 0],
                                [110, 210, 237, 128, 250])
  # Factor 1.9 saturates at 255 instead of wrapping around.
  bright = _run(_ra('Brightness', 10), np.full((4, 4, 3), 200, np.uint8))['image']
  assert np.all(bright == 255)


@pytest.mark.parametrize('op', _GEOMETRIC)
def test_randaugment_geometric_ops_at_magnitude_0_are_identity(op):
  image = _image(15, 17, 3)
  for interpolation in ('nearest', 'bilinear'):
    out = _run(_ra(op, 0, interpolation=interpolation), image)['image']
    np.testing.assert_array_equal(out, image)


def test_randaugment_translate_shear_rotate_geometry():
  image = _image(20, 20, 1, seed=1) // 2 + 100  # no pixel equals the fill value 7
  shifts = set()
  for s in range(8):  # 45 % of 20 = 9 pixels, either way
    out = _run(_ra('TranslateX', 10, fill=7), image, seed=(s, 0))['image']
    left = np.concatenate([image[:, 9:], np.full((20, 9, 1), 7)], axis=1)
    right = np.concatenate([np.full((20, 9, 1), 7), image[:, :11]], axis=1)
    shifts.add('left' if np.array_equal(out, left) else 'right' if np.array_equal(out, right)
               else 'neither')
  assert shifts == {'left', 'right'}  # random sign, nothing else
  sheared = _run(_ra('ShearX', 10), image)['image']
  np.testing.assert_array_equal(sheared[0], image[0])  # about the top-left corner
  assert not np.array_equal(sheared[-1], image[-1])
  rotated = _run(_ra('Rotate', 10, fill=7), _image(21, 21, 1, seed=1) // 2 + 100)['image']
  assert rotated[0, 0, 0] == rotated[0, -1, 0] == rotated[-1, 0, 0] == rotated[-1, -1, 0] == 7


@pytest.mark.parametrize('c', [1, 3])
def test_randaugment_is_deterministic_per_seed(c):
  image = _image(16, 16, c)
  spec = 'randaugment(2, 9)'
  a = _run(spec, image, seed=(3, 4))['image']
  assert a.shape == image.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, _run(spec, image, seed=(3, 4))['image'])
  outs = [_run(spec, image, seed=(3, s))['image'] for s in range(5, 11)]
  assert sum(not np.array_equal(a, o) for o in outs) >= 3
  # prob 0 or no layers: untouched.
  np.testing.assert_array_equal(_run('randaugment(2, 9, prob=0.0)', image)['image'], image)
  np.testing.assert_array_equal(_run('randaugment(0, 9)', image)['image'], image)


def test_randaugment_prob_applies_about_half_the_layers():
  image = _image(12, 12, 1)
  kept = [np.array_equal(_run('randaugment(1, 9, ops="Invert")', image, seed=(s, 9))['image'],
                         image) for s in range(40)]
  assert 0.25 < np.mean(kept) < 0.75


@pytest.mark.parametrize('c', [1, 3])
def test_full_pipeline_with_randaugment_in_tf_data(c):
  images = [tf.io.encode_png(_image(16, 16, c, seed=i)) for i in range(6)]
  ds = tf.data.Dataset.from_tensor_slices({
      'image': tf.stack(images), 'label': tf.range(6, dtype=tf.int64),
      '_rng': tf.stack([tf.constant([i, 1], tf.int64) for i in range(6)])})
  ds = ds.map(get_pp_fn('decode|randaugment(2, 9)|value_range(-1, 1)|onehot(10)'))
  first = list(ds.as_numpy_iterator())
  for example in first:
    assert example['image'].shape == (16, 16, c) and example['image'].dtype == np.float32
    assert -1 <= example['image'].min() and example['image'].max() <= 1
    assert example['labels'].shape == (10,)
  again = list(ds.as_numpy_iterator())  # a pure function of the per-example seed
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_color_jitter_shapes_determinism_and_ranges():
  for c in (1, 3):
    image = _image(12, 14, c)
    spec = 'color_jitter(0.4, 0.4, 0.4, 0.1)'
    a = _run(spec, image, seed=(1, 1))['image']
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, _run(spec, image, seed=(1, 1))['image'])
    assert not np.array_equal(a, _run(spec, image, seed=(1, 2))['image'])
  # Brightness factors in [0.6, 1.4]: a flat 100 stays flat, between 60 and 140, and varies.
  flat = np.full((4, 4, 3), 100, np.uint8)
  values = []
  for s in range(20):
    out = _run('color_jitter(0.4, 0, 0)', flat, seed=(s, 3))['image']
    assert np.all(out == out[0, 0, 0])
    values.append(int(out[0, 0, 0]))
  assert 60 <= min(values) < 90 and 110 < max(values) <= 140
  # Saturation and hue leave grey pixels and 1-channel images alone, but change colours.
  grey = np.repeat(_image(6, 6, 1), 3, axis=-1)
  np.testing.assert_array_equal(_run('color_jitter(0, 0, 0.8, 0.5)', grey)['image'], grey)
  gray1 = _image(6, 6, 1)
  np.testing.assert_array_equal(_run('color_jitter(0, 0, 0.8, 0.5)', gray1)['image'], gray1)
  colour = _image(6, 6, 3)
  assert not np.array_equal(_run('color_jitter(0, 0, 0, 0.5)', colour)['image'], colour)
  assert not np.array_equal(_run('color_jitter(0, 0, 0.8)', colour)['image'], colour)


def test_color_jitter_in_tf_data_with_unknown_channels():
  for c in (1, 3):
    ds = tf.data.Dataset.from_tensors({'image': tf.io.encode_png(_image(8, 8, c)),
                                       '_rng': tf.constant([1, 2], tf.int64)})
    ds = ds.map(get_pp_fn('decode|color_jitter(0.4, 0.4, 0.4, 0.2)'))
    out = next(iter(ds))['image']
    assert out.shape == (8, 8, c) and out.dtype == tf.uint8


def test_normalize_presets():
  rgb = np.array([[[0, 128, 255]]], np.uint8)
  for name in ('imagenet', 'clip'):
    mean, std = (np.array(v) for v in NORMALIZE_PRESETS[name])
    np.testing.assert_allclose(_run(f'normalize_preset({name!r})', rgb)['image'],
                               (rgb / 255 - mean) / std, rtol=1e-5)
  for c in (1, 3):  # 'inception' is value_range(-1, 1), for any channel count
    image = _image(4, 4, c)
    np.testing.assert_allclose(_run('normalize_preset("inception")', image)['image'],
                               _run('value_range(-1, 1)', image)['image'], atol=1e-6)
  with pytest.raises(DataError, match='to_rgb'):
    _run('normalize_preset("imagenet")', _image(4, 4, 1))
  ds = tf.data.Dataset.from_tensors({'image': tf.io.encode_png(_image(4, 4, 1))})
  ds = ds.map(get_pp_fn('decode|normalize_preset("clip")'))
  with pytest.raises(tf.errors.InvalidArgumentError, match='to_rgb'):
    next(iter(ds))


@pytest.mark.parametrize('spec, words', [
    ('normalize_preset("imagent")', ['normalize_preset', 'imagent', 'imagenet', 'inception',
                                     'clip']),
    ('randaugment(2, 11)', ['randaugment', 'magnitude']),
    ('randaugment(-1)', ['randaugment', 'num_layers']),
    ('randaugment(prob=1.5)', ['randaugment', 'prob']),
    ('randaugment(ops=("Rotate", "Cutout"))', ['randaugment', 'Cutout', 'TranslateY']),
    ('randaugment(fill=300)', ['randaugment', 'fill']),
    ('randaugment(interpolation="bicubic")', ['randaugment', 'bilinear']),
    ('color_jitter(-0.1)', ['color_jitter', 'brightness']),
    ('color_jitter(hue=0.7)', ['color_jitter', 'hue']),
])
def test_new_ops_bad_args_fail_when_built(spec, words):
  with pytest.raises(DataError) as e:
    get_pp_fn(spec)
  for word in words:
    assert word in str(e.value)


def test_uint8_ops_reject_float_images():
  for spec in ('randaugment', 'color_jitter'):
    with pytest.raises(DataError, match=f'{spec}.*before value_range'):
      _run(f'value_range(0, 1)|{spec}', _image())
