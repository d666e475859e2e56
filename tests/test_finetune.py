"""Fine-tuning end to end: pretrain a tiny ViT, fine-tune it on other classes at another
resolution with frozen layers (from its workdir and from an official-layout .npz), and the
data-efficiency script on a tiny stand-in for Fashion-MNIST."""

import csv
import importlib.util
import json
import math
import pathlib
import re
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from imgcls import checkpoints, compare, config as config_lib, data, train
from imgcls.models import weights

from helpers import make_tiny_config

TINY_VIT = dict(name='vit', width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4)
FROZEN = ('^embedding/', 'posembed_input/', 'encoderblock_0/')
POSEMB = ('Transformer', 'posembed_input', 'pos_embedding')
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flat(params):
  return {k.removeprefix('params/'): np.asarray(v)
          for k, v in weights.flatten({'params': params}).items()}


def _weights(workdir, step='latest'):
  return _flat(checkpoints.find(workdir, step).weights()['params'])


@pytest.fixture(scope='module')
def pretrained(data_dir, tmp_path_factory):
  """A tiny ViT trained on 16x16 images of 4 classes (4x4 patch grid); its workdir."""
  config = make_tiny_config(data_dir, total_steps=8, eval_every_steps=8, log_every_steps=4)
  config.model = ml_collections.ConfigDict(TINY_VIT)
  config.optimizer.name = 'adamw'
  config.lr.base = 3e-3
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def target_data_dir(tmp_path_factory):
  """The target task: 3 classes of 24x24 images (a 6x6 patch grid)."""
  d = str(tmp_path_factory.mktemp('target'))
  data.make_synthetic_dataset(d, 'synthetic_shapes3', num_train=96, num_test=24, image_size=24,
                              channels=1, num_classes=3, seed=1)
  return d


def _finetune(target_data_dir, model_init, workdir):
  """Fine-tunes with the first block and the embeddings frozen; returns the workdir."""
  c = config_lib.defaults()
  c.dataset.name = 'synthetic_shapes3'
  c.dataset.data_dir = target_data_dir
  c.dataset.num_classes = 3
  c.pp_train = c.pp_eval = 'decode|value_range(-1, 1)|onehot(3)'
  c.model = ml_collections.ConfigDict(TINY_VIT)
  c.model_init = model_init
  c.optimizer.name = 'adamw'
  c.optimizer.freeze = FROZEN
  c.lr.base = 1e-2
  c.lr.warmup_steps = 0
  c.lr.schedule = 'constant'
  c.weight_decay = 0.1  # frozen parameters must not decay either
  c.batch_size = c.eval_batch_size = 16
  c.total_steps = c.eval_every_steps = 24
  c.log_every_steps = 1  # the first record is step 1 alone: the loss of the zero head
  c.async_checkpoints = False
  train.train_and_evaluate(c, workdir)
  return workdir


