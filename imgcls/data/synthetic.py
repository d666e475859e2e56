"""A tiny learnable image dataset, written as a real prepared TFDS dataset (tests, benchmarks).

Class k = the size of a bright square (sides grow with k) at a random place on a noisy dark
background. Unlike "which quadrant", the class survives flip_lr and shifts, and a CNN with
global pooling can read it; a small CNN learns it in a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from imgcls.data import sources
from imgcls.data.base import DataError


def _sides(image_size: int, num_classes: int) -> list[int]:
  """Distinct square sides from about image_size / 8 to image_size / 2."""
  lo, hi = max(2, image_size // 8), image_size // 2
  if hi - lo + 1 < num_classes:
    raise DataError(f'image_size={image_size} is too small for {num_classes} classes of '
                    'distinct square sizes: use a larger image_size.')
  return [round(lo + k * (hi - lo) / max(1, num_classes - 1)) for k in range(num_classes)]


def _examples(n: int, size: int, channels: int, sides: list[int], rng: np.random.Generator):
  for i in range(n):
    label = int(rng.integers(len(sides)))
    side = sides[label]
    image = rng.integers(0, 60, (size, size, channels), dtype=np.uint8)
    top, left = rng.integers(size - side + 1, size=2)
    image[top:top + side, left:left + side] = rng.integers(180, 256, (side, side, channels))
    yield i, {'image': image, 'label': label}


def make_synthetic_dataset(data_dir: str, name: str = 'synthetic_shapes', *, num_train: int = 256,
                           num_test: int = 64, image_size: int = 16, channels: int = 1,
                           num_classes: int = 4, seed: int = 0) -> str:
  """Writes the dataset into data_dir (get_builder(name, data_dir) finds it); returns its folder."""
  sides = _sides(image_size, num_classes)
  builder = _prepared(name, data_dir)
  if builder is not None:
    sizes = (sources.num_examples(builder, 'train'), sources.num_examples(builder, 'test'))
    if sizes != (num_train, num_test):
      raise DataError(f'{builder.data_dir} already holds {name} with {sizes} examples, not '
                      f'{(num_train, num_test)}: delete it or pick another data_dir or name.')
    return str(builder.data_dir)
  rng = np.random.default_rng(seed)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(image_size, image_size, channels)),
      'label': tfds.features.ClassLabel(num_classes=num_classes),
  })
  splits = {'train': list(_examples(num_train, image_size, channels, sides, rng)),
            'test': list(_examples(num_test, image_size, channels, sides, rng))}
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, split_datasets=splits, data_dir=data_dir,
      description='Synthetic: class = size of a bright square on noise.')
  return str(builder.data_dir)


def _prepared(name: str, data_dir: str) -> tfds.core.DatasetBuilder | None:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    return None
  return builder if builder.is_prepared() else None
