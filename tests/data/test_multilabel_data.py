"""Multi-label data: Fashion-MNIST mosaics, the multihot pp op, image folders with labels.csv."""

import collections
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from imgcls import data
from imgcls.data import folder, mosaic, mosaic_builder, ops_label, preprocess

TINY = dict(num_train=48, num_test=16, empty_prob=0.25, seed=3)


def _fake_fashion_mnist(data_dir: str, num_train: int = 30, num_test: int = 20) -> None:
  """A tiny prepared `fashion_mnist` (TFDS's name, version and classes), random items."""
  rng = np.random.default_rng(0)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(28, 28, 1)),
      'label': tfds.features.ClassLabel(names=mosaic_builder.CLASS_NAMES),
  })

  def examples(n):  # Pixels >= 1, so no item looks like a blank tile.
    return [(i, {'image': rng.integers(1, 256, (28, 28, 1), np.uint8), 'label': i % 10})
            for i in range(n)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name='fashion_mnist', version=tfds.builder_cls('fashion_mnist').VERSION,
      features=features, split_datasets={'train': examples(num_train), 'test': examples(num_test)},
      data_dir=data_dir)


def _records(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


@pytest.fixture(scope='module')
def source_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('fm'))
  _fake_fashion_mnist(d)
  return d


@pytest.fixture(scope='module')
def tiny_mosaic(source_dir):
  mosaic.prepare(source_dir, config=mosaic_builder.MosaicConfig(name='tiny', **TINY))
  # Found by name like any TFDS dataset (a custom config is read back from its files).
  return data.get_builder('fashion_mnist_mosaic/tiny', source_dir, prepare=False), source_dir


# ---------------------------------------------------------------- mosaics

@pytest.mark.parametrize('split', ['train', 'test'])
def test_mosaic_tiles_are_source_items_and_labels_their_classes(tiny_mosaic, split):
  builder, source_dir = tiny_mosaic
  labels_feature = builder.info.features['labels']
  assert isinstance(labels_feature, tfds.features.Sequence)
  assert tuple(labels_feature.feature.names) == mosaic_builder.CLASS_NAMES
  assert 'label' not in builder.info.features
  assert builder.info.metadata['seed'] == TINY['seed']

  source = tfds.as_numpy(tfds.builder('fashion_mnist', data_dir=source_dir).as_dataset(
      split=split, batch_size=-1))
  index = {img.tobytes(): i for i, img in enumerate(source['image'])}
  assert len(index) == len(source['image'])  # Items are distinct: a tile names its source.
  found = []
  records = _records(builder, split)
  assert len(records) == TINY[f'num_{split}']
  for ex in records:
    image = ex['image']
    assert image.shape == (56, 56, 1) and image.dtype == np.uint8
    row = []
    for r in range(2):
      for c in range(2):
        tile = image[28 * r:28 * (r + 1), 28 * c:28 * (c + 1)]
        row.append(-1 if not tile.any() else index[tile.tobytes()])  # KeyError: not an item.
    row = np.array(row)
    assert (row >= 0).any()
    assert list(ex['labels']) == sorted(set(source['label'][row[row >= 0]].tolist()))
    found.append(tuple(row))
  # The same tiles, in the same places, as the plan re-derived from the seed.
  plan = mosaic_builder.tile_plan(len(records), len(source['image']), empty_prob=TINY['empty_prob'],
                          seed=TINY['seed'], split=split)
  assert collections.Counter(found) == collections.Counter(map(tuple, plan))


def test_mosaic_is_deterministic_and_seeded(tiny_mosaic, tmp_path):
  builder, source_dir = tiny_mosaic
  other = str(tmp_path / 'other')
  shutil.copytree(os.path.join(source_dir, 'fashion_mnist'), os.path.join(other, 'fashion_mnist'))
  again = mosaic.prepare(other, config=mosaic_builder.MosaicConfig(name='tiny', **TINY))
  reseeded = mosaic.prepare(
      other, config=mosaic_builder.MosaicConfig(name='seed4', **{**TINY, 'seed': 4}))

  def content(b):
    return [(ex['image'].tobytes(), tuple(ex['labels'])) for ex in _records(b, 'train')]
  assert content(again) == content(builder)  # Same records in the same order.
  assert sorted(content(reseeded)) != sorted(content(builder))


