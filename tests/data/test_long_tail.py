"""fashion_mnist_lt: the exponential profile, a deterministic subset, the balanced test split,
registered as a source and chosen by dataset.imbalance_ratio."""

import os

import numpy as np
import pytest

from imgcls import data
from imgcls.data import base, fashion_mnist, label_counts, long_tail, long_tail_builder


def test_exponential_profile():
  n = long_tail_builder.class_counts(6000, 10, 100)
  want = np.floor(6000 * 100.0 ** (-np.arange(10) / 9) + 1e-9)
  np.testing.assert_array_equal(n, want)
  assert n[0] == 6000 and n[-1] == 60 and np.all(np.diff(n) < 0)
  np.testing.assert_array_equal(long_tail_builder.class_counts(50, 4, 1), [50] * 4)


def test_subset_is_the_first_of_each_class_in_file_order():
  labels = np.array([2, 0, 1, 0, 2, 0, 1, 2, 2])
  keep = long_tail_builder.subset(labels, np.array([2, 1, 3]))
  np.testing.assert_array_equal(keep, [0, 1, 2, 3, 4, 7])
  with pytest.raises(base.DataError, match='fewer than'):
    long_tail_builder.subset(labels, np.array([4, 1, 1]))


def test_source_is_registered_and_reads_the_ratio():
  assert isinstance(base.source_for('fashion_mnist_lt'), long_tail.LongTailSource)
  assert long_tail._ratio('fashion_mnist_lt', {}) == 100
  assert long_tail._ratio('fashion_mnist_lt', {'imbalance_ratio': 10}) == 10
  assert long_tail._ratio('fashion_mnist_lt/r50', {'imbalance_ratio': 10}) == 50
  with pytest.raises(base.DataError, match='r<ratio>'):
    long_tail._ratio('fashion_mnist_lt/big', {})
  with pytest.raises(base.DataError, match='>= 1'):
    long_tail._ratio('fashion_mnist_lt', {'imbalance_ratio': 0.5})


@pytest.fixture(scope='module')
def lt_data_dir(tmp_path_factory):
  """A data_dir with fashion_mnist (linked from TFDS's default folder when prepared there,
  else prepared offline from the Debian files)."""
  d = tmp_path_factory.mktemp('lt')
  default = os.path.expanduser('~/tensorflow_datasets/fashion_mnist')
  if os.path.isdir(default):
    os.symlink(default, d / 'fashion_mnist')
  else:
    fashion_mnist.prepare(str(d))
  return str(d)


def test_prepared_counts_and_balanced_test_split(lt_data_dir):
  builder = data.builder_for({'name': 'fashion_mnist_lt', 'imbalance_ratio': 10.0,
                              'num_classes': 10}, lt_data_dir)
  assert builder.builder_config.name == 'r10'
  train = label_counts.label_counts(builder, 'train')
  np.testing.assert_array_equal(train, long_tail_builder.class_counts(6000, 10, 10))
  np.testing.assert_array_equal(label_counts.label_counts(builder, 'test'), [1000] * 10)
  assert data.label_names(builder)[0] == 'T-shirt/top'
