"""Image folders as datasets: layouts, conversion to RGB, bad files, splits, re-preparation."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from imgcls import data
from imgcls.data import folder

CLASSES = ['ants', 'bees', 'cats']  # Sorted; written below in another order.
PP = 'decode|resize(16)|value_range(-1, 1)|onehot(3)'
SIZES = [(20, 30), (64, 48), (33, 17)]  # (width, height), mixed.


def _save(path, image: Image.Image, fmt: str | None = None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt)


def _flat_value(path, value: int, size=(12, 10)) -> None:
  """A constant image whose value says which file it was (PNG keeps it exactly)."""
  _save(path, Image.new('RGB', size, (value,) * 3))


def _truncated_jpeg() -> bytes:
  buf = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
  Image.fromarray(noise).save(buf, format='JPEG')
  return buf.getvalue()[:len(buf.getvalue()) // 2]


@pytest.fixture(scope='module')
def split_root(tmp_path_factory):
  """root/{train,val,test}/CLASS: mixed sizes and formats, odd modes, two bad files.

  train: 5 per class + gray, CMYK and RGBA images (18 good) + corrupt + truncated;
  val: 2 per class; test: 3 per class, each a constant image with value 20 + 10 * id.
  """
  root = str(tmp_path_factory.mktemp('split_root'))
  rng = np.random.default_rng(0)
  for c in reversed(CLASSES):
    for i in range(5):
      w, h = SIZES[i % 3]
      ext = 'jpg' if i % 2 else 'png'
      _save(f'{root}/train/{c}/{i}.{ext}',
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)))
    for i in range(2):
      _save(f'{root}/val/{c}/{i}.jpeg', Image.new('RGB', SIZES[i], (90, 90, 90)))
  for i in range(9):
    _flat_value(f'{root}/test/{CLASSES[i % 3]}/{i}.png', 20 + 10 * i, size=SIZES[i % 3])
  _save(f'{root}/train/ants/gray.png', Image.new('L', (9, 11), 100))
  _save(f'{root}/train/bees/cmyk.jpg', Image.new('CMYK', (13, 7), (0, 255, 255, 0)), 'JPEG')
  _save(f'{root}/train/cats/rgba.png', Image.new('RGBA', (7, 5), (10, 20, 30, 0)))
  with open(f'{root}/train/cats/corrupt.jpg', 'wb') as f:
    f.write(rng.integers(0, 256, 500, np.uint8).tobytes())
  with open(f'{root}/train/bees/truncated.jpg', 'wb') as f:
    f.write(_truncated_jpeg())
  with open(f'{root}/train/ants/notes.txt', 'w') as f:
    f.write('not an image, ignored')
  return root


@pytest.fixture(scope='module')
def prepared(split_root, tmp_path_factory):
  """The split folder prepared with skip_corrupt, and its data_dir."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data.get_builder(f'folder:{split_root}', data_dir, skip_corrupt=True), data_dir


def _flat_root(path, per_class: int = 10) -> str:
  """root/CLASS/*.png, image k of class c has the value per_class * c + k."""
  for ci, c in enumerate(CLASSES):
    for k in range(per_class):
      _flat_value(f'{path}/{c}/{k:02d}.png', per_class * ci + k)
  return str(path)


def _values(builder, split: str) -> list[tuple[int, int]]:
  """(pixel value, label) of every example in the split."""
  return [(int(ex['image'][0, 0, 0]), int(ex['label']))
          for ex in tfds.as_numpy(builder.as_dataset(split=split))]


def test_bad_files_are_named_or_skipped_and_counted(split_root, prepared, tmp_path, caplog):
  with pytest.raises(data.DataError) as e:
    data.get_builder(f'folder:{split_root}', str(tmp_path))
  message = str(e.value)
  assert 'train/cats/corrupt.jpg' in message and 'train/bees/truncated.jpg' in message
  assert '2 file(s)' in message and 'skip_corrupt' in message
  builder, data_dir = prepared
  assert folder.skipped_files(builder) == ['train/bees/truncated.jpg', 'train/cats/corrupt.jpg']
  counts = {s: data.num_examples(builder, s) for s in builder.info.splits}
  assert counts == {'train': 18, 'validation': 6, 'test': 9}  # val/ is named validation.
  # Reused, not re-prepared; the skipped files are logged again, and refused without skipping.
  with caplog.at_level('WARNING'):
    again = data.get_builder(f'folder:{split_root}', data_dir, skip_corrupt=True)
  assert again.data_dir == builder.data_dir
  assert any('skipped 2 unreadable' in r.getMessage() for r in caplog.records)
  with pytest.raises(data.DataError, match='corrupt.jpg'):
    data.get_builder(f'folder:{split_root}', data_dir)


def test_labels_are_folder_names_and_images_rgb(prepared):
  builder, _ = prepared
  assert builder.info.features['label'].names == CLASSES
  shapes = {}
  ds = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  for ex in tfds.as_numpy(ds):
    image = tf.io.decode_image(ex['image'], expand_animations=False).numpy()
    assert image.shape[-1] == 3 and image.dtype == np.uint8
    shapes[image.shape[:2]] = (image, ex['label'])
  assert {(30, 20), (48, 64), (17, 33)} <= set(shapes)  # Sizes kept: (height, width).
  gray, label = shapes[(11, 9)]
  assert label == 0 and (gray == 100).all()
  rgba, label = shapes[(5, 7)]
  assert label == 2 and (rgba == 255).all()  # Fully transparent: composited on white.
  cmyk, label = shapes[(7, 13)]
  assert label == 1 and cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60  # Red.