def test_label_count_distribution_is_as_documented():
  n, num_source = 200_000, 60_000
  plan = mosaic_builder.tile_plan(n, num_source, empty_prob=0.25, seed=0, split='train')
  assert plan.min() >= -1 and plan.max() < num_source
  assert (plan >= 0).any(axis=1).all()  # At least one item per mosaic.
  classes = np.where(plan >= 0, plan % 10, -1)  # Balanced classes, as in Fashion-MNIST.
  counts = np.array([len(set(r) - {-1}) for r in classes[:40_000]])
  freq = np.bincount(counts, minlength=5)[1:] / len(counts)
  np.testing.assert_allclose(freq, [0.0764, 0.3237, 0.4404, 0.1595], atol=0.01)
  # Splits draw differently; the same arguments draw the same.
  first = lambda split: mosaic_builder.tile_plan(100, num_source, empty_prob=0.25, seed=0,
                                                 split=split)
  assert not np.array_equal(plan[:100], first('test'))
  np.testing.assert_array_equal(plan[:100], first('train'))


def test_compose_places_tiles_row_major():
  items = np.arange(1, 4, dtype=np.uint8)[:, None, None, None] * np.ones((3, 2, 2, 1), np.uint8)
  out = mosaic_builder.compose(items, np.array([[2, -1, 0, 1]]))
  np.testing.assert_array_equal(out[0, :, :, 0], [[3, 3, 0, 0], [3, 3, 0, 0],
                                                  [1, 1, 2, 2], [1, 1, 2, 2]])


def test_mosaic_config_errors(source_dir):
  with pytest.raises(data.DataError, match='empty_prob'):
    mosaic.prepare(source_dir, config=mosaic_builder.MosaicConfig(name='bad', empty_prob=1.0))
  with pytest.raises(data.DataError, match='Built-in configs: default, small'):
    mosaic.prepare(source_dir, config='nope')


def test_mosaic_through_the_eval_pipeline(tiny_mosaic):
  builder, _ = tiny_mosaic
  ev = data.eval_data(builder, split='test', pp='decode|value_range(-1, 1)|multihot(10)',
                      global_batch_size=8, process_index=0, process_count=1)
  batches = list(ev)
  labels = np.concatenate([b['labels'] for b in batches])
  assert batches[0]['image'].shape == (8, 56, 56, 1) and labels.dtype == np.float32
  expected = np.zeros((len(labels), 10), np.float32)
  for i, ex in enumerate(_records(builder, 'test')):
    expected[i, ex['labels']] = 1
  np.testing.assert_array_equal(labels, expected)


# ---------------------------------------------------------------- multihot

