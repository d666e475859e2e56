"""The TFDS side of image folders: the builders that write a checked file plan as a prepared
TFDS dataset, and the parallel decode check. Defining the builders imports TensorFlow, so
folder.py loads this module only when a folder is prepared."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from imgcls.data import decode
from imgcls.data.folder_layout import BUILDER_NAME, VERSION, File


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  # PIL releases the GIL while decoding and encoding, so threads use several cores.
  return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def bad_files(root: str, files: list[File]) -> list[tuple[str, str]]:
  """(path, reason) of every file PIL cannot decode."""
  with _pool() as pool:
    problems = pool.map(decode.problem, [os.path.join(root, f.path) for f in files])
    return [(f.path, p) for f, p in zip(files, problems) if p]


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a checked file plan ({split: {class: files}}) as a TFDS dataset."""

  name = BUILDER_NAME
  LABEL_KEY = 'label'
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Images from a folder, RGB, JPEG or PNG, original sizes.'}

  def __init__(self, *, root: str, classes: list[str], plan: dict[str, dict[str, list[File]]],
               key: str, data_dir: str, metadata: dict):
    self._root, self._classes, self._plan, self._metadata = root, classes, plan, metadata
    super().__init__(data_dir=data_dir, config=tfds.core.BuilderConfig(
        name=key, description=f'Images from {root}'))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Image classification dataset prepared from the folder {self._root}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            self.LABEL_KEY: self._label_feature(),
        }),
        supervised_keys=('image', self.LABEL_KEY),
        # Saved with dataset_info.json, inside TFDS's atomic write of the copy.
        metadata=tfds.core.MetadataDict(self._metadata))

  def _label_feature(self) -> tfds.features.FeatureConnector:
    return tfds.features.ClassLabel(names=self._classes)

  def _items(self, part) -> list[tuple[str, Any]]:
    """(path, label) of each file in one split of the plan."""
    return [(f.path, c) for c in sorted(part) for f in part[c]]

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(part) for split, part in self._plan.items()}

  def _generate_examples(self, part) -> Iterator:
    items = self._items(part)
    chunk = 256  # Bounds the encoded images held in memory at once.
    with _pool() as pool:
      for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        encoded = pool.map(decode.for_dataset, [os.path.join(self._root, p) for p, _ in part])
        for (path, c), data in zip(part, encoded):
          # Key = the path: TFDS orders records by its hash, so classes come mixed.
          yield path, {'image': data, self.LABEL_KEY: c}


class MultiLabelBuilder(Builder, skip_registration=True):
  """Writes a checked plan ({split: [(file, label names)]}) with a multi-label 'labels'."""

  name = BUILDER_NAME  # TFDS names each subclass after itself otherwise.
  LABEL_KEY = 'labels'

  def _label_feature(self) -> tfds.features.FeatureConnector:
    return tfds.features.Sequence(tfds.features.ClassLabel(names=self._classes))

  def _items(self, part) -> list[tuple[str, Any]]:
    return [(f.path, list(labels)) for f, labels in part]



def stale_copies(data_dir: str, key: str) -> list[str]:
  """Other prepared copies of the same folder (same path hash, other fingerprint)."""
  base = epath.Path(data_dir) / BUILDER_NAME
  prefix = key.rsplit('_', 1)[0] + '_'
  if not base.exists():
    return []
  return sorted(str(p) for p in base.iterdir() if p.name.startswith(prefix) and p.name != key)



def write(builder: Builder, root: str, key: str, data_dir: str) -> None:
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  stale = stale_copies(data_dir, key)
  if stale:
    logging.warning('Image folder %s changed since it was last prepared; older copies remain '
                    '(delete them when no run reads them): %s', root, ', '.join(stale))

