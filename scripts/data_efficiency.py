"""How much labelled data do I need? Fine-tuning vs training from scratch, k images per class.

  uv run python scripts/data_efficiency.py --out=workdirs/data_efficiency

Source task: Fashion-MNIST classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), all their
30,000 training images; a ResNet is pretrained on it. Target task: classes 5-9 (Sandal, Shirt,
Sneaker, Bag, Ankle boot), relabelled 0-4. For each k in --ks, each seed draws k labelled
training images per class (one seed's draws are nested: its 10 are among its 30), and two runs
train on them with the same recipe, learning rate and step budget: one fine-tuned from the
pretrained checkpoint (`model_init`; the head starts fresh), one from scratch. Every run is
scored on all 5,000 test images of the target classes.

Everything goes through the ordinary features: the subsets are exported from the prepared TFDS
dataset (prepared offline if missing) into image folders OUT/images/NAME/{train,test}/CLASS/*.png
and trained with `dataset.name='folder:...'` configs by `imgcls.train.train_and_evaluate`, one
workdir per run under OUT/runs/. Rerunning skips finished runs (and resumes an interrupted one),
so more --ks or --seeds can be added later; another budget (steps, lr, ...) needs a new --out.

Writes OUT/results.md, OUT/results.csv (k, method, mean/std test top-1 over seeds, seeds, mean
wall time per run), OUT/runs.csv (every run) and OUT/accuracy_vs_k.png; prints the table.

Budget: 2 seeds x 5 ks x 2 methods = 20 runs of 300 steps at batch 128 after 3 epochs of
pretraining (timings and results: /work/notes/moved_measurements_C.md, then docs/).
`--quick` (1 seed, k=10 and all, 20 steps, 0.2 pretraining epochs) checks the whole pipeline in
a few minutes; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from imgcls import config as config_lib, data, train

METHODS = ('finetune', 'scratch')
# name: (model config, optimizer, base learning rate, weight decay). Both methods use the same
# learning rate by default: lower fine-tuning rates scored lower (see docs/).
MODELS = {
    # The ResNet-18 of configs/default.py.
    'resnet': ({'name': 'resnet18', 'width': 16, 'stem': 'small_s2'}, 'sgd', 0.1, 5e-4),
    # A small ViT, 4x4 patches.
    'vit': ({'name': 'vit', 'width': 64, 'depth': 4, 'mlp_dim': 128, 'num_heads': 2,
             'patch_size': 4}, 'adamw', 1e-3, 0.05),
}
# What a finished run depends on, apart from k, seed and method: stored in OUT/settings.json.
BUDGET_KEYS = ('dataset', 'source_classes', 'target_classes', 'model', 'pretrain_epochs',
               'steps', 'batch', 'lr_scratch', 'lr_finetune')


class ExperimentError(ValueError):
  """Settings that cannot run; the message says what to change."""


@dataclasses.dataclass
class Settings:
  out: str
  ks: Sequence[int | str] = (10, 30, 100, 300, 'all')
  seeds: int = 2
  model: str = 'resnet'
  pretrain_epochs: float = 3.0
  steps: int = 300
  batch: int = 128
  dataset: str = 'fashion_mnist'
  data_dir: str | None = None
  source_classes: Sequence[int] = (0, 1, 2, 3, 4)
  target_classes: Sequence[int] = (5, 6, 7, 8, 9)
  lr_scratch: float | None = None  # None: the model's in MODELS
  lr_finetune: float | None = None  # None: lr_scratch

  def __post_init__(self):
    if self.model not in MODELS:
      raise ExperimentError(f'--model {self.model!r}: expected one of {", ".join(MODELS)}.')
    if self.lr_scratch is None:
      self.lr_scratch = MODELS[self.model][2]
    if self.lr_finetune is None:
      self.lr_finetune = self.lr_scratch

  def budget(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: list(d[k]) if isinstance(d[k], (list, tuple)) else d[k] for k in BUDGET_KEYS}


def parse_ks(values: Sequence[str]) -> list[int | str]:
  """['10', 'all'] -> [10, 'all'], sorted, checked."""
  out = []
  for v in values:
    v = str(v).strip().lower()
    if v == 'all':
      out.append('all')
    elif v.isdigit() and int(v) > 0:
      out.append(int(v))
    else:
      raise ExperimentError(f'--ks: {v!r} is neither a positive number of images per class '
                            'nor "all" (e.g. --ks=10,30,100,all).')
  return sorted(set(out), key=lambda k: (k == 'all', k if k != 'all' else 0))


# ---------------------------------------------------------------- data


def load_split(dataset: str, data_dir: str | None, split: str):
  """(uint8 images [N, H, W, C], int labels [N], class names) of a prepared TFDS split."""
  builder = data.get_builder(dataset, data_dir)  # prepares Fashion-MNIST offline if missing
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  names = list(builder.info.features['label'].names)
  return arrays['image'], arrays['label'].astype(np.int64), names


def select_classes(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(indices of the examples of `classes`, their labels renumbered 0..len(classes)-1)."""
  relabel = {c: i for i, c in enumerate(classes)}
  idx = np.flatnonzero(np.isin(labels, list(classes)))
  return idx, np.array([relabel[int(l)] for l in labels[idx]], np.int64)


