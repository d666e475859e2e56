"""dataset.sampling='balanced': near-uniform classes from a skewed source, batches a pure
function of (seed, step), exact resume; multi-label sources are refused."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from imgcls import data
from imgcls.data.base import DataError

COUNTS = (200, 60, 20, 8)  # a 25:1 skew
PP = 'decode|value_range(-1, 1)|onehot(4)'


@pytest.fixture(scope='module')
def skewed(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('skewed'))
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  rng.shuffle(labels)
  examples = [(i, {'image': np.full((4, 4, 1), 10 * int(y), np.uint8), 'label': int(y)})
              for i, y in enumerate(labels)]
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(4, 4, 1)),
      'label': tfds.features.ClassLabel(num_classes=len(COUNTS))})
  tfds.dataset_builders.store_as_tfds_dataset(
      name='skewed_shapes', version='1.0.0', features=features,
      split_datasets={'train': examples, 'test': examples[:10]}, data_dir=d)
  return data.get_builder('skewed_shapes', d)


def _batches(builder, n, **kwargs):
  it = data.train_iterator(builder, split='train', pp=PP, global_batch_size=32, seed=3,
                           process_index=0, process_count=1, sampling='balanced',
                           value_range_on_device=False, **kwargs)
  return [next(it) for _ in range(n)]


def test_balanced_sampling_gives_near_uniform_classes(skewed):
  labels = np.concatenate([b['labels'].argmax(-1) for b in _batches(skewed, 50)])
  freq = np.bincount(labels, minlength=4) / len(labels)
  np.testing.assert_allclose(freq, 0.25, atol=0.03)  # 1,600 draws; uniform would be 0.70 / 0.02
  # The image matches its label: records are drawn whole.
  images = np.concatenate([b['image'] for b in _batches(skewed, 2)])
  labels2 = np.concatenate([b['labels'].argmax(-1) for b in _batches(skewed, 2)])
  np.testing.assert_allclose((images[:, 0, 0, 0] + 1) * 127.5 / 10, labels2, atol=1e-3)


def test_same_seed_and_step_same_batch_and_exact_resume(skewed):
  first = _batches(skewed, 6)
  again = _batches(skewed, 6)
  resumed = _batches(skewed, 2, start_step=4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  for a, b in zip(first[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  other = data.train_iterator(skewed, split='train', pp=PP, global_batch_size=32, seed=4,
                              process_index=0, process_count=1, sampling='balanced')
  assert not np.array_equal(next(other)['labels'], first[0]['labels'])


def test_processes_split_the_same_global_batches(skewed):
  whole = _batches(skewed, 3)
  parts = [_batches_of(skewed, 3, process_index=i, process_count=2) for i in range(2)]
  for k in range(3):
    for key in ('image', 'labels'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def _batches_of(builder, n, **kwargs):
  it = data.train_iterator(builder, split='train', pp=PP, global_batch_size=32, seed=3,
                           sampling='balanced', value_range_on_device=False, **kwargs)
  return [next(it) for _ in range(n)]


def test_multi_label_and_unknown_sampling_are_refused(skewed, tmp_path):
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(4, 4, 1)),
      'labels': tfds.features.Sequence(tfds.features.ClassLabel(num_classes=3))})
  ex = [(i, {'image': np.zeros((4, 4, 1), np.uint8), 'labels': [0, 2]}) for i in range(4)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='multi_shapes', version='1.0.0', features=features,
      split_datasets={'train': ex, 'test': ex}, data_dir=str(tmp_path))
  multi = data.get_builder('multi_shapes', str(tmp_path))
  with pytest.raises(DataError, match='single-label') as e:
    data.train_iterator(multi, split='train', pp='decode|multihot(3)', global_batch_size=2,
                        seed=0, process_index=0, process_count=1, sampling='balanced')
  assert '\n' not in str(e.value)
  with pytest.raises(DataError, match="'uniform' or 'balanced'"):
    data.train_iterator(skewed, split='train', pp=PP, global_batch_size=2, seed=0,
                        process_index=0, process_count=1, sampling='stratified')
