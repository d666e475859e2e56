"""Image folders' rough edges: messages that name the real path and the right flag, the eval
split of a folder without validation, model size arguments in configs/image_folder.py, and
decode.py, the one PIL decode path."""

import importlib.util
import io
import pathlib

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from imgcls import config as config_lib, data
from imgcls.data import decode, folder

CONFIG = pathlib.Path(__file__).parents[2] / 'configs' / 'image_folder.py'


def _png(path: pathlib.Path, value: int = 100, size=(8, 6), mode='RGB') -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, value if mode != 'RGB' else (value,) * 3).save(path, format='PNG')


def _config(arg: str):
  spec = importlib.util.spec_from_file_location('image_folder', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_empty_class_of_a_flat_folder_names_its_folder(tmp_path):
  for c in ('ants', 'bees'):
    for i in range(3):
      _png(tmp_path / 'root' / c / f'{i}.png', 10 * i)
  (tmp_path / 'root' / 'empty-class').mkdir()
  with pytest.raises(data.DataError) as e:
    data.get_builder(f'folder:{tmp_path}/root', str(tmp_path / 'tfds'))
  message = str(e.value)
  assert f'{tmp_path}/root/empty-class/' in message
  assert 'train/' not in message and 'split' not in message
  assert 'delete the empty class folder' in message


def test_empty_class_of_a_split_folder_names_the_split_folder(tmp_path):
  for split in ('train', 'val'):
    for c in ('ants', 'bees'):
      _png(tmp_path / 'root' / split / c / '0.png')
  (tmp_path / 'root' / 'val' / 'cats').mkdir()
  _png(tmp_path / 'root' / 'train' / 'cats' / '0.png')
  (tmp_path / 'root' / 'val' / 'cats' / '0.png').unlink(missing_ok=True)
  with pytest.raises(data.DataError, match=f'No images .* in: {tmp_path}/root/val/cats/'):
    data.get_builder(f'folder:{tmp_path}/root', str(tmp_path / 'tfds'))


def test_corrupt_file_advice_is_a_flag_that_parses_for_train_and_prepare(tmp_path):
  for c in ('ants', 'bees'):
    for i in range(3):
      _png(tmp_path / 'root' / c / f'{i}.png', 10 * i)
  (tmp_path / 'root' / 'bees' / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(data.DataError) as e:
    data.get_builder(f'folder:{tmp_path}/root', str(tmp_path / 'tfds'))
  message = str(e.value)
  assert 'bees/bad.png' in message
  flag = '--config.dataset.skip_corrupt=True'
  assert flag in message and 'imgcls train' in message
  assert 'imgcls prepare --config=CONFIG' in message
  # The flag as written parses (absl + ml_collections, as `imgcls` reads it).
  argv = ['imgcls', f'--config={CONFIG}:root={tmp_path}/root,classes=2', flag]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv, lock_config=True)
  values(argv)
  ds = values.config.dataset
  assert ds.skip_corrupt is True
  # ... and prepare_for, which `imgcls prepare --config=...` calls, honours it.
  path = data.prepare_for(ds, data_dir=str(tmp_path / 'tfds'))
  builder = data.builder_for(ds, data_dir=str(tmp_path / 'tfds'))
  assert str(builder.data_dir) == path
  assert folder.skipped_files(builder) == ['bees/bad.png']


def test_folder_without_validation_evaluates_on_test(tmp_path):
  root = tmp_path / 'root'
  for split, n in (('train', 4), ('test', 2)):
    for c in ('ants', 'bees'):
      for i in range(n):
        _png(root / split / c / f'{i}.png', 10 * i)
  name = f'folder:{root}'
  assert folder.splits(name) == ['test', 'train']
  assert folder.eval_split(name) == 'test'
  config = _config(f'root={root},classes=2')
  assert config.dataset.eval_split == 'test'
  builder = data.builder_for(config.dataset, data_dir=str(tmp_path / 'tfds'))
  assert data.num_examples(builder, config.dataset.eval_split) == 4
  # With a validation folder, or a flat folder split with the defaults: validation.
  for c in ('ants', 'bees'):
    _png(root / 'val' / c / '0.png')
  assert _config(f'root={root},classes=2').dataset.eval_split == 'validation'
  assert folder.eval_split(f'folder:{tmp_path}/nowhere') == 'validation'
  assert folder.eval_split(f'folder:{root}/train') == 'validation'  # flat: default split
  assert folder.eval_split(f'folder:{root}/train', 'train=0.5,test=0.5') == 'test'
  # An explicit eval_split wins.
  assert _config(f'root={root},classes=2,eval_split=train').dataset.eval_split == 'train'


def test_multilabel_csv_splits(tmp_path):
  root = tmp_path / 'root'
  _png(root / 'train' / 'a.png')
  _png(root / 'test' / 'b.png')
  (root / folder.CSV_NAME).write_text('filename,labels\ntrain/a.png,x\ntest/b.png,y\n')
  assert folder.splits(f'folder:{root}') == ['test', 'train']
  assert folder.eval_split(f'folder:{root}') == 'test'


def test_config_takes_model_size_arguments():
  config = _config('root=/data/images,classes=3,model=resnet18,width=16,stem=small')
  assert config.model.width == 16 and config.model.stem == 'small'
  plain = _config('root=/data/images,classes=3')
  assert 'width' not in plain.model and 'stem' not in plain.model  # model defaults
  vit = _config('root=/data/images,classes=3,model=vit,variant=Ti/16,size=32')
  assert vit.model.variant == 'Ti/16' and 'width' not in vit.model
  with pytest.raises(config_lib.ConfigError, match=r'width=.*must be int'):
    _config('root=/data/images,classes=3,width=wide')


def test_config_model_arguments_are_validated():
  config_lib.validate(_config('root=/data/images,classes=3,width=16,stem=small'))
  with pytest.raises(config_lib.ConfigError, match=r"unknown key 'model.stem' for model 'vit_b16'"):
    config_lib.validate(_config('root=/data/images,classes=3,model=vit_b16,stem=small'))


# ------------------------------------------------------------------ decode.py

def test_decode_to_rgb_and_load():
  rgba = Image.new('RGBA', (4, 3), (10, 20, 30, 0))  # Fully transparent: white.
  assert decode.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
  gray16 = Image.fromarray(np.full((3, 4), 0x1234, np.uint16))
  assert decode.to_rgb(gray16).getpixel((0, 0)) == (0x12,) * 3
  buf = io.BytesIO()
  Image.new('L', (5, 2), 77).save(buf, format='PNG')
  pixels = decode.load(buf.getvalue())
  assert pixels.shape == (2, 5, 3) and pixels.dtype == np.uint8 and (pixels == 77).all()
  assert decode.load(buf.getvalue(), channels=None).shape == (2, 5, 1)
  assert (decode.load(buf.getvalue(), channels=1) == 77).all()
  buf16 = io.BytesIO()
  gray16.save(buf16, format='PNG')
  assert decode.load(buf16.getvalue(), channels=None).tolist() == [[[0x12]] * 4] * 3
  buf_rgba = io.BytesIO()
  rgba.save(buf_rgba, format='PNG')
  assert decode.load(buf_rgba.getvalue(), channels=None).shape == (3, 4, 3)
  assert decode.load(buf_rgba.getvalue(), channels=1).tolist() == [[[255]] * 4] * 3
  with pytest.raises(data.DataError, match='not a readable image'):
    decode.load(b'not an image')


def test_decode_load_applies_exif_rotation(tmp_path):
  image = Image.new('RGB', (6, 2), (200, 0, 0))
  exif = image.getexif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  path = tmp_path / 'rotated.jpg'
  image.save(path, format='JPEG', exif=exif)
  assert decode.load(str(path)).shape == (6, 2, 3)
  assert decode.problem(str(path)) is None
  assert decode.problem(__file__) is not None