def draw_per_class(labels: np.ndarray, k: int | str, seed: int) -> np.ndarray:
  """Sorted positions of k examples per class ('all': every one).

  Each class is permuted by a generator seeded with (seed, class) and its first k are taken,
  so one seed's draws are nested across k (its 10 images are among its 30).
  """
  if k == 'all':
    return np.arange(len(labels))
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if k > len(members):
      raise ExperimentError(f'k={k} images per class, but target class {c} has only '
                            f'{len(members)} training images: lower --ks.')
    picked.append(np.random.default_rng([seed, int(c)]).permutation(members)[:k])
  return np.sort(np.concatenate(picked))


def class_folders(names: Sequence[str]) -> list[str]:
  """Folder names that sort in label order: '0_t_shirt_top', '1_trouser', ..."""
  width = len(str(len(names) - 1))
  return [f'{i:0{width}d}_' + (re.sub(r'[^a-z0-9]+', '_', n.lower()).strip('_') or 'class')
          for i, n in enumerate(names)]


def write_images(folder: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                 classes: Sequence[str]) -> None:
  """folder/CLASS/ID.png, written to a temporary folder and renamed: complete or absent.

  RGB PNGs: imgcls's folder reader keeps RGB PNG bytes as they are (grayscale ones it would
  re-encode); the pp string's decode(1) turns them back into one channel.
  """
  if os.path.isdir(folder):
    return
  tmp = folder + '.tmp'
  for name in classes:
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
  for image, label, i in zip(images, labels, ids):
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    Image.fromarray(rgb).save(os.path.join(tmp, classes[label], f'{int(i):05d}.png'))
  os.rename(tmp, folder)


def _link(target: str, link: str) -> None:
  """link -> target (a symlink; a copy where symlinks are not allowed)."""
  if os.path.lexists(link):
    return
  try:
    os.symlink(os.path.relpath(target, os.path.dirname(link)), link, target_is_directory=True)
  except OSError:
    shutil.copytree(target, link)


def export_folders(s: Settings) -> dict[str, Any]:
  """Writes the source folder and one target folder per (k, seed); returns their roots."""
  images_dir = os.path.join(s.out, 'images')
  train_x, train_y, names = load_split(s.dataset, s.data_dir, 'train')
  test_x, test_y, _ = load_split(s.dataset, s.data_dir, 'test')
  for c in (*s.source_classes, *s.target_classes):
    if not 0 <= c < len(names):
      raise ExperimentError(f'class {c} is not a label of {s.dataset} (0..{len(names) - 1}).')
  if set(s.source_classes) & set(s.target_classes):
    raise ExperimentError('--source_classes and --target_classes overlap: the target task '
                          'must be new to the pretrained model.')
  roots = {'size': int(train_x.shape[1])}

  source = os.path.join(images_dir, 'source')
  src_names = class_folders([names[c] for c in s.source_classes])
  for split, x, y in (('train', train_x, train_y), ('test', test_x, test_y)):
    idx, labels = select_classes(y, s.source_classes)
    write_images(os.path.join(source, split), x[idx], labels, idx, src_names)
    if split == 'train':
      roots['source_train'] = len(idx)
  roots['source'] = source

  tgt_names = class_folders([names[c] for c in s.target_classes])
  test_idx, test_labels = select_classes(test_y, s.target_classes)
  target_test = os.path.join(images_dir, 'target_test')
  write_images(target_test, test_x[test_idx], test_labels, test_idx, tgt_names)
  train_idx, train_labels = select_classes(train_y, s.target_classes)
  for k in s.ks:
    for seed in range(s.seeds):
      name = 'target_all' if k == 'all' else f'target_k{k}_seed{seed}'
      root = os.path.join(images_dir, name)
      pick = draw_per_class(train_labels, k, seed)
      write_images(os.path.join(root, 'train'), train_x[train_idx[pick]], train_labels[pick],
                   train_idx[pick], tgt_names)
      _link(target_test, os.path.join(root, 'test'))  # one copy of the 5,000 test images
      roots[(k, seed)] = root
  return roots


