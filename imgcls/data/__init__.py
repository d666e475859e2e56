"""Data: dataset sources (TFDS by name, offline Fashion-MNIST, mosaics, image folders), pp ops
and the train/eval pipelines.

Importing this package is cheap and loads no TensorFlow: it registers every pp op
(imgcls.data.ops) and declares every dataset source by name (imgcls.data.sources; a source's
module loads when a lookup first picks it, and its TensorFlow and TFDS imports are lazy); the
pipelines (which import JAX and TensorFlow) load on first use of
train_iterator, eval_data or EvalData, and synthetic data on make_synthetic_dataset.

Layout, bottom up (no module imports one above it): base (DataError, paths, SOURCES) ->
preprocess (pp op registry, parser) -> ops_image, ops_label, randaugment -> ops_fused -> ops;
decode, folder_layout, folder_csv, folder_write, tfds_source -> fashion_mnist, mosaic
(mosaic_builder), folder -> sources -> pipeline, synthetic.
"""

import importlib

from imgcls.data import ops  # noqa: F401  (registers every pp op)
from imgcls.data.base import DataError
from imgcls.data.preprocess import get_pp_fn, image_only, list_ops, register
from imgcls.data.sources import (builder_for, check_num_classes, class_label, get_builder,
                                 label_names, num_examples, prepare, prepare_for)

# Loaded on first use: name -> module.
_LAZY = {'EvalData': 'pipeline', 'eval_data': 'pipeline', 'train_iterator': 'pipeline',
         'TrainBatches': 'pipeline', 'make_synthetic_dataset': 'synthetic'}

__all__ = [
    'DataError', 'EvalData', 'builder_for', 'check_num_classes', 'class_label', 'eval_data',
    'get_builder', 'get_pp_fn', 'image_only', 'label_names', 'list_ops',
    'make_synthetic_dataset', 'mosaic', 'num_examples', 'prepare', 'prepare_for', 'register',
    'TrainBatches', 'train_iterator',
]


def __getattr__(name: str):
  if name == 'mosaic':  # a public module (data.mosaic.prepare), loaded on first use as well
    return importlib.import_module(f'{__name__}.mosaic')
  if name in _LAZY:
    module = importlib.import_module(f'{__name__}.{_LAZY[name]}')
    value = getattr(module, name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
