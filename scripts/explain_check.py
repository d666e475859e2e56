"""Sanity checks of imgcls.evaluators.explain on 2x2 Fashion-MNIST mosaics (32x32: items
shrunk to 14 px and padded to 16), for a small ResNet and a small ViT trained multi-label as
configs/fashion_mnist_mosaic.py trains (sigmoid cross-entropy, value_range(-1, 1), flip_lr):

  pointing game   the map of each present class peaks in a quadrant holding that class
  randomisation   Spearman rank correlation of the maps of the trained and re-initialised model
                  (Adebayo et al. 2018)
  deletion        class-probability drop when the top 10% pixels by the map are set to black,
                  against a random 10%

tests/evaluators/test_explain.py trains both models as this script does (RESNET_TRAIN and
VIT_TRAIN mosaics, RESNET_STEPS and VIT_STEPS) and holds the figures on TEST_MOSAICS test mosaics; the script prints
them on more test mosaics and for several seeds (docs/reliability.md). The Debian Fashion-MNIST
(/usr/share/datasets/fashion-mnist) is used when installed, else synthetic squares
(imgcls/data/synthetic.py) stand in for the items.

  uv run python scripts/explain_check.py [--train=2000 --steps=300 --vit_train=8000
                                          --vit_steps=2000 --test=100 --seeds=0,1,2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imgcls import inference, models
from imgcls.data import fashion_mnist, mosaic_builder, synthetic
from imgcls.evaluators import explain as ex, reports

TILE = 16  # item size in the mosaic: 32x32 mosaics, whose 4x4 map grids split into quadrants
PP_EVAL = 'decode|value_range(-1, 1)|multihot(10)'
RESNET = {'name': 'resnet10', 'width': 8, 'stem': 'small', 'bn_axis_name': None}
VIT = {'name': 'vit', 'width': 48, 'depth': 2, 'num_heads': 3, 'mlp_dim': 96, 'patch_size': 8,
       'pool': 'gap', 'head_zero_init': False}
# The training set and lengths, the test's too: the ViT's class-specific maps point only as well
# as it has learnt the items (docs/reliability.md: the figures by training length and seed).
RESNET_TRAIN, RESNET_STEPS = 2000, 300  # mosaics (the first of VIT_TRAIN's), AdamW steps
VIT_TRAIN, VIT_STEPS = 8000, 2000
TEST_MOSAICS = 40  # the test's: about 100 (image, present class) pairs


# -------------------------------------------------------------------- data

def _idx(path: str, offset: int) -> np.ndarray:
  with gzip.open(path) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def items(split: str = 'train') -> tuple[np.ndarray, np.ndarray, str]:
  """(images uint8 [N, 16, 16, 1], labels [N], source name): Fashion-MNIST shrunk to 14 px
  (2x2 mean) and padded, or synthetic squares when the Debian files are not installed."""
  prefix = 'train' if split == 'train' else 't10k'
  path = os.path.join(fashion_mnist.DEBIAN_DIR, f'{prefix}-images-idx3-ubyte.gz')
  if os.path.exists(path):
    images = _idx(path, 16).reshape(-1, 28, 28).astype(np.float32)
    labels = _idx(path.replace('images-idx3', 'labels-idx1'), 8).astype(np.int64)
    small = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    padded = np.pad(small, ((0, 0), (1, 1), (1, 1)))
    return np.round(padded).astype(np.uint8)[..., None], labels, 'fashion_mnist'
  rng = np.random.default_rng(0 if split == 'train' else 1)
  sides = synthetic._sides(TILE, 4)  # pylint: disable=protected-access
  pairs = [e for _, e in synthetic._examples(2000, TILE, 1, sides, rng)]  # pylint: disable=protected-access
  return (np.stack([e['image'] for e in pairs]), np.array([e['label'] for e in pairs]),
          'synthetic_squares')


def mosaics(images: np.ndarray, labels: np.ndarray, n: int, seed: int, split: str):
  """(mosaics uint8 [n, 32, 32, 1], multi-hot [n, 10], class of each tile [n, 4] (-1 blank,
  row-major: top-left, top-right, bottom-left, bottom-right)), by the mosaic dataset's own
  tile_plan and compose."""
  plan = mosaic_builder.tile_plan(n, len(images), empty_prob=0.25, seed=seed, split=split)
  tiles = np.where(plan >= 0, labels[np.maximum(plan, 0)], -1)
  multihot = np.zeros((n, 10), np.float32)
  for c in range(10):
    multihot[:, c] = (tiles == c).any(axis=1)
  return mosaic_builder.compose(images, plan), multihot, tiles


# -------------------------------------------------------------------- model

def classifier(model_config: dict, variables, step: int = 0) -> inference.Classifier:
  config = {'model': dict(model_config), 'dataset': {'num_classes': 10}, 'pp_eval': PP_EVAL,
            'loss': 'sigmoid_xent'}
  return inference.Classifier(models.from_config(config), variables, config=config,
                              image_shape=(2 * TILE, 2 * TILE, 1),
                              label_names=[str(c) for c in range(10)], step=step)


def init(model_config: dict, seed: int):
  model = models.from_config({'model': dict(model_config), 'dataset': {'num_classes': 10}})
  return model.init(jax.random.key(seed), jnp.zeros((1, 2 * TILE, 2 * TILE, 1)), train=False)


def train(model_config: dict, images: np.ndarray, multihot: np.ndarray, steps: int,
          batch: int = 64, lr: float = 2e-3, seed: int = 0):
  """Variables after `steps` of AdamW on the sigmoid cross-entropy, random flip_lr."""
  model = models.from_config({'model': dict(model_config), 'dataset': {'num_classes': 10}})
  variables = init(model_config, seed)
  params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
  opt = tx.init(params)

  @jax.jit
  def step(params, rest, opt, x, y):
    def loss(p):
      if not rest:  # no batch statistics (ViT): nothing to update
        return optax.sigmoid_binary_cross_entropy(model.apply({'params': p}, x, train=True),
                                                  y).mean(), {}
      logits, new = model.apply({'params': p, **rest}, x, train=True, mutable=list(rest))
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), new
    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), dict(new), opt, value

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(len(images), size=batch)
    x = images[idx].astype(np.float32) / 127.5 - 1.0
    flip = rng.random(batch) < 0.5
    x[flip] = x[flip, :, ::-1]
    params, rest, opt, _ = step(params, rest, opt, x, multihot[idx])
  return {'params': params, **rest}


# ------------------------------------------------------------------ checks

def pairs(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image index, class) for each class present in each mosaic."""
  out = [(i, c) for i, row in enumerate(tiles) for c in sorted(set(row) - {-1})]
  return np.array([i for i, _ in out]), np.array([c for _, c in out])