def test_train_and_eval_pipelines_read_it(prepared):
  builder, _ = prepared
  batch = next(data.train_iterator(builder, split='train', pp=PP, global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 16, 16, 3) and batch['labels'].shape == (4, 3)
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1
  ev = data.eval_data(builder, split='test', pp=PP, global_batch_size=4)
  assert (ev.num_examples, ev.num_batches) == (9, 3)
  batches = list(ev)
  mask = np.concatenate([b['mask'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])[mask == 1]
  labels = np.concatenate([b['labels'] for b in batches])[mask == 1].argmax(1)
  ids = (np.round((images[:, 0, 0, 0] + 1) * 127.5).astype(int) - 20) // 10
  assert mask.sum() == 9 and sorted(ids) == list(range(9))  # Every example exactly once.
  np.testing.assert_array_equal(labels, ids % 3)


def test_flat_folder_split_is_deterministic_stratified_and_seeded(tmp_path):
  name = f'folder:{_flat_root(tmp_path / "flat")}'
  splits = {}
  for run, seed in [('a', 0), ('b', 0), ('c', 1)]:
    builder = data.get_builder(name, str(tmp_path / run), folder_seed=seed)
    splits[run] = {s: sorted(_values(builder, s)) for s in ('train', 'validation', 'test')}
  assert splits['a'] == splits['b'] and splits['a'] != splits['c']
  for split, values in splits['a'].items():
    labels = [label for _, label in values]
    assert labels == sorted([0, 1, 2] * {'train': 8, 'validation': 1, 'test': 1}[split])
    assert all(v // 10 == label for v, label in values)  # Images kept their class.
  everything = sorted(v for values in splits['c'].values() for v, _ in values)
  assert everything == list(range(30))


def test_split_counts():
  assert folder.split_counts(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
  assert folder.split_counts(5, [0.8, 0.1, 0.1]) == [3, 1, 1]
  assert folder.split_counts(3, [0.8, 0.1, 0.1]) == [1, 1, 1]
  assert folder.split_counts(7, [0.5, 0.5]) == [4, 3]
  assert folder.parse_split('train=0.9,val=0.1') == {'train': 0.9, 'validation': 0.1}
  for bad in ('train=0.9', 'train=0.5,dev=0.5', 'train:1', 'train=x'):
    with pytest.raises(data.DataError, match='Bad folder split'):
      folder.parse_split(bad)


def test_folder_errors(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(data.DataError, match='does not exist'):
    data.get_builder(f'folder:{tmp_path}/nowhere', data_dir)
  (tmp_path / 'bare').mkdir()
  with pytest.raises(data.DataError, match='no class folders'):
    data.get_builder(f'folder:{tmp_path}/bare', data_dir)

  flat = _flat_root(tmp_path / 'flat', per_class=2)
  os.makedirs(f'{flat}/dogs')
  with pytest.raises(data.DataError) as e:
    data.get_builder(f'folder:{flat}', data_dir)
  assert f'{flat}/dogs' in str(e.value) and 'without images' in str(e.value)
  os.rmdir(f'{flat}/dogs')
  with pytest.raises(data.DataError, match="Class 'ants' .* has 2 usable image"):
    data.get_builder(f'folder:{flat}', data_dir)  # Too few for 3 splits.
  with pytest.raises(data.DataError, match=r'has 3 classes \(ants, bees, cats\).*num_classes=3'):
    data.get_builder(f'folder:{flat}', data_dir, folder_split='train=0.5,test=0.5',
                     num_classes=4)

  split = tmp_path / 'split'
  for s, classes in [('train', CLASSES), ('test', CLASSES[:2])]:
    for c in classes:
      _flat_value(f'{split}/{s}/{c}/0.png', 1)
  with pytest.raises(data.DataError, match=r"class 'cats' is missing from split 'test'"):
    data.get_builder(f'folder:{split}', data_dir)
  _flat_value(f'{split}/cats/0.png', 1)
  with pytest.raises(data.DataError, match='mixes split folders'):
    data.get_builder(f'folder:{split}', data_dir)


def test_changing_the_folder_prepares_again(tmp_path):
  root = _flat_root(tmp_path / 'flat')
  name, data_dir = f'folder:{root}', str(tmp_path / 'tfds')
  assert data.prepare(name, data_dir) == str(data.get_builder(name, data_dir).data_dir)
  first = data.get_builder(name, data_dir, prepare=False)
  assert sum(data.num_examples(first, s) for s in first.info.splits) == 30
  _flat_value(f'{root}/bees/new.png', 200)
  with pytest.raises(data.DataError, match='imgcls prepare folder:'):
    data.get_builder(name, data_dir, prepare=False)
  second = data.get_builder(name, data_dir)
  assert second.data_dir != first.data_dir
  assert sum(data.num_examples(second, s) for s in second.info.splits) == 31


def test_readme_command_trains_on_a_folder(tmp_path):
  """configs/image_folder.py end to end on a flat folder of mixed images (1 epoch, tiny)."""
  import importlib.util
  import pathlib
  from imgcls import train
  root = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for c, name in enumerate(('cat', 'dog', 'fox')):
    for i in range(12):
      pixels = rng.integers(0, 60, (20 + i, 24, 3), dtype=np.uint8) + 80 * c
      _save(root / name / f'{i}.png', Image.fromarray(pixels.astype(np.uint8)))
  path = pathlib.Path(__file__).parents[2] / 'configs' / 'image_folder.py'
  spec = importlib.util.spec_from_file_location('image_folder', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'root={root},classes=3,size=16,model=resnet10,epochs=1,batch=8')
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.model.width = 8
  config.async_checkpoints = False
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['examples'] == 3  # validation: 10% of 12 per class, at least one each
  meta = json.loads(next((tmp_path / 'run' / 'checkpoints').glob('*/meta/metadata')).read_text())
  assert meta['label_names'] == ['cat', 'dog', 'fox']
