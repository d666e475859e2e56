"""imgcls predict and the one-weights rule: over a folder with a corrupt file the command
writes a row per file and exits 0, and its top-1 equals `imgcls eval`'s and imgcls.load's
for a run that kept an EMA."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import imgcls
from imgcls import predict, train
from imgcls.evaluators.checkpoint import evaluate_checkpoint

from helpers import NUM_TEST, make_tiny_config, write_test_split_pngs
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'scripts'))
from samples import random_checkpoint as save_checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def ema_run(data_dir, tmp_path_factory):
  """The tiny config's model with random raw weights and a different EMA, saved at step 10."""
  config = make_tiny_config(data_dir, ema_decay=0.5).to_dict()
  config['model'] = dict(config['model'])
  workdir = tmp_path_factory.mktemp('predict') / 'run'
  save_checkpoint(workdir, config['model'], (16, 16, 1), config['pp_eval'], ema=True,
                  label_names=['0', '1', '2', '3'])
  # The whole training config, as `imgcls eval` needs it (save_checkpoint writes a short one).
  meta_dir = workdir / 'checkpoints' / '10' / 'meta'
  for f in meta_dir.iterdir():
    if f.is_file() and f.name != 'commit_success.txt' and not f.name.startswith('_'):
      meta = json.loads(f.read_text())
      meta['config'] = config
      f.write_text(json.dumps(meta))
  return str(workdir)


@pytest.fixture(scope='module')
def png_folder(data_dir, tmp_path_factory):
  """The synthetic test split as PNGs, test/LABEL/i.png, with a corrupt file among them."""
  root = tmp_path_factory.mktemp('pngs')
  write_test_split_pngs(data_dir, root)
  (root / '2' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
  return root


def test_predict_cli_over_a_folder_agrees_with_eval_and_load(ema_run, png_folder, tmp_path):
  out = tmp_path / 'pred.csv'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.Popen(  # runs while this process scores the checkpoint
      [sys.executable, '-m', 'imgcls.main', 'predict', f'--workdir={ema_run}', f'--out={out}',
       '--top_k=2', '--batch_size=16', str(png_folder)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
  scored = evaluate_checkpoint(ema_run, 'best')
  assert scored['weights'] == 'ema' and scored['examples'] == NUM_TEST
  assert 'ema_top1' not in scored  # one number: the weights that are served
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert 'predict: 38 files, 37 classified, 1 unreadable' in err

  rows = list(csv.DictReader(out.open()))
  assert len(rows) == NUM_TEST + 1
  assert list(rows[0]) == ['path', 'label_1', 'prob_1', 'label_2', 'prob_2', 'error']
  bad = [r for r in rows if r['error']]
  assert len(bad) == 1 and bad[0]['path'].endswith('corrupt.png') and not bad[0]['label_1']
  assert 'not a readable image' in bad[0]['error']
  good = [r for r in rows if not r['error']]
  truth = [pathlib.Path(r['path']).parent.name for r in good]
  top1 = np.mean([r['label_1'] == t for r, t in zip(good, truth)])
  assert top1 == pytest.approx(scored['top1'], abs=1e-6)
  # imgcls.load serves the same weights: the same top-1 on the same images.
  clf = imgcls.load(ema_run)
  assert clf.weights == 'ema'
  assert clf.predict_labels([r['path'] for r in good]) == [r['label_1'] for r in good]
  raw = imgcls.load(ema_run, weights='raw')
  assert raw.weights == 'raw'
  assert not np.allclose(raw.probabilities(good[0]['path']), clf.probabilities(good[0]['path']))


def test_jsonl_tta_and_raw_weights(ema_run, png_folder, tmp_path):
  files = sorted(str(p) for p in png_folder.glob('1/*.png'))[:3]
  out = str(tmp_path / 'p.jsonl')
  summary = predict.predict(ema_run, [files[0], str(png_folder / '1' / '*.png'),
                                      str(tmp_path / 'missing.png')],
                            out, weights='raw', top_k=9, tta='flip', progress=None)
  rows = [json.loads(line) for line in open(out)]
  assert summary['weights'] == 'raw' and summary['errors'] == 1
  assert rows[-1]['error'] == 'no such file or folder' and rows[-1]['top_k'] == []
  assert rows[0]['path'] == files[0] and len(rows[0]['top_k']) == 4  # capped at 4 classes
  clf = imgcls.load(ema_run, weights='raw')
  x = clf.preprocess(files[0])
  flipped = (clf.scores(x) + clf.scores(x[:, :, ::-1])) / 2
  np.testing.assert_allclose([p['prob'] for p in rows[0]['top_k']],
                             np.sort(flipped[0])[::-1], atol=1e-6)
  with pytest.raises(predict.PredictError, match='.csv or .jsonl'):
    predict.predict(ema_run, files, str(tmp_path / 'p.txt'))


def test_multilabel_rows_use_the_tuned_threshold(tmp_path):
  model = {'name': 'vit', 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32,
           'patch_size': 4}
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  for metrics, expect in (({'eval_top1': 0.5, 'eval_threshold_tuned': 0.45}, 0.45),
                          ({'eval_top1': 0.5}, 0.5)):
    workdir = save_checkpoint(tmp_path / f'run{expect}', model, (8, 8, 3),
                              'decode(3)|value_range(-1, 1)', loss='sigmoid_xent',
                              metrics=metrics)
    out = str(tmp_path / f'ml{expect}.csv')
    summary = predict.predict(workdir, paths, out, progress=None)
    assert summary['threshold'] == expect
    assert ('default 0.5' in summary['threshold_source']) == (expect == 0.5)
    probs = imgcls.load(workdir).probabilities(paths)
    for row, p in zip(csv.DictReader(open(out)), probs):
      want = [l for l, q in zip(['cat', 'dog', 'owl'], p) if q >= expect]
      assert row['labels'] == ';'.join(want)
