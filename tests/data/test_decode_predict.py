"""One decode: the odd images a user has (EXIF-rotated, RGBA, CMYK, 16-bit, palette GIF,
grayscale) reach the model as the same inputs whether they were prepared as an image folder
and read by the eval pipeline, or given to imgcls.load(...).predict as paths, bytes or PIL."""

import os
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from imgcls import data, inference, models
from imgcls.data import decode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                'scripts'))
from samples import odd_images as _odd_images  # noqa: E402

SIZE = 8
PP = f'decode(3)|resize_small({SIZE})|central_crop({SIZE})|value_range(-1, 1)|onehot(7)'


@pytest.fixture(scope='module')
def odd_folder(tmp_path_factory):
  """root/{train,test}/CASE/0.EXT, one case per class, so the label names the file."""
  root = tmp_path_factory.mktemp('odd')
  paths = {}
  for case, (ext, blob) in _odd_images().items():
    for split in ('train', 'test'):
      os.makedirs(root / split / case)
      (root / split / case / f'0.{ext}').write_bytes(blob)
    paths[case] = str(root / 'test' / case / f'0.{ext}')
  return str(root), paths


def _classifier(channels: int = 3, pp: str = PP, hw=(SIZE, SIZE)) -> inference.Classifier:
  """A Classifier for the folder's pp (the model is never run here)."""
  config = {'model': {'name': 'vit', 'width': 8, 'depth': 1, 'num_heads': 2, 'mlp_dim': 8,
                      'patch_size': 1}, 'dataset': {'num_classes': 7}, 'pp_eval': pp}
  model = models.from_config(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1, *hw, channels), np.float32))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  return inference.Classifier(model, {'params': params}, config=config,
                              image_shape=(*hw, channels),
                              label_names=[str(i) for i in range(7)], step=0)


def test_folder_preparation_and_predict_give_identical_model_inputs(odd_folder, tmp_path):
  root, paths = odd_folder
  builder = data.get_builder(f'folder:{root}', str(tmp_path))
  names = builder.info.features['label'].names
  ev = data.eval_data(builder, split='test', pp=PP, global_batch_size=len(names))
  batch = next(iter(ev))
  prepared = {names[int(np.argmax(l))]: x for l, x, m in
              zip(batch['labels'], batch['image'], batch['mask']) if m > 0}
  assert sorted(prepared) == sorted(paths)

  clf = _classifier()
  for case, path in paths.items():
    with open(path, 'rb') as f:
      blob = f.read()
    for what, given in (('path', path), ('bytes', blob), ('PIL', Image.open(path))):
      got = clf.preprocess(given)[0]
      if case == 'jpeg' and what == 'PIL':
        # An RGB JPEG is stored as is and decoded by TF in training (libjpeg's fast DCT);
        # an image PIL already decoded differs by a few levels. Paths and bytes are exact.
        np.testing.assert_allclose(got, prepared[case], atol=8 / 127.5)
        continue
      np.testing.assert_array_equal(got, prepared[case], err_msg=f'{case} as {what}')


def test_odd_cases_decode_as_documented(odd_folder):
  _, paths = odd_folder
  exif = decode.load(paths['exif'])
  assert exif.shape == (14, 9, 3)  # stored 14 wide, 9 high; shown upright: 9 wide
  rgba = decode.load(paths['rgba'])
  assert (rgba[:, 0] == 255).all()  # fully transparent column: composited on white
  deep = decode.load(paths['png16'], channels=None)
  assert deep.shape == (9, 12, 1) and deep.max() > 200  # the top 8 bits, not saturated
  # A 16-bit PIL image passed directly is scaled the same way (it used to saturate at 255).
  sixteen = Image.fromarray(np.full((4, 4), 40000, np.uint16))
  assert (decode.from_pil(sixteen, channels=None) == 40000 >> 8).all()
  gray = decode.load(paths['gray'], channels=None)
  assert gray.shape[-1] == 1
  np.testing.assert_array_equal(decode.load(paths['gray']), np.repeat(gray, 3, -1))


def test_grayscale_file_into_a_grayscale_model_keeps_one_channel(odd_folder):
  _, paths = odd_folder
  clf = _classifier(channels=1, pp='decode|value_range(-1, 1)', hw=(13, 9))
  x = clf.preprocess(paths['gray'])[0]
  gray = np.asarray(Image.open(paths['gray']), np.float32)[..., None]
  np.testing.assert_allclose(x, gray / 127.5 - 1, atol=1e-6)
  with pytest.raises(ValueError, match=r'3 channels.*convert\(.L.\)'):
    clf.preprocess(paths['cmyk'])


def test_unreadable_bytes_name_the_problem():
  clf = _classifier()
  with pytest.raises(ValueError, match='not a readable image'):
    clf.preprocess(b'\x89PNG\r\n\x1a\n truncated')
