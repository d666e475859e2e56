"""The TFDS builder of the offline multi-label demo dataset `fashion_mnist_mosaic`.

Defining the builder imports TensorFlow, so the dataset's source (mosaic.py, which config
validation imports) loads this module only when the dataset is built or prepared.

`fashion_mnist_mosaic` shows 2x2 mosaics of Fashion-MNIST items (56x56x1 uint8) and labels
each with the SET of classes it shows. Its features follow TFDS's own multi-label datasets
(voc, coco): 'image' (PNG) and 'labels', a Sequence of ClassLabel (Fashion-MNIST's 10
names) holding the sorted distinct class ids; there is no 'label'. Train mosaics come from
the prepared `fashion_mnist` train split, test mosaics from its test split, so no test item
is ever seen in training.

Each tile (row-major: top-left, top-right, bottom-left, bottom-right) is blank (zeros, the
Fashion-MNIST background) with probability `empty_prob`, else an item drawn uniformly, with
replacement, from the source split; when all four come out blank, one tile at random holds
an item, so every mosaic shows 1-4 items. The draws come from numpy's generator seeded by
(seed, split), so the same config gives the same mosaics anywhere, and 'small' holds the
first mosaics of 'default' (see `tile_plan`).
Fashion-MNIST's classes are balanced, so with the default empty_prob=0.25 the number of
labels per mosaic is 1: 7.6%, 2: 32.4%, 3: 44.0%, 4: 16.0% (mean 2.68), and every class is
in about 27% of the mosaics.

Configs: 'default' (60,000 train / 10,000 test) and 'small' (6,000 / 1,000); other sizes
through `prepare(config=MosaicConfig(name=..., num_train=...))`. Preparation needs no
network when `fashion_mnist` can be prepared offline (imgcls/data/fashion_mnist.py), which
prepare() does first.

Its labels become a vector with the `multihot` pp op (ops_label.py). A config for it:
dataset.name = 'fashion_mnist_mosaic', dataset.num_classes = 10,
pp_train = 'decode|flip_lr|value_range(-1, 1)|multihot(10)',
pp_eval = 'decode|value_range(-1, 1)|multihot(10)' (flips and shifts keep the label set).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from imgcls.data import fashion_mnist
from imgcls.data.base import DataError, default_data_dir

GRID = 2  # Tiles per side.
TILE = 28  # Fashion-MNIST's image side.
SPLITS = ('train', 'test')  # Each built from the fashion_mnist split of the same name.
# TFDS's fashion_mnist label names, in id order; checked against the source when preparing.
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
_CHUNK = 1000  # Mosaics composed at once (bounds memory: 4 tiles each).


@dataclasses.dataclass(eq=False)
class MosaicConfig(tfds.core.BuilderConfig):
  """Sizes and draws of a mosaic dataset; each config is prepared into its own folder."""
  num_train: int = 60_000
  num_test: int = 10_000
  empty_prob: float = 0.25
  seed: int = 0

  def check(self) -> None:
    if self.num_train < 1 or self.num_test < 1:
      raise DataError(f'Mosaic config {self.name!r}: num_train and num_test must be >= 1, got '
                      f'{self.num_train} and {self.num_test}.')
    if not 0 <= self.empty_prob < 1:
      raise DataError(f'Mosaic config {self.name!r}: empty_prob must be in [0, 1), got '
                      f'{self.empty_prob}.')


def tile_plan(num: int, num_source: int, *, empty_prob: float, seed: int,
              split: str) -> np.ndarray:
  """Which source item fills each tile: int64 [num, 4] (row-major tiles), -1 for blank.

  Row i depends only on (seed, split, i), not on num: a smaller config with the same seed
  holds the first mosaics of a larger one.
  """
  tiles = GRID * GRID
  # One row of uniforms per mosaic: item choices, blank draws, the tile kept if all are blank.
  u = np.random.default_rng([seed, SPLITS.index(split)]).random((num, 2 * tiles + 1))
  plan = np.minimum((u[:, :tiles] * num_source).astype(np.int64), num_source - 1)
  blank = u[:, tiles:2 * tiles] < empty_prob
  keep = np.minimum((u[:, -1] * tiles).astype(np.int64), tiles - 1)
  all_blank = blank.all(axis=1)
  blank[all_blank, keep[all_blank]] = False
  return np.where(blank, -1, plan)


def compose(images: np.ndarray, plan: np.ndarray) -> np.ndarray:
  """Source images [N, h, w, c] and a plan [n, 4] -> mosaics [n, 2h, 2w, c], blanks zero."""
  tiles = np.where((plan >= 0)[..., None, None, None], images[np.maximum(plan, 0)], 0)
  n, _, h, w, c = tiles.shape
  grid = tiles.reshape(n, GRID, GRID, h, w, c).transpose(0, 1, 3, 2, 4, 5)
  return grid.reshape(n, GRID * h, GRID * w, c).astype(images.dtype)


class FashionMnistMosaic(tfds.core.GeneratorBasedBuilder):
  """2x2 Fashion-MNIST mosaics labelled with the set of classes shown (see module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      MosaicConfig(name='default', description='60,000 train / 10,000 test mosaics.'),
      MosaicConfig(name='small', num_train=6_000, num_test=1_000,
                   description='6,000 train / 1,000 test mosaics.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=('2x2 mosaics of Fashion-MNIST items; labels = the set of classes shown '
                     f'(tiles blank with probability {c.empty_prob}, at least one item).'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(GRID * TILE, GRID * TILE, 1)),
            'labels': tfds.features.Sequence(tfds.features.ClassLabel(names=CLASS_NAMES)),
        }),
        supervised_keys=('image', 'labels'),
        # A custom config read back from files has only its name: keep how it was drawn.
        metadata=tfds.core.MetadataDict(num_train=c.num_train, num_test=c.num_test,
                                        empty_prob=c.empty_prob, seed=c.seed))

  def _split_generators(self, dl_manager):
    del dl_manager
    self.builder_config.check()
    root = str(self.data_dir_root)
    fashion_mnist.prepare(root)  # Nothing to do when prepare() below already did it.
    source = tfds.builder(fashion_mnist.NAME, data_dir=root)
    names = tuple(source.info.features['label'].names)
    if names != CLASS_NAMES:
      raise DataError(f'{source.data_dir} has classes {names}, not Fashion-MNIST\'s '
                      f'{CLASS_NAMES}: delete it and prepare fashion_mnist again.')
    sizes = {'train': self.builder_config.num_train, 'test': self.builder_config.num_test}
    return {split: self._generate_examples(source, split, sizes[split]) for split in SPLITS}

  def _generate_examples(self, source: tfds.core.DatasetBuilder, split: str,
                         num: int) -> Iterator:
    data = tfds.as_numpy(source.as_dataset(split=split, batch_size=-1))
    images, labels = data['image'], data['label']
    if not len(images):
      raise DataError(f'Split {split!r} of {source.data_dir} is empty: prepare fashion_mnist '
                      'again.')
    c = self.builder_config
    plan = tile_plan(num, len(images), empty_prob=c.empty_prob, seed=c.seed, split=split)
    for start in range(0, num, _CHUNK):
      part = plan[start:start + _CHUNK]
      for i, (image, row) in enumerate(zip(compose(images, part), part), start):
        yield i, {'image': image, 'labels': sorted(set(labels[row[row >= 0]].tolist()))}


def prepare(data_dir: str | None = None, manual_dir: str | None = None,
            config: str | MosaicConfig = 'default') -> tfds.core.DatasetBuilder:
  """Prepares fashion_mnist (offline if need be, from manual_dir if given), then the mosaics.

  Returns the prepared builder; a config already prepared in data_dir is left as it is.
  """
  data_dir = default_data_dir(data_dir)
  try:
    builder = FashionMnistMosaic(data_dir=data_dir, config=config)
  except ValueError as e:  # Unknown config name, or a custom config named like a built-in.
    raise DataError(f'Bad {FashionMnistMosaic.name} config {config!r}: {e}. Built-in configs: '
                    f'{", ".join(FashionMnistMosaic.builder_configs)}.') from None
  if builder.is_prepared():
    return builder
  builder.builder_config.check()
  fashion_mnist.prepare(data_dir, manual_dir=manual_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
