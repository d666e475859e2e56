"""Images/s of the tf.data input pipeline on ImageNet-sized JPEGs, pp fusion off and on.

  uv run python scripts/bench_pipeline.py                 # train + eval pp, A B A B, table + JSON
  uv run python scripts/bench_pipeline.py --smoke         # tiny, a few seconds
  uv run python scripts/bench_pipeline.py --threads=1 --seconds=20 --json=pipe.json

The images (smooth random colour fields with fine texture, JPEG quality 90, 500x375 like a
typical ImageNet photo) are written once and prepared once as an image folder dataset
(`folder:` source) under --cache_dir; the batches come from imgcls.data.train_iterator or
eval_data, the code path of training and evaluation. "Before" is the pp string as written
with pp fusion off (IMGCLS_PP_FUSE=0: decode the whole JPEG, then crop; value_range in
tf.data), "after" what `imgcls train` runs: fusion on, and the pp's final value_range moved
into the train or eval step (config.value_range_on_device), so tf.data batches uint8.

Per-core figures: img/s divided by the cores tf.data may use (--threads, else the CPUs this
process may run on), and images per CPU-second the process spent (less sensitive to other
work on a shared machine). Only ratios from one run mean much on a busy machine; runs
alternate before/after so drift hits both.

measure(pp, ...) times one pipeline; compare(...) runs the interleaved table that main()
prints (scripts/benchmark.py --pipeline calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time
from typing import Any, Iterator

import numpy as np

import bench_util  # scripts/, beside this file

TRAIN_PP = 'decode(3)|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(10)'
EVAL_PP = 'decode(3)|resize_small(256)|central_crop(224)|value_range(-1, 1)|onehot(10)'
CLASSES = 10
FUSE_ENV = 'IMGCLS_PP_FUSE'  # = imgcls.data.preprocess.FUSE_ENV (read there, not imported:
                             # importing it would load imgcls.data, TensorFlow, at import)


def default_cache_dir() -> str:
  return os.path.join(tempfile.gettempdir(), 'imgcls_bench_pipeline')


def _image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """Photo-like uint8 [h, w, 3]: smooth colour fields at four scales (from a quarter of the
  image to 2 pixels) plus grain; about 110 KB as a 500x375 JPEG at quality 90, ImageNet's
  mean file size (decoding time follows the compressed size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.zeros((height, width, 3), np.float32)
  for cells, amplitude in ((4, 70.0), (16, 35.0), (64, 20.0), (width // 2, 30.0)):
    grid = rng.uniform(-1, 1, (max(2, height * cells // width), cells, 3)).astype(np.float32)
    layer = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC)
    out += (np.asarray(layer, np.float32) / 127.5 - 1) * amplitude
  out += 128 + rng.normal(0, 16, out.shape)
  return np.clip(out, 0, 255).astype(np.uint8)


def write_jpegs(n_images: int, size: tuple[int, int] = (500, 375),
                cache_dir: str | None = None) -> pathlib.Path:
  """root/train/classK/*.jpg (n_images, size = (width, height)), written once per arguments."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = size
  root = pathlib.Path(cache_dir or default_cache_dir()) / f'jpegs_{n_images}_{width}x{height}'
  if root.exists():
    return root
  root.parent.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=f'{root.name}.', dir=root.parent))
  rng = np.random.default_rng(0)
  for i in range(n_images):
    folder = scratch / 'train' / f'class{i % CLASSES}'
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(rng, width, height)).save(folder / f'{i:05d}.jpg', quality=90)
  try:
    scratch.rename(root)  # Whole or not at all, even beside another run writing the same.
  except OSError:  # Another run got there first: its images are the same.
    shutil.rmtree(scratch, ignore_errors=True)
  return root


def _mean_kb(root: pathlib.Path) -> float:
  sizes = [p.stat().st_size for p in root.glob('train/*/*.jpg')]
  return sum(sizes) / max(1, len(sizes)) / 1024


def _cores(threads: int | None) -> int:
  if threads:
    return threads
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _batches(pp: str, mode: str, root: pathlib.Path, data_dir: str, batch_size: int,
             threads: int | None) -> Iterator[Any]:
  """Endless batches of the image folder through the project's train or eval pipeline."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from imgcls import data  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # The first call prepares the folder: no bars in the table.
  builder = data.get_builder(f'folder:{root}', data_dir)
  kwargs = dict(split='train', pp=pp, global_batch_size=batch_size, process_index=0,
                process_count=1, **({'threads': threads} if threads else {}))
  if mode == 'train':
    yield from data.train_iterator(builder, seed=0, **kwargs)
  elif mode == 'eval':
    passes = data.eval_data(builder, **kwargs)
    while True:
      yield from passes
  else:
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")


def measure(pp: str = TRAIN_PP, *, n_images: int = 512, size: tuple[int, int] = (500, 375),
            threads: int | None = None, seconds: float = 10.0, fuse: bool = True,
            mode: str = 'train', batch_size: int = 64, warmup_s: float = 2.0,
            cache_dir: str | None = None) -> dict[str, Any]:
  """Images/s of one pipeline over `seconds` (after `warmup_s`), and per core.

  pp: the pp string (label ops included, as a config writes it). size: (width, height) of
  the generated JPEGs. threads: tf.data's private thread pool size (None: TF's default, one
  per core). fuse: pp fusion on (after) or off (before). mode: 'train' (train_iterator) or
  'eval' (eval_data, passes repeated).
  """
  root = write_jpegs(n_images, size, cache_dir)
  data_dir = str(pathlib.Path(cache_dir or default_cache_dir()) / 'tfds')
  # The pp function is built (and reads FUSE_ENV) on the first next().
  with bench_util.env_var(FUSE_ENV, '1' if fuse else '0'):
    batches = _batches(pp, mode, root, data_dir, batch_size, threads)
    next(batches)
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_s:  # Lets tf.data's autotuner settle.
    next(batches)
  images, cpu0, t0 = 0, time.process_time(), time.perf_counter()
  while True:
    images += len(next(batches)['image'])
    elapsed = time.perf_counter() - t0
    if elapsed >= seconds:
      break
  cpu_s = time.process_time() - cpu0
  batches.close()
  cores = _cores(threads)
  rate = images / elapsed
  return {'pp': pp, 'mode': mode, 'fuse': fuse, 'threads': threads, 'cores': cores,
          'batch_size': batch_size, 'n_images': n_images, 'jpeg_size': list(size),
          'mean_kb': round(_mean_kb(root), 1), 'images': images, 'seconds': round(elapsed, 2),
          'img_per_s': round(rate, 1), 'img_per_s_per_core': round(rate / cores, 1),
          'cpu_s': round(cpu_s, 2), 'img_per_cpu_s': round(images / max(cpu_s, 1e-9), 1)}


def compare(smoke: bool = False, *, repeats: int = 3, seconds: float = 10.0,
            n_images: int = 512, threads: int | None = None, cache_dir: str | None = None,
            verbose: bool = True) -> dict[str, Any]:
  """Before and after, A B A B, for the train and the eval pp string.

  Train: before = the pp string as written, fusion off (decode the whole JPEG, value_range
  in tf.data); 'fused' = fusion on; after = what `imgcls train` runs, fusion on and the
  final value_range moved into the train step (config.value_range_on_device: uint8 batches,
  preprocess.split_value_range). Eval: before = the pp string as written, fusion off; after =
  what the evaluators run, the final value_range moved to the eval step (uint8 batches;
  the eval pp has no crop after decode to fuse).
  Returns every run and, per pp, the median img/s per core of each variant and the ratio
  after / before. smoke: one round of 0.5 s runs on 32 small images (seconds; for tests).
  """
  from imgcls.data import preprocess  # noqa: PLC0415  (no TensorFlow)
  kwargs: dict[str, Any] = dict(seconds=seconds, n_images=n_images, threads=threads,
                                cache_dir=cache_dir)
  if smoke:
    repeats = 1
    kwargs.update(seconds=0.5, n_images=32, size=(160, 120), batch_size=8, warmup_s=0.2)
  train_pp, eval_pp = TRAIN_PP, EVAL_PP
  if smoke:
    train_pp = TRAIN_PP.replace('224', '64')
    eval_pp = EVAL_PP.replace('256', '72').replace('224', '64')
  variants = {
      'train': [('before', False, train_pp), ('fused', True, train_pp),
                ('after', True, preprocess.split_value_range(train_pp)[0])],
      'eval': [('before', False, eval_pp),
               ('after', True, preprocess.split_value_range(eval_pp)[0])]}
  runs = []
  if verbose:
    print(f'{"pipeline":6s} {"variant":7s} {"img/s":>8s} {"img/s/core":>10s} '
          f'{"img/cpu-s":>9s} {"cores":>5s}  pp (fusion)')
  for r in range(repeats):
    for mode in ('train', 'eval'):
      for variant, fuse, pp in variants[mode]:
        run = dict(measure(pp, fuse=fuse, mode=mode, **kwargs), round=r, variant=variant)
        runs.append(run)
        if verbose:
          print(f'{mode:6s} {variant:7s} {run["img_per_s"]:8.1f} '
                f'{run["img_per_s_per_core"]:10.1f} {run["img_per_cpu_s"]:9.1f} '
                f'{run["cores"]:5d}  {pp} ({"on" if fuse else "off"})', flush=True)
  summary = {}
  for mode in ('train', 'eval'):
    def median(variant, key, mode=mode):
      return round(statistics.median(
          x[key] for x in runs if x['mode'] == mode and x['variant'] == variant), 1)
    s = summary[mode] = {'pp': train_pp if mode == 'train' else eval_pp,
                         'after_pp': variants[mode][-1][2]}
    for variant, _, _ in variants[mode]:
      s[f'{variant}_img_per_s_per_core'] = median(variant, 'img_per_s_per_core')
      s[f'{variant}_img_per_cpu_s'] = median(variant, 'img_per_cpu_s')
    s['ratio'] = round(s['after_img_per_s_per_core'] / s['before_img_per_s_per_core'], 3)
    s['ratio_cpu_s'] = round(s['after_img_per_cpu_s'] / s['before_img_per_cpu_s'], 3)
    if verbose:
      fused = (f' (fusion alone {s["fused_img_per_s_per_core"]:.1f})'
               if 'fused_img_per_s_per_core' in s else '')
      print(f'{mode}: {s["before_img_per_s_per_core"]:.1f} -> '
            f'{s["after_img_per_s_per_core"]:.1f} img/s per core (x{s["ratio"]:.2f}){fused}; '
            f'{s["before_img_per_cpu_s"]:.1f} -> {s["after_img_per_cpu_s"]:.1f} img per '
            f'CPU-s (x{s["ratio_cpu_s"]:.2f})  [{s["pp"]} -> {s["after_pp"]}]')
  return {'cpu': bench_util.cpu_model_name(), 'runs': runs, 'summary': summary}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='tiny and fast (a few seconds)')
  parser.add_argument('--repeats', type=int, default=3, help='before/after rounds')
  parser.add_argument('--seconds', type=float, default=10.0, help='timed seconds per run')
  parser.add_argument('--n_images', type=int, default=512)
  parser.add_argument('--threads', type=int, default=None,
                      help="tf.data's private thread pool (default: one per core)")
  parser.add_argument('--cache_dir', default=None, help=f'default {default_cache_dir()}')
  parser.add_argument('--json', default=None, help='also write the report here')
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  print(f'CPU: {bench_util.cpu_model_name()}, {_cores(args.threads)} core(s) for tf.data')
  report = compare(args.smoke, repeats=args.repeats, seconds=args.seconds,
                   n_images=args.n_images, threads=args.threads, cache_dir=args.cache_dir)
  text = json.dumps(report, indent=1)
  print(text)
  if args.json:
    pathlib.Path(args.json).write_text(text)


if __name__ == '__main__':
  main()