def _check_finetuned(pretrained, workdir, fmt):
  old, new = _weights(pretrained, 'best'), _weights(workdir)  # model_init reads the best step
  report = json.loads((pathlib.Path(workdir) / 'model_init_report.json').read_text())
  assert report['fmt'] == fmt and not report['missing'] and not report['unused']
  posemb = 'params/' + '/'.join(POSEMB)
  assert report['resized'] == [f'{posemb}: 17 -> 37 tokens (bilinear)']
  assert sorted(r.split(':')[0] for r in report['reinitialised']) == [
      'params/head/bias', 'params/head/kernel']

  # Position embeddings: class token kept, the 4x4 grid resized bilinearly to 6x6 (and frozen,
  # so the fine-tuned value is still exactly the resize).
  key = '/'.join(POSEMB)
  assert new[key].shape == (1, 1 + 6 * 6, 16)
  np.testing.assert_array_equal(new[key][:, 0], old[key][:, 0])
  grid = jax.image.resize(old[key][0, 1:].reshape(4, 4, 16), (6, 6, 16), 'bilinear',
                          antialias=False)
  np.testing.assert_allclose(new[key][0, 1:], np.asarray(grid).reshape(36, 16), atol=1e-6)

  # Frozen: bit for bit the pretrained values. The rest trained.
  frozen = [k for k in new if any(re.search(f, k) for f in FROZEN)]
  assert len(frozen) == 2 + 1 + 16  # embedding kernel/bias, pos_embedding, one encoder block
  for k in frozen:
    if k != key:
      np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  trained = sorted(set(new) - set(frozen) - {'head/kernel', 'head/bias'})
  assert 'cls' in trained and 'Transformer/encoder_norm/scale' in trained
  for k in trained:
    assert not np.array_equal(new[k], old[k]), f'{k} did not change'
  assert new['head/kernel'].shape == (16, 3) and np.abs(new['head/kernel']).sum() > 0

  # The head starts at zero (logits 0: loss ln 3 at the first step); then the loss falls.
  losses = [r['train_loss'] for r in compare.read_metrics(workdir) if 'train_loss' in r]
  assert len(losses) == 24
  assert losses[0] == pytest.approx(math.log(3), abs=1e-5)
  assert np.mean(losses[-4:]) < 0.8 * losses[0], losses
  return new


def test_finetune_from_workdir_and_from_official_npz(pretrained, target_data_dir, tmp_path):
  from_workdir = _check_finetuned(
      pretrained, _finetune(target_data_dir, pretrained, str(tmp_path / 'ft')), 'imgcls')

  # The same weights written in the official ViT layout start the same fine-tune.
  variables = checkpoints.find(pretrained, 'best').weights()
  npz = tmp_path / 'ViT-tiny.npz'
  weights.export(variables, npz, 'vit_npz')
  assert 'Transformer/posembed_input/pos_embedding' in np.load(npz).files  # official names
  from_npz = _check_finetuned(
      pretrained, _finetune(target_data_dir, str(npz), str(tmp_path / 'ft_npz')), 'vit_npz')
  for k in from_workdir:  # same start, seed and batches: the same run
    np.testing.assert_allclose(from_npz[k], from_workdir[k], atol=1e-6, err_msg=k)


# ------------------------------------------------- scripts/data_efficiency.py


def _script():
  spec = importlib.util.spec_from_file_location('data_efficiency',
                                                ROOT / 'scripts' / 'data_efficiency.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def fake_fashion(tmp_path_factory):
  """A 10-class, 28x28 grayscale stand-in for Fashion-MNIST; (data_dir, train labels)."""
  d = str(tmp_path_factory.mktemp('fake_fashion'))
  data.make_synthetic_dataset(d, 'fake_fashion', num_train=150, num_test=40, image_size=28,
                              channels=1, num_classes=10)
  builder = data.get_builder('fake_fashion', d)
  labels = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))['label']
  return d, labels


