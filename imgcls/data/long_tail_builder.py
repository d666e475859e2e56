"""The TFDS builder of `fashion_mnist_lt`: a long-tailed Fashion-MNIST train split, the
balanced test split as it is (Cao et al. 2019 / Menon et al. 2021's CIFAR-LT protocol).

Class c keeps n_c = floor(n_max * ratio ** (-c / (K - 1))) train images, n_max = 6,000 (all of
class 0, the head), ratio = n_0 / n_{K-1} (100: 60 images of class 9, the tail): the first n_c
of class c in fashion_mnist's file order, so the subset is the same everywhere. Each ratio is
its own config ('r100', 'r10', or `LongTailConfig(name=..., imbalance_ratio=...)`), prepared
offline from the prepared fashion_mnist (imgcls/data/fashion_mnist.py).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from imgcls.data import fashion_mnist
from imgcls.data.base import DataError, default_data_dir

SPLITS = ('train', 'test')


def class_counts(n_max: int, num_classes: int, ratio: float) -> np.ndarray:
  """[K] exponential profile n_c = floor(n_max * ratio ** (-c / (K - 1)))."""
  c = np.arange(num_classes)
  return np.floor(n_max * float(ratio) ** (-c / max(num_classes - 1, 1)) + 1e-9).astype(np.int64)


def config_name(ratio: float) -> str:
  """'r100' for ratio 100, 'r12.5' for 12.5."""
  return f'r{float(ratio):g}'


def subset(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Sorted indices of the first counts[c] examples of each class c, in file order."""
  keep = [np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]
  for c, (k, n) in enumerate(zip(keep, counts)):
    if len(k) < n:
      raise DataError(f'class {c} has {len(k)} train images, fewer than the {n} the profile '
                      'needs: prepare fashion_mnist again.')
  return np.sort(np.concatenate(keep))


@dataclasses.dataclass(eq=False)
class LongTailConfig(tfds.core.BuilderConfig):
  """The imbalance ratio n_max / n_min of the train split."""
  imbalance_ratio: float = 100.0

  def check(self) -> None:
    if not self.imbalance_ratio >= 1:
      raise DataError(f'fashion_mnist_lt: imbalance_ratio must be >= 1 (1: balanced), got '
                      f'{self.imbalance_ratio}.')


class FashionMnistLt(tfds.core.GeneratorBasedBuilder):
  """Long-tailed Fashion-MNIST (see module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [LongTailConfig(name='r100', imbalance_ratio=100.0,
                                    description='Imbalance ratio 100 (6,000 to 60 per class).'),
                     LongTailConfig(name='r10', imbalance_ratio=10.0,
                                    description='Imbalance ratio 10 (6,000 to 600 per class).')]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Fashion-MNIST, train split long-tailed with ratio {c.imbalance_ratio} '
                    '(exponential profile), test split balanced.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=fashion_mnist_names()),
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(imbalance_ratio=c.imbalance_ratio))

  def _split_generators(self, dl_manager):
    del dl_manager
    self.builder_config.check()
    root = str(self.data_dir_root)
    fashion_mnist.prepare(root)
    source = tfds.builder(fashion_mnist.NAME, data_dir=root)
    return {split: self._generate_examples(source, split) for split in SPLITS}

  def _generate_examples(self, source, split: str) -> Iterator:
    data = tfds.as_numpy(source.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    images, labels = data['image'], data['label']
    if split == 'train':
      num_classes = source.info.features['label'].num_classes
      n_max = int(np.bincount(labels, minlength=num_classes).max())
      keep = subset(labels, class_counts(n_max, num_classes,
                                         self.builder_config.imbalance_ratio))
    else:
      keep = np.arange(len(labels))
    for i in keep:
      yield int(i), {'image': images[i], 'label': int(labels[i])}


def fashion_mnist_names() -> tuple[str, ...]:
  from imgcls.data import mosaic_builder  # pylint: disable=g-import-not-at-top
  return mosaic_builder.CLASS_NAMES


def builder(data_dir: str | None, ratio: float) -> tfds.core.DatasetBuilder:
  """The (maybe unprepared) builder of ratio `ratio`: a built-in config or a new one."""
  name = config_name(ratio)
  config = name if name in FashionMnistLt.builder_configs else LongTailConfig(
      name=name, imbalance_ratio=float(ratio), description=f'Imbalance ratio {ratio:g}.')
  if not isinstance(config, str):
    config.check()
  return FashionMnistLt(data_dir=default_data_dir(data_dir), config=config)


def prepare(data_dir: str | None = None, manual_dir: str | None = None,
            ratio: float = 100.0) -> tfds.core.DatasetBuilder:
  """Prepares fashion_mnist (offline if need be), then the long-tailed subset; returns it."""
  b = builder(data_dir, ratio)
  if b.is_prepared():
    return b
  fashion_mnist.prepare(default_data_dir(data_dir), manual_dir=manual_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return b