def quadrant(saliency: np.ndarray) -> int:
  """Row-major quadrant (0..3) of the map's maximum."""
  h, w = saliency.shape
  r, c = np.unravel_index(np.argmax(saliency), saliency.shape)
  return 2 * int(r >= h // 2) + int(c >= w // 2)


def pointing_game(clf, images, tiles, method: str) -> float:
  """Fraction of (image, present class) pairs whose map peaks in a quadrant of that class.
  attention_rollout has no target class: one map serves every class of an image, so it scores
  at most (images / pairs), one hit per image."""
  index, classes = pairs(tiles)
  maps = ex.explain(clf, list(images[index]), method, target=list(classes))
  return float(np.mean([tiles[i, quadrant(m)] == c for i, c, m in zip(index, classes, maps)]))


def _ranks(a: np.ndarray) -> np.ndarray:
  """Ranks with ties averaged, as Spearman's rho needs."""
  order = np.argsort(a, kind='stable')
  ranks = np.empty(len(a), np.float64)
  ranks[order] = np.arange(len(a))
  values, inverse = np.unique(a, return_inverse=True)
  sums = np.bincount(inverse, ranks)
  return (sums / np.bincount(inverse))[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation of two maps; 0 when either is constant (it ranks nothing)."""
  ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
  return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def randomisation(clf, random_clf, images, tiles, method: str) -> float:
  """Mean Spearman correlation between the trained and the re-initialised model's maps."""
  index, classes = pairs(tiles)
  a = ex.explain(clf, list(images[index]), method, target=list(classes))
  b = ex.explain(random_clf, list(images[index]), method, target=list(classes))
  return float(np.mean([spearman(x, y) for x, y in zip(a, b)]))


def deletion(clf, images, tiles, method: str, frac: float = 0.1, seed: int = 0):
  """(mean probability drop, top `frac` pixels by the map set to black; the same for a random
  `frac`), over (image, present class) pairs."""
  index, classes = pairs(tiles)
  maps = ex.explain(clf, list(images[index]), method, target=list(classes))
  x = clf.preprocess(list(images[index]))
  black = clf.preprocess(np.zeros_like(images[0]))[0]
  k = int(round(frac * x.shape[1] * x.shape[2]))
  rng = np.random.default_rng(seed)
  top, rand = x.copy(), x.copy()
  for j, m in enumerate(maps):
    ranked = np.argsort(-m.ravel(), kind='stable')[:k]
    for chosen, out in ((ranked, top), (rng.permutation(m.size)[:k], rand)):
      r, c = np.unravel_index(chosen, m.shape)
      out[j, r, c] = black[r, c]
  rows = np.arange(len(index))
  p = clf.scores(x)[rows, classes]
  return (float(np.mean(p - clf.scores(top)[rows, classes])),
          float(np.mean(p - clf.scores(rand)[rows, classes])))


def figures(num_train: int = RESNET_TRAIN, steps: int = RESNET_STEPS, num_test: int = 200,
            vit_steps: int = VIT_STEPS, seeds: Sequence[int] = (0,),
            vit_train: int = VIT_TRAIN) -> dict:
  """Every check's figure for both models, as a dict: per training seed (lists) for the
  pointing game, also on the test's first TEST_MOSAICS mosaics (`*_pointing_test`); the other
  checks, and integrated gradients (slow), for the first seed."""
  train_items, train_labels, source = items('train')
  test_items, test_labels, _ = items('test')
  x, y, _ = mosaics(train_items, train_labels, max(num_train, vit_train), 0, 'train')
  xt, yt, tiles = mosaics(test_items, test_labels, num_test, 0, 'test')
  out = {'source': source, 'resnet_train': num_train, 'resnet_steps': steps,
         'vit_train': vit_train, 'vit_steps': vit_steps, 'test_mosaics': num_test, 'pairs': len(pairs(tiles)[0]),
         'seeds': list(seeds)}
  for name, config, m, n, methods in (
      ('resnet', RESNET, num_train, steps, ('gradcam', 'integrated_gradients')),
      ('vit', VIT, vit_train, vit_steps,
       ('grad_attention', 'attention_rollout', 'integrated_gradients'))):
    random_clf = classifier(config, init(config, seed=123))
    for k, seed in enumerate(seeds):
      start = time.time()
      clf = classifier(config, train(config, x[:m], y[:m], n, seed=seed))
      out.setdefault(f'{name}_train_s', []).append(round(time.time() - start, 1))
      scores = clf.scores(clf.preprocess(list(xt)))
      out.setdefault(f'{name}_map', []).append(float(np.nanmean(
          reports.average_precision(scores, yt))))
      for method in methods:
        key = f'{name}_{method}'
        if method == 'integrated_gradients' and k:
          continue
        out.setdefault(f'{key}_pointing', []).append(pointing_game(clf, xt, tiles, method))
        out.setdefault(f'{key}_pointing_test', []).append(pointing_game(
            clf, xt[:TEST_MOSAICS], tiles[:TEST_MOSAICS], method))
        if k == 0:
          out[f'{key}_spearman'] = randomisation(clf, random_clf, xt, tiles, method)
          out[f'{key}_deletion_top'], out[f'{key}_deletion_random'] = deletion(
              clf, xt, tiles, method)
  return out


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--train', type=int, default=RESNET_TRAIN)
  parser.add_argument('--vit_train', type=int, default=VIT_TRAIN)
  parser.add_argument('--steps', type=int, default=RESNET_STEPS)
  parser.add_argument('--vit_steps', type=int, default=VIT_STEPS)
  parser.add_argument('--test', type=int, default=200)
  parser.add_argument('--seeds', default='0', help='training seeds, comma-separated')
  args = parser.parse_args()
  seeds = [int(v) for v in args.seeds.split(',')]
  print(json.dumps(figures(args.train, args.steps, args.test, args.vit_steps, seeds,
                            args.vit_train), indent=1))