# ---------------------------------------------------------------- runs


def make_config(s: Settings, root: str, size: int, num_classes: int, *, steps: int, lr: float,
                seed: int = 0, model_init: str = '', eval_every: int = 0):
  """One run's config: the folder at `root`, grayscale, crops and flips, warmup + cosine."""
  model, optimizer, _, weight_decay = MODELS[s.model]
  n = num_classes
  c = config_lib.defaults()
  c.seed = seed
  c.dataset.name = f'folder:{os.path.abspath(root)}'
  c.dataset.data_dir = os.path.abspath(os.path.join(s.out, 'tfds'))
  c.dataset.num_classes = n
  c.dataset.eval_split = 'test'
  c.pp_train = (f'decode(1)|random_crop({size}, pad={max(1, size // 14)})|flip_lr|'
                f'value_range(-1, 1)|onehot({n})')
  c.pp_eval = f'decode(1)|value_range(-1, 1)|onehot({n})'
  c.model.update(model)
  c.model_init = model_init
  # The source head scores the source classes: the target runs start with a fresh one.
  c.model_load.ignore = r'^params/head/' if model_init else ''
  c.batch_size = s.batch
  c.eval_batch_size = 512
  c.total_steps = steps
  c.optimizer.name = optimizer
  c.lr.base = lr
  c.lr.warmup_steps = max(1, steps // 10)
  c.weight_decay = weight_decay
  c.label_smoothing = 0.1
  c.log_every_steps = min(50, steps)
  c.eval_every_steps = min(eval_every, steps) or steps  # target runs: once, at the end
  return config_lib.validate(c)


def _run(config, workdir: str, what: dict[str, Any]) -> dict[str, Any]:
  """Trains (or resumes) unless WORKDIR/result.json says it finished; returns the result."""
  path = os.path.join(workdir, 'result.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  if not result:  # preempted: it saved a checkpoint, a rerun resumes
    raise ExperimentError(f'{workdir} was interrupted; rerun the same command to resume.')
  out = {**what, 'top1': float(result['top1']), 'loss': float(result['loss']),
         'examples': int(result['examples']), 'wall_s': time.perf_counter() - start}
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(path + '.tmp', path)
  return out


def _check_settings(s: Settings) -> None:
  """A finished run is reused only by the same budget: anything else needs a new --out."""
  os.makedirs(s.out, exist_ok=True)
  path = os.path.join(s.out, 'settings.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != s.budget():
      diff = {k: (old.get(k), v) for k, v in s.budget().items() if old.get(k) != v}
      raise ExperimentError(f'{s.out} holds runs made with other settings {diff} (old, new): '
                            'pass a new --out, or the settings it was made with.')
  else:
    with open(path, 'w') as f:
      json.dump(s.budget(), f, indent=2)


def run_experiment(s: Settings) -> list[dict[str, Any]]:
  """Pretrains, then runs every (k, seed, method); returns one record per target run."""
  if s.seeds < 1 or s.steps < 1 or s.pretrain_epochs <= 0:
    raise ExperimentError('--seeds and --steps must be >= 1 and --pretrain_epochs > 0.')
  _check_settings(s)
  roots = export_folders(s)
  size, n_source = roots['size'], roots['source_train']
  epoch = max(1, n_source // s.batch)
  pretrain_dir = os.path.abspath(os.path.join(s.out, 'runs', 'pretrain'))
  config = make_config(s, roots['source'], size, len(s.source_classes), lr=s.lr_scratch,
                       steps=max(1, round(s.pretrain_epochs * epoch)), eval_every=epoch)
  pre = _run(config, pretrain_dir, {'k': 'source', 'method': 'pretrain', 'seed': 0})
  print(f'pretrained on classes {list(s.source_classes)}: source test top-1 {pre["top1"]:.4f} '
        f'({pre["wall_s"]:.0f} s)', flush=True)
  records = []
  for k in s.ks:
    for seed in range(s.seeds):
      for method in METHODS:
        init = pretrain_dir if method == 'finetune' else ''
        lr = s.lr_finetune if method == 'finetune' else s.lr_scratch
        config = make_config(s, roots[(k, seed)], size, len(s.target_classes), steps=s.steps,
                             lr=lr, seed=seed, model_init=init)
        workdir = os.path.abspath(os.path.join(s.out, 'runs', f'k{k}', f'{method}_seed{seed}'))
        r = _run(config, workdir, {'k': k, 'method': method, 'seed': seed})
        records.append(r)
        print(f'k={k} {method} seed {seed}: test top-1 {r["top1"]:.4f} ({r["wall_s"]:.0f} s)',
              flush=True)
  return records


# ---------------------------------------------------------------- results

COLUMNS = ('k', 'method', 'top1_mean', 'top1_std', 'seeds', 'wall_s_per_run')


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (k, method), in the order first seen: mean and std (n-1) over seeds."""
  groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r['k'], r['method']), []).append(r)
  rows = []
  for (k, method), runs in groups.items():
    top1 = [r['top1'] for r in runs]
    rows.append({'k': k, 'method': method, 'top1_mean': statistics.fmean(top1),
                 'top1_std': statistics.stdev(top1) if len(top1) > 1 else None,
                 'seeds': len(runs),
                 'wall_s_per_run': statistics.fmean(r['wall_s'] for r in runs)})
  return rows


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(columns)
  w.writerows([['' if r[c] is None else r[c] for c in columns] for r in rows])
  return buf.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], per_class: dict[Any, int]) -> str:
  def pct(v):
    return '' if v is None else f'{100 * v:.2f}'
  lines = ['| images per class | method | test top-1 (%) | std | seeds | wall time per run |',
           '|---:|---|---:|---:|---:|---:|']
  for r in rows:
    k = f'all ({per_class["all"]})' if r['k'] == 'all' and 'all' in per_class else r['k']
    lines.append(f'| {k} | {r["method"]} | {pct(r["top1_mean"])} | {pct(r["top1_std"])} | '
                 f'{r["seeds"]} | {r["wall_s_per_run"]:.0f} s |')
  return '\n'.join(lines) + '\n'


def plot(rows: Sequence[dict[str, Any]], per_class: dict[Any, int], path: str,
         title: str = '') -> None:
  """Test top-1 against images per class (log x), one line per method, std as error bars."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(6, 4), layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for method in dict.fromkeys(r['method'] for r in rows):
    pts = sorted((per_class[r['k']], 100 * r['top1_mean'], 100 * (r['top1_std'] or 0.0))
                 for r in rows if r['method'] == method)
    x, y, err = zip(*pts)
    ax.errorbar(x, y, yerr=err, marker='o', capsize=3, label=method)
  ax.set_xscale('log')
  ax.set_xlabel('labelled training images per class')
  ax.set_ylabel('test top-1 (%)')
  ax.grid(alpha=0.3, which='both')
  ax.set_title(title, fontsize='medium')
  ax.legend()
  fig.savefig(path, dpi=100)


def write_results(out: str, records: Sequence[dict[str, Any]], all_per_class: int,
                  title: str = '') -> str:
  """results.{md,csv}, runs.csv and accuracy_vs_k.png in `out`; returns the Markdown."""
  rows = summarize(records)
  per_class = {r['k']: r['k'] for r in rows if r['k'] != 'all'}
  per_class['all'] = all_per_class
  markdown = to_markdown(rows, per_class)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown)
  with open(os.path.join(out, 'results.csv'), 'w') as f:
    f.write(to_csv(rows))
  with open(os.path.join(out, 'runs.csv'), 'w') as f:
    f.write(to_csv(records, ('k', 'method', 'seed', 'top1', 'loss', 'examples', 'wall_s')))
  plot(rows, per_class, os.path.join(out, 'accuracy_vs_k.png'), title)
  return markdown


def smallest_class(root: str) -> int:
  """Images in the smallest class folder of root/train (the per-class count of k='all')."""
  train_dir = os.path.join(root, 'train')
  return min(len(os.listdir(os.path.join(train_dir, c))) for c in os.listdir(train_dir))


def parse_args(argv: Sequence[str] | None = None) -> Settings:
  """Command-line flags -> Settings (--quick swaps in the tiny budget)."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default=None,
                 help='output folder, resumable (default workdirs/data_efficiency[_quick])')
  p.add_argument('--ks', default='10,30,100,300,all',
                 help='labelled training images per target class; "all" for every one')
  p.add_argument('--seeds', type=int, default=2,
                 help='repeats (seeds 0..N-1): subset draw, init and batch order')
  p.add_argument('--model', choices=sorted(MODELS), default='resnet')
  p.add_argument('--pretrain_epochs', type=float, default=3.0, help='epochs on the source task')
  p.add_argument('--steps', type=int, default=300,
                 help='training steps of every target run (both methods)')
  p.add_argument('--batch', type=int, default=128, help='batch size of every run')
  p.add_argument('--lr_scratch', type=float, default=None,
                 help='base learning rate from scratch and of the pretraining (default: the '
                 "model's, see MODELS)")
  p.add_argument('--lr_finetune', type=float, default=None,
                 help='base learning rate when fine-tuning (default: --lr_scratch)')
  p.add_argument('--dataset', default='fashion_mnist', help='TFDS dataset to split in two')
  p.add_argument('--data_dir', default=None, help='TFDS data dir (default: TFDS default)')
  p.add_argument('--source_classes', default='0,1,2,3,4', help='labels of the source task')
  p.add_argument('--target_classes', default='5,6,7,8,9', help='labels of the target task')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: ks=10,all, 1 seed, 20 steps, 0.2 pretraining epochs')
  a = p.parse_args(argv)
  if a.quick:
    a.ks, a.seeds, a.steps, a.pretrain_epochs = '10,all', 1, 20, 0.2
  try:
    source, target = ([int(c) for c in v.split(',')] for v in (a.source_classes,
                                                                a.target_classes))
  except ValueError:
    p.error('--source_classes and --target_classes are comma-separated labels, e.g. 0,1,2')
  return Settings(
      out=a.out or 'workdirs/data_efficiency' + ('_quick' if a.quick else ''),
      ks=parse_ks(a.ks.split(',')), seeds=a.seeds, model=a.model,
      pretrain_epochs=a.pretrain_epochs, steps=a.steps, batch=a.batch, dataset=a.dataset,
      data_dir=a.data_dir, source_classes=source, target_classes=target,
      lr_scratch=a.lr_scratch, lr_finetune=a.lr_finetune)


def main(argv: Sequence[str] | None = None) -> str:
  s = parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # the per-run lines below are the progress report
  tfds.disable_progress_bar()
  start = time.perf_counter()
  records = run_experiment(s)
  all_root = os.path.join(s.out, 'images', 'target_all')
  title = (f'{s.dataset} {list(s.target_classes)} after {list(s.source_classes)}: {s.model}, '
           f'{s.steps} steps per run')
  markdown = write_results(s.out, records, smallest_class(all_root) if 'all' in s.ks else 0,
                           title)
  print(f'\n{markdown}')
  print(f'Wrote {s.out}/results.md, results.csv, runs.csv and accuracy_vs_k.png. Wall time '
        f'{(time.perf_counter() - start) / 60:.1f} min (finished runs are not rerun).')
  return markdown


if __name__ == '__main__':
  try:
    main()
  except ExperimentError as e:
    raise SystemExit(f'data_efficiency.py: {e}') from None
