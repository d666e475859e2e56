"""imgcls.data's config-level API: builder_for, prepare_for, label_names, image_only."""

import ml_collections
import pytest

from imgcls import config as config_lib, data


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  data.make_synthetic_dataset(path, num_train=20, num_test=8, num_classes=4)
  return path


def _dataset(tfds_dir, **changes):
  ds = config_lib.defaults().dataset
  ds.name, ds.data_dir, ds.num_classes = 'synthetic_shapes', tfds_dir, 4
  ds.update(changes)
  return ds


def test_builder_for_takes_a_config_group_or_a_dict(tfds_dir):
  builder = data.builder_for(_dataset(tfds_dir))
  assert data.num_examples(builder, 'train') == 20
  plain = data.builder_for({'name': 'synthetic_shapes', 'data_dir': tfds_dir})
  assert plain.data_dir == builder.data_dir
  # data_dir given to the call wins over the group's.
  assert data.builder_for(_dataset('/nowhere'), data_dir=tfds_dir).data_dir == builder.data_dir


def test_builder_for_checks_the_class_count(tfds_dir):
  with pytest.raises(data.DataError, match=r'has 4 classes.*num_classes=4'):
    data.builder_for(_dataset(tfds_dir, num_classes=10))
  with pytest.raises(data.DataError, match='dataset.name'):
    data.builder_for({'name': ''})


def test_prepare_for_returns_the_prepared_folder(tfds_dir):
  ds = _dataset(tfds_dir)
  assert data.prepare_for(ds) == str(data.builder_for(ds).data_dir)
  with pytest.raises(data.DataError, match='num_classes=4'):
    data.prepare_for(ml_collections.ConfigDict(dict(ds.to_dict(), num_classes=3)))


def test_label_names(tfds_dir):
  builder = data.builder_for(_dataset(tfds_dir))
  assert data.label_names(builder) == ['0', '1', '2', '3']


@pytest.mark.parametrize('pp, expected', [
    ('decode|value_range(-1, 1)|onehot(10)', 'decode|value_range(-1, 1)'),
    (' decode | resize(8) |multihot(3, key="labels")| keep("image", "labels") ',
     'decode|resize(8)'),
    ('onehot(10)', ''),
    ('decode||flip_lr', 'decode|flip_lr'),
])
def test_image_only_drops_the_label_ops(pp, expected):
  assert data.image_only(pp) == expected


def test_label_ops_come_from_the_registry():
  from imgcls.data import preprocess  # pylint: disable=g-import-not-at-top
  assert {'onehot', 'multihot', 'keep'} <= set(preprocess.OPS.names(label_op=True))
  assert 'decode' not in preprocess.OPS.names(label_op=True)
