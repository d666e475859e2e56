"""Training label counts of a single-label dataset: the class prior that class weights and
logit adjustment use, counted once per run and kept in the workdir."""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import numpy as np

from imgcls.data.base import DataError
from imgcls.data.sources import class_label
from imgcls.registry import lazy_import

tf = lazy_import('tensorflow')
tfds = lazy_import('tensorflow_datasets')

FILENAME = 'class_counts.json'


def single_label_key(builder: Any, why: str) -> tuple[str, int]:
  """('label', K) of a single-label dataset, else a DataError saying `why` needs one."""
  found = class_label(builder)
  if found is None or found[0] != 'label':
    what = 'a multi-label dataset' if found else 'a dataset without a class label'
    raise DataError(f'{why} needs single-label data (a "label" ClassLabel), but '
                    f'{builder.name} is {what}: turn it off for this dataset.')
  return 'label', found[1].num_classes


def label_counts(builder: Any, split: str) -> np.ndarray:
  """[K] int64: how many examples of each class `split` holds (images are not decoded)."""
  key, k = single_label_key(builder, 'Counting class frequencies')
  decoders = {n: tfds.decode.SkipDecoding() for n, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  counts = np.zeros(k, np.int64)
  for labels in ds.map(lambda f: f[key]).batch(8192).as_numpy_iterator():
    counts += np.bincount(labels, minlength=k)[:k]
  return counts


_MEMO: dict[tuple[str, str], np.ndarray] = {}


def memo_label_counts(builder: Any, split: str) -> np.ndarray:
  """label_counts, counted once per process for each (dataset folder, split)."""
  key = (str(builder.data_dir), split)
  if key not in _MEMO:
    _MEMO[key] = label_counts(builder, split)
  return _MEMO[key]


def cached_label_counts(builder: Any, split: str, workdir: str | None = None) -> np.ndarray:
  """label_counts, read from WORKDIR/class_counts.json when it holds this split's, else
  counted (and written there when workdir is given)."""
  path = epath.Path(workdir) / FILENAME if workdir else None
  if path is not None and path.exists():
    saved = json.loads(path.read_text())
    if saved.get('dataset') == builder.name and saved.get('split') == split:
      return np.asarray(saved['counts'], np.int64)
  counts = memo_label_counts(builder, split)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'dataset': builder.name, 'split': split,
                                'counts': counts.tolist()}))
  return counts


def load(workdir: str) -> np.ndarray | None:
  """The counts a run kept (WORKDIR/class_counts.json), or None (for imgcls.load / predict)."""
  path = epath.Path(workdir) / FILENAME
  return np.asarray(json.loads(path.read_text())['counts'], np.int64) if path.exists() else None
