"""Checks and figures for `imgcls export` / `imgcls predict` on real Fashion-MNIST test images.

  python scripts/deploy_check.py --workdir=/tmp/qs [--n=512] [--predict_pngs]

For the trained run in --workdir and for tiny random-weight ResNet (small stem), ViT and BiT
checkpoints on the same 28x28x1 input: ONNX (onnxruntime) and StableHLO outputs against
imgcls.load(...).probabilities at batch sizes 1, 7 and 64, on Fashion-MNIST test images and
on the odd-case images (decoded as imgcls.load decodes them, resized to 28x28 by PIL as a
caller would); export time and file size; onnxruntime CPU img/s against imgcls.load's.
With --predict_pngs: the whole test split as PNGs, `imgcls predict` over them (plus a corrupt
file), and its top-1 against `imgcls eval`'s. Prints one JSON object.
"""

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

import imgcls
from imgcls import export, inference
from samples import odd_images as sample_odd_images, random_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fashion_mnist_test(data_dir, n=None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load('fashion_mnist', split='test', data_dir=data_dir, download=False,
                 shuffle_files=False)
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex['image'])
    labels.append(int(ex['label']))
    if n and len(images) == n:
      break
  return np.stack(images), np.array(labels)


def odd_images(shape):
  """The odd image files of scripts/samples.py, decoded by imgcls.load's rules and resized
  to the model's size by PIL."""
  h, w, c = shape
  out = []
  for _, (_, blob) in sorted(sample_odd_images().items()):
    pixels = next(inference._images(blob, 1 if c == 1 else 3))  # pylint: disable=protected-access
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    out.append(np.asarray(image.resize((w, h), Image.BILINEAR), np.uint8).reshape(h, w, c))
  return np.stack(out)


def compare(clf, images, odd, outdir, name):
  result = {}
  for fmt, suffix in (('onnx', 'onnx'), ('stablehlo', 'stablehlo')):
    path = os.path.join(outdir, f'{name}.{suffix}')
    meta = export.export_classifier(clf, fmt, path)
    if fmt == 'onnx':
      import onnxruntime as ort  # pylint: disable=g-import-not-at-top
      session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
      run = lambda x, s=session: s.run(None, {'images': x})[0]
    else:
      import jax  # pylint: disable=g-import-not-at-top
      with open(path, 'rb') as f:
        exp = jax.export.deserialize(bytearray(f.read()))
      run = lambda x, e=exp: np.asarray(e.call(x))
    diffs = {}
    for n in (1, 7, 64):
      x = images[:n]
      diffs[f'fmnist_batch{n}'] = float(np.abs(run(x) - clf.probabilities(x, batch_size=64)).max())
    diffs['odd_cases'] = float(np.abs(run(odd) - clf.probabilities(odd)).max())
    result[fmt] = {'max_abs_diff': diffs, 'export_seconds': meta['export_seconds'],
                   'megabytes': round(meta['bytes'] / 1e6, 3), 'weights': meta['weights'],
                   'self_check': meta['verification']['max_abs_diff'], '_run': run}
  return result


def _rate(fn, inputs, batch, repeats):
  """Best of `repeats` passes over `inputs` in batches, images per second."""
  fn(inputs[:batch])  # compile / warm up
  best = 0.0
  for _ in range(repeats):
    t = time.perf_counter()
    for i in range(0, len(inputs), batch):
      fn(inputs[i:i + batch])
    best = max(best, len(inputs) / (time.perf_counter() - t))
  return round(best, 1)


def throughput(clf, onnx_run, images, batch=64, repeats=3):
  """uint8 images -> probabilities: onnxruntime (preprocessing in the graph) against
  imgcls.load (TF pp per image + jit), and imgcls.load's model call alone."""
  x = clf.preprocess(images)
  return {'onnxruntime_img_s': _rate(onnx_run, images, batch, repeats),
          'imgcls_load_probabilities_img_s': _rate(
              lambda b: clf.probabilities(b, batch_size=batch), images, batch, repeats),
          'imgcls_load_model_only_img_s': _rate(lambda b: clf.scores(b, batch), x, batch,
                                                repeats)}


def predict_vs_eval(workdir, images, labels, outdir, data_dir):
  root = pathlib.Path(outdir) / 'pngs'
  for i, (image, label) in enumerate(zip(images, labels)):
    (root / str(label)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(root / str(label) / f'{i:05d}.png')
  (root / '0' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\nbroken')
  out = pathlib.Path(outdir) / 'pred.csv'
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'imgcls.main', 'predict', f'--workdir={workdir}',
                         f'--out={out}', str(root)], capture_output=True, text=True, cwd=ROOT)
  seconds = time.perf_counter() - t
  rows = list(csv.DictReader(out.open()))
  good = [r for r in rows if not r['error']]
  top1 = float(np.mean([r['label_1'] == clf_label(r) for r in good]))
  args = ['imgcls.main', 'eval', f'--workdir={workdir}'] + (
      [f'--data_dir={data_dir}'] if data_dir else [])
  ev = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, cwd=ROOT)
  line = [l for l in ev.stdout.splitlines() if 'top1=' in l][-1]
  fields = dict(kv.split('=', 1) for kv in line.split())
  return {'predict_exit': proc.returncode, 'rows': len(rows), 'errors': len(rows) - len(good),
          'predict_top1': top1, 'eval_top1': float(fields['top1']),
          'eval_weights': fields.get('weights'), 'predict_seconds': round(seconds, 1),
          'progress_line': proc.stderr.strip().splitlines()[-2:] if proc.stderr else None}


LABEL_NAMES = None


def clf_label(row):
  return LABEL_NAMES[int(pathlib.Path(row['path']).parent.name)]


def main():
  global LABEL_NAMES
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--n', type=int, default=512)
  parser.add_argument('--predict_pngs', action='store_true')
  args = parser.parse_args()
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    images, labels = fashion_mnist_test(args.data_dir, None if args.predict_pngs else args.n)
    clf = imgcls.load(args.workdir)
    LABEL_NAMES = clf.label_names
    odd = odd_images(clf.image_shape)
    tiny = {
        'resnet_small': {'name': 'resnet10', 'width': 8, 'stem': 'small'},
        'vit': {'name': 'vit', 'width': 32, 'depth': 2, 'num_heads': 2, 'mlp_dim': 64,
                'patch_size': 4},
        'bit': {'name': 'bit', 'width': 16, 'stage_sizes': [1, 1], 'num_groups': 8},
    }
    runs = {'quickstart': clf}
    for name, model in tiny.items():
      workdir = random_checkpoint(pathlib.Path(tmp) / name, model, clf.image_shape,
                                clf.config['pp_eval'], ema=name == 'resnet_small',
                                label_names=clf.label_names)
      runs[name] = imgcls.load(workdir)
    for name, c in runs.items():
      result = compare(c, images[:args.n], odd, tmp, name)
      onnx_run = result['onnx'].pop('_run')
      result['stablehlo'].pop('_run')
      if name == 'quickstart':
        result['speed_batch64'] = throughput(c, onnx_run, images[:args.n])
      out[name] = result
    if args.predict_pngs:
      out['predict_vs_eval'] = predict_vs_eval(args.workdir, images, labels, tmp, args.data_dir)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