def test_data_efficiency_exports_subsets_runs_both_methods_and_resumes(
    fake_fashion, tmp_path, monkeypatch):
  de = _script()
  data_dir, train_labels = fake_fashion
  counts = np.bincount(train_labels, minlength=10)
  assert counts.min() >= 5
  calls, prepared = [], {}

  def fake_train(config, workdir):
    """Checks what each run would read through the real folder reader; trains nothing."""
    config_lib.validate(config)
    ds = config.dataset
    if ds.name not in prepared:
      builder = data.get_builder(ds.name, ds.data_dir, num_classes=ds.num_classes)
      prepared[ds.name] = (data.num_examples(builder, 'train'),
                           data.num_examples(builder, 'test'))
    calls.append((workdir, config))
    pathlib.Path(workdir).mkdir(parents=True)
    return {'top1': 0.5 + 0.01 * len(calls), 'loss': 1.0, 'examples': prepared[ds.name][1]}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  out = tmp_path / 'out'
  settings = de.parse_args(['--out', str(out), '--ks', 'all,5,2', '--seeds', '2', '--steps',
                            '3', '--batch', '16', '--dataset', 'fake_fashion', '--data_dir',
                            data_dir])
  assert settings.ks == [2, 5, 'all']
  records = de.run_experiment(settings)

  # 1 pretraining + 3 ks x 2 seeds x 2 methods, each in its own workdir.
  assert len(calls) == 13 and len({w for w, _ in calls}) == 13
  pre_dir, pre = calls[0]
  assert pre.dataset.num_classes == 5 and not pre.model_init
  assert prepared[pre.dataset.name][0] == counts[:5].sum()
  for workdir, c in calls[1:]:
    finetune = '/finetune_seed' in workdir
    assert c.model_init == (pre_dir if finetune else '')
    assert c.model_load.ignore == (r'^params/head/' if finetune else '')
    assert c.total_steps == 3 and c.dataset.num_classes == 5
  targets = {c.dataset.name for _, c in calls[1:]}
  assert len(targets) == 2 * 2 + 1  # k=2 and k=5 per seed, one 'all'
  assert len({prepared[t][1] for t in targets}) == 1  # all score the same test images
  for name in targets:
    k = re.search(r'target_(k(\d+)_seed\d|all)$', name)
    assert prepared[name][0] == (int(k[2]) * 5 if k[2] else counts[5:].sum()), name

  # The subsets: k per class, relabelled 5..9 -> 0..4, nested across k, other per seed.
  images = out / 'images'

  def ids(name, cls):
    return {int(p.stem) for p in (images / name / 'train').glob(f'{cls}_*/*.png')}
  for cls in range(5):
    k2, k5 = ids('target_k2_seed0', cls), ids('target_k5_seed0', cls)
    assert len(k2) == 2 and len(k5) == 5 and k2 < k5
    assert all(train_labels[i] == cls + 5 for i in k5)
    assert ids('target_k5_seed1', cls) != k5
    assert len(ids('target_all', cls)) == counts[cls + 5]

  # Results: one row per (k, method) with the mean over 2 seeds; md, csv and png.
  markdown = de.write_results(str(out), records, de.smallest_class(str(images / 'target_all')))
  with open(out / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['k'], r['method'], r['seeds']) for r in rows] == [
      (str(k), m, '2') for k in (2, 5, 'all') for m in ('finetune', 'scratch')]
  assert float(rows[0]['top1_mean']) == pytest.approx((0.52 + 0.54) / 2)
  assert float(rows[0]['top1_std']) == pytest.approx(np.std([0.52, 0.54], ddof=1))
  assert f'| all ({counts[5:].min()}) | scratch |' in markdown
  assert (out / 'results.md').read_text() == markdown
  assert len((out / 'runs.csv').read_text().splitlines()) == 1 + 12
  from PIL import Image  # pylint: disable=import-outside-toplevel
  assert Image.open(out / 'accuracy_vs_k.png').size[0] > 100

  vit = de.make_config(de.Settings(out=str(tmp_path), model='vit'), str(tmp_path), 28, 5,
                       steps=3, lr=1e-3)  # validated inside
  assert vit.model.name == 'vit' and vit.optimizer.name == 'adamw'

  # A rerun trains nothing; another budget in the same folder is refused; a k too large is named.
  calls.clear()
  assert de.run_experiment(settings) == records and not calls
  with pytest.raises(de.ExperimentError, match='other settings.*steps'):
    de.run_experiment(de.parse_args(['--out', str(out), '--steps', '4', '--dataset',
                                     'fake_fashion', '--data_dir', data_dir]))
  with pytest.raises(de.ExperimentError, match='k=50 images per class.*only'):
    de.run_experiment(de.parse_args(['--out', str(tmp_path / 'big'), '--ks', '50', '--dataset',
                                     'fake_fashion', '--data_dir', data_dir]))

pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