def test_multihot_op():
  assert 'multihot' in data.list_ops()
  op = ops_label.get_multihot(5)
  np.testing.assert_array_equal(op({'labels': tf.constant([3, 0, 3])})['labels'], [1, 0, 0, 1, 0])
  empty = op({'labels': tf.constant([], tf.int64)})['labels']
  assert empty.dtype == tf.float32
  np.testing.assert_array_equal(empty, np.zeros(5))
  np.testing.assert_array_equal(op({'labels': tf.constant(2)})['labels'], [0, 0, 1, 0, 0])
  ragged = op({'labels': tf.ragged.constant([[1, 4], [], [0]])})['labels']
  np.testing.assert_array_equal(ragged, [[0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
  out = ops_label.get_multihot(3, key='tags', key_result='y', on=0.9, off=0.05)({'tags': [2]})
  np.testing.assert_allclose(out['y'], [0.05, 0.05, 0.9])
  assert 'tags' in out
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'multihot\(5\).*>= 5'):
    op({'labels': tf.constant([1, 5])})
  with pytest.raises(tf.errors.InvalidArgumentError, match='negative'):
    op({'labels': tf.constant([-1])})
  with pytest.raises(data.DataError, match='num_classes'):
    preprocess.get_pp_fn('decode|multihot(0)')


# ------------------------------------------------------------ labels.csv

def _png(path, value: int) -> None:
  """A constant image whose value says which file it was (PNG keeps it exactly)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (6, 5), (value,) * 3).save(path)


def _csv_root(path, rows, extra=()) -> str:
  """rows: (filename, labels text); image i gets the value 10 + i."""
  for i, (name, _) in enumerate(rows):
    _png(f'{path}/{name}', 10 + i)
  for name in extra:
    _png(f'{path}/{name}', 250)
  lines = ['filename,labels'] + [f'{n},{labels}' for n, labels in rows]
  (path / folder.CSV_NAME).write_text('\n'.join(lines) + '\n')
  return str(path)


def _by_value(builder, split):
  names = builder.info.features['labels'].feature.names
  return {int(ex['image'][0, 0, 0]): tuple(names[i] for i in ex['labels'])
          for ex in _records(builder, split)}


ROWS = [('a/0.png', 'cat;dog'), ('a/1.png', 'dog'), ('b/2.png', ''), ('b/3.png', 'bird  cat'),
        ('4.png', 'fish; bird'), ('5.png', 'cat')]


def test_csv_folder_is_multi_label(tmp_path):
  root = _csv_root(tmp_path / 'root', ROWS, extra=['b/unlisted.png'])
  builder = data.get_builder(f'folder:{root}', str(tmp_path / 'tfds'),
                             folder_split='train=0.5,test=0.5')
  feature = builder.info.features['labels']
  assert isinstance(feature, tfds.features.Sequence)
  assert feature.feature.names == ['bird', 'cat', 'dog', 'fish']  # Sorted union.
  got = {**_by_value(builder, 'train'), **_by_value(builder, 'test')}
  assert data.num_examples(builder, 'train') == data.num_examples(builder, 'test') == 3
  # Every listed image once, with its labels (unlisted ignored; empty list kept).
  assert got == {10: ('cat', 'dog'), 11: ('dog',), 12: (), 13: ('bird', 'cat'),
                 14: ('bird', 'fish'), 15: ('cat',)}
  ev = data.eval_data(builder, split='train', pp='decode|multihot(4)', global_batch_size=4,
                      process_index=0, process_count=1)
  batch = next(iter(ev))
  for image, hot, mask in zip(batch['image'], batch['labels'], batch['mask']):
    if mask:
      names = [feature.feature.names[i] for i in np.flatnonzero(hot)]
      assert tuple(names) == got[int(image[0, 0, 0])]

  # Editing only the labels prepares a new copy with the new labels.
  csv = tmp_path / 'root' / folder.CSV_NAME
  csv.write_text(csv.read_text().replace('a/1.png,dog', 'a/1.png,dog;emu'))
  edited = data.get_builder(f'folder:{root}', str(tmp_path / 'tfds'),
                            folder_split='train=0.5,test=0.5')
  assert 'emu' in edited.info.features['labels'].feature.names
  assert {**_by_value(edited, 'train'), **_by_value(edited, 'test')}[11] == ('dog', 'emu')


def test_csv_split_folders_are_the_splits(tmp_path):
  rows = [('train/x/0.png', 'a'), ('train/1.png', 'b;a'), ('val/2.png', 'b'), ('test/3.png', '')]
  builder = data.get_builder(f'folder:{_csv_root(tmp_path / "root", rows)}', str(tmp_path / 't'))
  assert _by_value(builder, 'train') == {10: ('a',), 11: ('a', 'b')}
  assert _by_value(builder, 'validation') == {12: ('b',)}
  assert _by_value(builder, 'test') == {13: ()}


@pytest.mark.parametrize('csv_text, match', [
    ('filename,labels\na/0.png,cat\nnope/9.png,dog\n', r'1 file\(s\) listed in .* do not exist: '
     'nope/9.png'),
    ('name,tags\na/0.png,cat\n', 'header row naming the columns filename and labels'),
    ('filename,labels\na/0.png,cat\n./a/0.png,dog\n', 'lists a/0.png twice'),
    ('filename,labels\n../a/0.png,cat\n', 'inside it'),
    ('filename,labels\na/0.png,\n', 'no labels at all'),
    ('filename,labels\n', 'lists no images'),
    ('filename,labels\ntrain/t.png,cat\na/0.png,dog\n', 'split folders .* and files outside'),
])
def test_csv_errors(tmp_path, csv_text, match):
  root = tmp_path / 'root'
  _png(f'{root}/a/0.png', 1)
  _png(f'{root}/train/t.png', 2)
  (root / folder.CSV_NAME).write_text(csv_text)
  with pytest.raises(data.DataError, match=match):
    data.get_builder(f'folder:{root}', str(tmp_path / 'tfds'))


def test_csv_corrupt_image_is_named_or_skipped(tmp_path):
  root = _csv_root(tmp_path / 'root', ROWS)
  (tmp_path / 'root' / 'a' / '1.png').write_bytes(b'not an image')
  with pytest.raises(data.DataError, match=r'(?s)1 file\(s\) .* not readable images.*a/1.png'):
    data.get_builder(f'folder:{root}', str(tmp_path / 'tfds'))
  builder = data.get_builder(f'folder:{root}', str(tmp_path / 'tfds'), skip_corrupt=True,
                             folder_split='train=0.5,test=0.5')
  values = {**_by_value(builder, 'train'), **_by_value(builder, 'test')}
  assert sorted(values) == [10, 12, 13, 14, 15]
  assert folder.skipped_files(builder) == ['a/1.png']


# ------------------------------------------------------- multi-label training, end to end

def test_multi_label_training_on_the_mosaic(tiny_mosaic, tiny_config, tmp_path):
  """Sigmoid loss on multi-hot labels through train_iterator (ragged label lists), eval with
  mAP/F1 and a threshold tuned on a validation split, the report written, label names kept."""
  import json  # pylint: disable=g-import-not-at-top
  from imgcls import inference, train  # pylint: disable=g-import-not-at-top
  _, source_dir = tiny_mosaic
  c = tiny_config(source_dir, total_steps=4, eval_every_steps=4, loss='sigmoid_xent')
  c.evals.eval.reports = True
  c.dataset.name = 'fashion_mnist_mosaic/tiny'
  c.dataset.num_classes = 10
  c.dataset.train_split = 'train[:32]'
  c.dataset.val_split = 'train[32:]'
  c.pp_train = 'decode|flip_lr|value_range(-1, 1)|multihot(10)'
  c.pp_eval = 'decode|value_range(-1, 1)|multihot(10)'
  result = train.train_and_evaluate(c, str(tmp_path / 'ml'))
  assert result['examples'] == TINY['num_test']
  for key in ('map', 'f1_micro', 'f1_macro', 'threshold_tuned', 'f1_micro_tuned'):
    assert 0.0 <= result[key] <= 1.0, key
  report = json.loads((tmp_path / 'ml' / 'reports' / 'report_4.json').read_text())
  assert report['label_names'] == list(mosaic_builder.CLASS_NAMES)
  assert (tmp_path / 'ml' / 'reports' / 'ap_per_class_4.png').exists()
  clf = inference.load(str(tmp_path / 'ml'))
  assert clf.multilabel and clf.label_names == list(mosaic_builder.CLASS_NAMES)
  scores = clf.probabilities(np.zeros((2, 56, 56, 1), np.uint8))
  assert scores.shape == (2, 10) and not np.allclose(scores.sum(-1), 1.0)  # sigmoid, not softmax
