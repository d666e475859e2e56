"""imgcls.load: a checkpoint written on 8 devices predicts in a fresh 1-device process,
with the same top-1 as `imgcls eval`; every input kind gives the same answer; clear errors."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import imgcls
from etils import epath

from imgcls import checkpoints, data, models, optim, parallel, train

from helpers import NUM_TEST, make_tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh process without the 8-device XLA flag: one CPU device.
PREDICT = """
import json, sys
import jax, numpy as np
import imgcls
clf = imgcls.load(sys.argv[1])
images = np.load(sys.argv[2])['images']
pred = clf.predict(list(images), top_k=clf.num_classes, batch_size=16)
print(json.dumps({'devices': jax.device_count(), 'step': clf.step, 'labels': clf.label_names,
                  'pred': pred, 'train_imported': 'imgcls.train' in sys.modules}))
"""


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  """The tiny config trained for its 12 steps over the 8 simulated devices, evaluated once at
  the end (one checkpoint, so its eval is what `imgcls eval` gives for 'best')."""
  assert jax.device_count() == 8
  workdir = str(tmp_path_factory.mktemp('inference') / 'run')
  result = train.train_and_evaluate(make_tiny_config(data_dir, eval_every_steps=12), workdir)
  return workdir, result


@pytest.fixture(scope='module')
def workdir(run):
  return run[0]


@pytest.fixture(scope='module')
def test_split(data_dir):
  """The decoded test images (uint8 [N, 16, 16, 1]) and labels, in file order."""
  ds = tfds.builder('synthetic_shapes', data_dir=data_dir).as_dataset(
      split='test', shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  return (np.stack([e['image'] for e in examples]),
          np.array([e['label'] for e in examples]))


@pytest.fixture(scope='module')
def clf(workdir):
  return imgcls.load(workdir)


def _reference_probs(workdir, step):
  """Per-image softmax by the training code: its eval pipeline, its restore onto 8 devices."""
  config = ml_collections.ConfigDict(checkpoints.find(workdir, step).config)
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  mesh = parallel.make_mesh()
  eval_ds = data.eval_data(data.builder_for(config.dataset), split=config.dataset.eval_split,
                           pp=config.pp_eval, global_batch_size=config.eval_batch_size)
  image_shape = next(iter(eval_ds))['image'].shape[1:]
  model = models.from_config(config)
  tx, _ = optim.make_optimizer(config, config.total_steps)
  state = ckpt.restore(step, train.init_state(model, tx, config.seed, image_shape, mesh))
  ckpt.close()
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  probs, labels = [], []
  for batch in eval_ds:
    real = batch['mask'] > 0
    probs.append(np.asarray(apply(variables, batch['image']))[real])
    labels.append(np.argmax(batch['labels'], -1)[real])
  return np.concatenate(probs), np.concatenate(labels)


def test_fresh_process_predicts_as_imgcls_eval(run, test_split, tmp_path):
  workdir, scored = run  # the final eval of the only checkpoint: what `imgcls eval` reports
  assert checkpoints.Checkpointer(workdir, read_only=True).all_steps() == [12]
  images, labels = test_split
  np.savez(tmp_path / 'images.npz', images=images)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.Popen(  # runs while this process computes the reference
      [sys.executable, '-c', PREDICT, workdir, str(tmp_path / 'images.npz')],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

  ref_probs, ref_labels = _reference_probs(workdir, 12)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  got = json.loads(out.strip().splitlines()[-1])

  assert got['devices'] == 1 and got['step'] == 12
  assert not got['train_imported']
  np.testing.assert_array_equal(ref_labels, labels)  # same images, same order
  top1 = np.array([int(p[0][0]) for p in got['pred']])
  assert len(top1) == scored['examples'] == NUM_TEST
  assert np.mean(top1 == labels) == pytest.approx(scored['top1'], abs=1e-6)
  np.testing.assert_array_equal(top1, np.argmax(ref_probs, -1))
  index = {name: i for i, name in enumerate(got['labels'])}
  probs = np.zeros_like(ref_probs)
  for row, pairs in zip(probs, got['pred']):
    for name, p in pairs:
      row[index[name]] = p
  np.testing.assert_allclose(probs, ref_probs, atol=1e-5)


def test_every_input_kind_gives_the_same_probabilities(clf, test_split, tmp_path):
  images = test_split[0][:3]
  paths, blobs = [], []
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0])  # mode 'L'
    paths.append(tmp_path / f'{i}.png')
    pil.save(paths[-1])
    buf = io.BytesIO()
    pil.save(buf, format='PNG')
    blobs.append(buf.getvalue())

  expected = clf.probabilities(list(images))
  assert expected.shape == (3, clf.num_classes)
  np.testing.assert_allclose(expected.sum(-1), 1.0, rtol=1e-5)
  for inputs in (images, jax.numpy.asarray(images), [image[..., 0] for image in images],
                 [Image.fromarray(image[..., 0]) for image in images],
                 [str(p) for p in paths], paths, blobs):
    np.testing.assert_array_equal(clf.probabilities(inputs), expected)
  # A single image runs as a batch of 1: equal up to XLA's batch-size-dependent rounding.
  np.testing.assert_allclose(clf.probabilities(images[0])[0], expected[0], atol=1e-6)


def test_predict_top_k_labels_and_features(clf, test_split):
  images = test_split[0][:4]
  pred = clf.predict(images, top_k=2)
  assert len(pred) == 4 and all(len(p) == 2 for p in pred)
  for pairs in pred:
    assert all(name in clf.label_names for name, _ in pairs)
    assert pairs[0][1] >= pairs[1][1]
  assert clf.label_names == ['0', '1', '2', '3']  # the dataset's ClassLabel names
  assert clf.pp == 'decode|value_range(-1, 1)'  # pp_eval without onehot(4)
  full = clf.predict(images, top_k=100)  # capped at the class count
  assert all(len(p) == clf.num_classes for p in full)
  assert sum(p for _, p in full[0]) == pytest.approx(1.0, abs=1e-5)
  assert clf.predict_labels(images) == [p[0][0] for p in pred]
  # batch_size smaller than the input: several (padded) batches, same answer.
  np.testing.assert_allclose(clf.probabilities(images, batch_size=2),
                             clf.probabilities(images), atol=1e-6)
  assert clf.features(images).shape == (4, 64)  # resnet10 width 8: 8 * 2**3 channels

  text = repr(clf)
  for part in ("'resnet10'", 'num_classes=4', '(16, 16, 1)', 'step=12'):
    assert part in text


def test_load_accepts_checkpoints_and_step_folders(workdir, clf):
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(clf.step)
  assert imgcls.load(step_dir).step == clf.step
  assert imgcls.load(pathlib.Path(workdir) / 'checkpoints', step='latest').step == 12
  assert imgcls.load(workdir, step=12).step == 12


def test_checkpoint_errors(workdir, clf, tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='does not exist.*training workdir'):
    imgcls.load(tmp_path / 'missing')
  (tmp_path / 'weights.npz').write_bytes(b'')
  with pytest.raises(checkpoints.CheckpointError, match='is a file, not a checkpoint folder'):
    imgcls.load(tmp_path / 'weights.npz')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint in'):
    imgcls.load(tmp_path / 'empty')
  with pytest.raises(checkpoints.CheckpointError, match=r'no checkpoint at step 99.*\[.*12\]'):
    imgcls.load(workdir, step=99)
  with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
    imgcls.load(workdir, step='worst')

  broken = tmp_path / 'broken' / 'checkpoints' / str(clf.step)
  shutil.copytree(pathlib.Path(workdir) / 'checkpoints' / str(clf.step), broken)
  for f in (broken / 'meta').iterdir():
    if f.is_file() and f.name != 'commit_success.txt':
      f.write_text('{"config": {not json')
  with pytest.raises(checkpoints.CheckpointError,
                     match='cannot read the metadata.*corrupt|no intact checkpoint.*damaged'):
    imgcls.load(tmp_path / 'broken')


def test_input_errors(clf, test_split, tmp_path):
  image = test_split[0][0]
  with pytest.raises(ValueError, match='no images'):
    clf.predict([])
  rgb = np.repeat(image, 3, axis=-1)
  with pytest.raises(ValueError, match=r"3 channels.*takes 1-channel.*convert\('L'\)"):
    clf.predict(rgb)
  with pytest.raises(ValueError, match='Resize it to 16x16'):
    clf.predict(np.zeros((20, 20, 1), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    clf.predict(image.astype(np.float32) / 255)
  with pytest.raises(TypeError, match='input 1 is a dict'):
    clf.predict([image, {'image': image}])
  with pytest.raises(FileNotFoundError, match='no image file'):
    clf.predict(str(tmp_path / 'nope.png'))
  with pytest.raises(ValueError, match='not a readable image'):
    clf.predict(b'not an image')
  with pytest.raises(ValueError, match='top_k'):
    clf.predict(image, top_k=0)


def _save(directory, step, params, meta, metrics, **extra):
  """A checkpoint as the training loop writes it, from host arrays (no training)."""
  state = {'step': np.int32(step), 'params': params, 'opt_state': np.zeros(1, np.float32),
           'rng': np.zeros(2, np.uint32), **extra}
  ckpt = checkpoints.Checkpointer(str(directory), asynchronous=False)
  ckpt.save(step, state, meta, metrics=metrics)
  ckpt.close()


def test_best_latest_and_ema_weights(clf, tmp_path):
  """'best' is the highest eval top-1; a state's ema_params (none is written yet) win."""
  variables = jax.device_get(clf.variables)
  meta = checkpoints.read_meta(epath.Path(clf.path))
  meta = {k: meta[k] for k in ('config', 'image_shape', 'label_names')}
  zeros = jax.tree.map(np.zeros_like, variables['params'])  # zero head: uniform probabilities
  _save(tmp_path, 3, variables['params'], meta, {'top1': 0.9},
        batch_stats=variables['batch_stats'], ema_params=zeros)
  _save(tmp_path, 5, variables['params'], meta, {'top1': 0.1},
        batch_stats=variables['batch_stats'])
  image = np.zeros((16, 16, 1), np.uint8)
  best = imgcls.load(tmp_path)
  assert best.step == 3
  np.testing.assert_allclose(best.probabilities(image), 0.25)
  latest = imgcls.load(tmp_path, step='latest')
  assert latest.step == 5
  np.testing.assert_array_equal(latest.probabilities(image), clf.probabilities(image))


def test_rgb_model_without_batch_stats(tmp_path):
  """A ViT (no BatchNorm statistics) on RGB: grayscale is repeated, alpha dropped."""
  config = {'model': {'name': 'vit', 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32,
                      'patch_size': 4},
            'dataset': {'num_classes': 3}, 'pp_eval': 'decode|value_range(-1, 1)|onehot(3)'}
  model = models.from_config(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  rng = np.random.default_rng(0)  # random weights without running the init
  params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), shapes['params'])
  meta = {'config': config, 'image_shape': [8, 8, 3], 'label_names': None}
  _save(tmp_path, 1, params, meta, {'top1': 0.5}, batch_stats={})
  vit = imgcls.load(tmp_path)
  assert vit.label_names == ['0', '1', '2'] and 'batch_stats' not in vit.variables

  gray = np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  rgba = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
  expected = vit.features(rgb)
  assert expected.shape == (1, 16)
  for image in (gray, gray[..., None], rgba, Image.fromarray(gray), Image.fromarray(rgba)):
    np.testing.assert_array_equal(vit.features(image), expected)
