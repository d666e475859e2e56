"""Sources and pipelines on small prepared TFDS datasets: resume, process parts, exact eval."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from imgcls import data
from imgcls.data import sources

PP = 'decode|random_crop(16, pad=2)|flip_lr|value_range(-1, 1)|onehot(4)'
ID_PP = 'decode|keep("image")'  # Pixel value = example id.


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """synthetic_shapes (100 train, 37 test) and 'ids' (40 train, 37 test) in one folder."""
  path = str(tmp_path_factory.mktemp('tfds'))
  data.make_synthetic_dataset(path, num_train=100, num_test=37)
  # A dataset whose examples say who they are: every pixel of example i is i.
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(2, 2, 1)), 'label': tfds.features.ClassLabel(
          num_classes=3)})
  ids = lambda n: [(i, {'image': np.full((2, 2, 1), i, np.uint8), 'label': i % 3})
                   for i in range(n)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='ids', version='1.0.0', features=features, data_dir=path,
      split_datasets={'train': ids(40), 'test': ids(37)})
  return path


def _ids(batch):
  return batch['image'][:, 0, 0, 0].astype(int)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_get_builder_finds_unregistered_prepared_datasets(tfds_dir):
  builder = data.get_builder('synthetic_shapes', tfds_dir)
  assert data.num_examples(builder, 'train') == 100
  assert data.num_examples(builder, 'test') == 37
  assert data.num_examples(builder, 'train[:10%]') == 10
  assert data.make_synthetic_dataset(tfds_dir, num_train=100, num_test=37) == str(builder.data_dir)
  with pytest.raises(data.DataError, match='already holds'):
    data.make_synthetic_dataset(tfds_dir, num_train=5, num_test=37)


def test_synthetic_class_is_the_square_size(tfds_dir):
  builder = data.get_builder('synthetic_shapes', tfds_dir)
  batch = next(iter(builder.as_dataset(split='train', batch_size=100)))
  assert batch['image'].shape == (100, 16, 16, 1) and batch['image'].dtype == np.uint8
  bright = (batch['image'].numpy() >= 180).sum((1, 2, 3))
  np.testing.assert_array_equal(bright, np.array([4, 16, 36, 64])[batch['label'].numpy()])
  assert set(batch['label'].numpy()) == {0, 1, 2, 3}


def test_unknown_names_and_splits(tfds_dir):
  with pytest.raises(data.DataError) as e:
    data.get_builder('synthetic_shape', tfds_dir)
  assert 'synthetic_shapes' in str(e.value) and 'list_builders' in str(e.value)
  with pytest.raises(data.DataError, match='fashion_mnist'):
    data.get_builder('fashion_mnst', tfds_dir)
  with pytest.raises(data.DataError, match='validation'):
    data.num_examples(data.get_builder('ids', tfds_dir), 'validation')


def test_unprepared_dataset_without_network_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'network_available', lambda *a, **k: False)
  start = time.perf_counter()
  with pytest.raises(data.DataError) as e:
    data.get_builder('mnist', str(tmp_path))
  assert time.perf_counter() - start < 10
  assert str(tmp_path) in str(e.value) and 'imgcls prepare mnist' in str(e.value)
  with pytest.raises(data.DataError, match='--manual_dir'):
    data.get_builder('mnist', str(tmp_path), prepare=False)


def test_network_probe_gives_up_quickly():
  start = time.perf_counter()
  assert not sources.network_available(('no-such-host.invalid',), timeout=1.0)
  assert time.perf_counter() - start < 2


def test_train_batches_shapes_and_values(tfds_dir):
  builder = data.get_builder('synthetic_shapes', tfds_dir)
  batch = next(data.train_iterator(builder, split='train', pp=PP, global_batch_size=16, seed=0))
  assert batch['image'].shape == (16, 16, 16, 1) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  assert batch['labels'].shape == (16, 4) and batch['labels'].dtype == np.float32
  np.testing.assert_array_equal(batch['labels'].sum(1), 1)
  assert not any(k.startswith('_') for k in batch)


@pytest.mark.parametrize('start_step, shuffle_buffer, cache', [
    (5, 50_000, True), (7, 30, False), (13, 64, True)])
def test_resume_gives_the_same_batches(tfds_dir, start_step, shuffle_buffer, cache):
  builder = data.get_builder('synthetic_shapes', tfds_dir)
  kw = dict(split='train', pp=PP, global_batch_size=16, seed=3, shuffle_buffer=shuffle_buffer,
            cache=cache)
  full = _take(data.train_iterator(builder, **kw), start_step + 4)
  resumed = _take(data.train_iterator(builder, start_step=start_step, **kw), 4)
  for a, b in zip(full[start_step:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = next(data.train_iterator(builder, **dict(kw, seed=4)))
  assert not np.array_equal(other['image'], full[0]['image'])


def test_each_epoch_is_a_new_permutation(tfds_dir):
  builder = data.get_builder('ids', tfds_dir)
  it = data.train_iterator(builder, split='train', pp=ID_PP, global_batch_size=8, seed=0)
  epochs = [np.concatenate([_ids(b) for b in _take(it, 5)]) for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(40))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_processes_read_disjoint_parts(tfds_dir):
  builder = data.get_builder('ids', tfds_dir)
  seen = []
  for index in range(2):
    it = data.train_iterator(builder, split='train', pp=ID_PP, global_batch_size=8, seed=0,
                             process_index=index, process_count=2)
    batches = _take(it, 5)  # 5 batches of 4 = one epoch of this process's 20.
    assert all(b['image'].shape[0] == 4 for b in batches)
    seen.append(set(np.concatenate([_ids(b) for b in batches])))
  assert len(seen[0]) == len(seen[1]) == 20 and seen[0] | seen[1] == set(range(40))
  with pytest.raises(data.DataError, match='multiple of the process count'):
    data.train_iterator(builder, split='train', pp=ID_PP, global_batch_size=7, seed=0,
                        process_count=2, process_index=0)


def test_pp_must_decode(tfds_dir):
  builder = data.get_builder('ids', tfds_dir)
  with pytest.raises(data.DataError, match='decode'):
    data.train_iterator(builder, split='train', pp='onehot(3)', global_batch_size=8, seed=0)
  with pytest.raises(data.DataError, match='no_op'):
    data.eval_data(builder, split='test', pp='decode|no_op', global_batch_size=8)


def test_eval_covers_every_example_once(tfds_dir):
  builder = data.get_builder('ids', tfds_dir)
  ev = data.eval_data(builder, split='test', pp=ID_PP + '|value_range(0, 255, 0, 255)',
                      global_batch_size=8)
  assert (ev.num_examples, ev.num_batches) == (37, 5)
  for _ in range(2):  # Re-iterable.
    batches = list(ev)
    assert len(batches) == 5 and all(b['image'].shape == (8, 2, 2, 1) for b in batches)
    mask = np.concatenate([b['mask'] for b in batches])
    ids = np.concatenate([_ids(b) for b in batches])
    assert mask.dtype == np.float32 and mask.sum() == 37
    assert sorted(ids[mask == 1]) == list(range(37))
    assert not np.concatenate([b['image'] for b in batches])[mask == 0].any()


@pytest.mark.parametrize('count', [2, 3])
def test_eval_over_processes(tfds_dir, count):
  builder = data.get_builder('ids', tfds_dir)
  ids, lengths = [], set()
  for index in range(count):
    ev = data.eval_data(builder, split='test', pp=ID_PP, global_batch_size=6 * count,
                        process_index=index, process_count=count)
    batches = list(ev)
    lengths.add((len(batches), ev.num_batches))
    mask = np.concatenate([b['mask'] for b in batches])
    ids.extend(np.concatenate([_ids(b) for b in batches])[mask == 1])
  assert len(lengths) == 1 and lengths.pop()[0] == {2: 4, 3: 3}[count]
  assert sorted(ids) == list(range(37))


def test_eval_random_ops_are_deterministic(tfds_dir):
  builder = data.get_builder('synthetic_shapes', tfds_dir)
  ev = data.eval_data(builder, split='test', pp=PP, global_batch_size=8)
  a, b = next(iter(ev)), next(iter(ev))
  np.testing.assert_array_equal(a['image'], b['image'])
  assert set(a) == {'image', 'label', 'labels', 'mask'}


@pytest.mark.parametrize('value_range', ['value_range(-1, 1)',
                                         'value_range(-0.5, 2.5, in_min=10, in_max=200)',
                                         'value_range(1, 0)'])
def test_value_range_on_device_gives_the_same_bits(tfds_dir, value_range):
  """config.value_range_on_device: tf.data keeps uint8 and the train step (jitted, inside
  shard_map) applies the pp string's final value_range; the images equal tf.data's own."""
  import jax  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from imgcls import parallel, step as step_lib  # noqa: PLC0415
  from imgcls.data import preprocess  # noqa: PLC0415

  pp = f'decode|random_crop(16, pad=2)|flip_lr|{value_range}|onehot(4)'
  host_pp, args = preprocess.split_value_range(pp)
  assert host_pp == 'decode|random_crop(16, pad=2)|flip_lr|onehot(4)' and args
  builder = data.get_builder('synthetic_shapes', tfds_dir)
  kw = dict(split='train', global_batch_size=16, seed=3)
  want = next(data.train_iterator(builder, pp=pp, **kw))
  got = next(data.train_iterator(builder, pp=host_pp, **kw))
  assert got['image'].dtype == np.uint8 and want['image'].dtype == np.float32
  np.testing.assert_array_equal(got['labels'], want['labels'])
  mesh = parallel.make_mesh(jax.devices()[:2])
  on_device = parallel.data_parallel(
      lambda x: step_lib.device_value_range(x, args), mesh,
      in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS))
  np.testing.assert_array_equal(np.asarray(on_device(got['image'])), want['image'])


def test_split_value_range_only_moves_a_final_unclipped_value_range():
  from imgcls.data import preprocess  # noqa: PLC0415
  keep = ['decode|value_range(-1, 1)|random_erasing(0.5)|onehot(4)',  # float op after it
          'decode|value_range(0, 1, clip_values=True)|onehot(4)', 'decode|onehot(4)',
          'decode|value_range(-1, 1, key="other")|onehot(4)']
  for pp in keep:
    assert preprocess.split_value_range(pp) == (pp, None)
  off = 'decode|value_range(0, 1)|onehot(4)'  # config.value_range_on_device=False
  assert preprocess.split_value_range(off, move=False) == (off, None)
  assert preprocess.split_value_range('decode|value_range(0, 1)|onehot(4)|keep("image")') == (
      'decode|onehot(4)|keep("image")', {'vmin': 0, 'vmax': 1, 'in_min': 0, 'in_max': 255})
