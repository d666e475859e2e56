"""Finding datasets by name: the source registry's front door, class checks, split sizes.

`get_builder(name)` asks the source registered for the name (base.SOURCES) for a prepared
TFDS builder; `builder_for(config.dataset)` does the same with a config's dataset options.
Every source is declared below by the names it claims and its module, which registers the
real source when a lookup first picks it: a run imports only the source it reads.
Nothing here loads TensorFlow until a dataset is really built.
"""

from __future__ import annotations

from imgcls.data.base import (SOURCES, TFDS_HOST, DataError,  # noqa: F401
                              base_name, default_data_dir, download_hosts, network_available,
                              source_for)
from imgcls.registry import lazy_import

tfds = lazy_import('tensorflow_datasets')



def _declare(name: str, module: str, names: tuple[str, ...] = (), prefix: str = '',
             fallback: bool = False) -> None:
  SOURCES.declare(name, module, names=names, prefix=prefix, fallback=fallback)


# Each source's registered name, module and claims (as its class says; checked when it loads).
_declare('fashion_mnist', 'imgcls.data.fashion_mnist', names=('fashion_mnist',))
_declare('fashion_mnist_lt', 'imgcls.data.long_tail', names=('fashion_mnist_lt',))
_declare('fashion_mnist_mosaic', 'imgcls.data.mosaic', names=('fashion_mnist_mosaic',))
_declare('folder', 'imgcls.data.folder', prefix='folder:')
_declare('tfds', 'imgcls.data.tfds_source', fallback=True)

# folder_layout.DEFAULT_SPLIT (a test keeps them equal), without importing the folder source.
DEFAULT_FOLDER_SPLIT = 'train=0.8,validation=0.1,test=0.1'


def class_label(builder: tfds.core.DatasetBuilder):
  """('label', ClassLabel) of a single-label dataset, ('labels', ClassLabel) of a multi-label
  one (a Sequence of ClassLabel, as TFDS's voc), or None."""
  for key in ('label', 'labels'):
    try:  # A FeaturesDict: [] works, .get does not.
      feature = builder.info.features[key]
    except (KeyError, TypeError):
      continue
    feature = getattr(feature, 'feature', feature)  # Sequence(ClassLabel) -> ClassLabel
    if isinstance(feature, tfds.features.ClassLabel):
      return key, feature
  return None


def check_num_classes(builder: tfds.core.DatasetBuilder, name: str, num_classes: int) -> None:
  """DataError unless the dataset's class label has num_classes classes."""
  found = class_label(builder)
  if found is None or found[1].num_classes == num_classes:
    return
  key, label = found
  op = 'onehot' if key == 'label' else 'multihot'
  names = list(label.names)
  shown = ', '.join(names[:10]) + (', ...' if len(names) > 10 else '')
  raise DataError(
      f'Dataset {name!r} has {label.num_classes} classes ({shown}), but dataset.num_classes is '
      f'{num_classes}: set --config.dataset.num_classes={label.num_classes} (and {op}('
      f'{label.num_classes}) in the pp strings).')


def get_builder(name: str, data_dir: str | None = None, *, prepare: bool = True,
                num_classes: int | None = None, skip_corrupt: bool = False,
                folder_split: str = DEFAULT_FOLDER_SPLIT,
                folder_seed: int = 0,
                imbalance_ratio: float | None = None) -> tfds.core.DatasetBuilder:
  """A prepared TFDS builder for `name`; prepares it if allowed and possible, else DataError.

  `name` is a TFDS name ('fashion_mnist', 'cifar10:3.0.2') or an image folder
  ('folder:/path/to/images', see imgcls/data/folder.py); skip_corrupt, folder_split and
  folder_seed only apply to folders, imbalance_ratio to fashion_mnist_lt. With num_classes, a dataset with another number of
  classes is a DataError.
  """
  data_dir = default_data_dir(data_dir)
  builder = source_for(name).builder(name, data_dir, prepare=prepare, skip_corrupt=skip_corrupt,
                                     folder_split=folder_split, folder_seed=folder_seed,
                                     imbalance_ratio=imbalance_ratio)
  if num_classes is not None:
    check_num_classes(builder, name, num_classes)
  return builder


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            skip_corrupt: bool = False, folder_split: str = DEFAULT_FOLDER_SPLIT,
            folder_seed: int = 0, imbalance_ratio: float | None = None) -> str:
  """Prepares `name` in data_dir (fashion_mnist offline; others by TFDS with manual_dir).

  Returns the prepared dataset's folder. 'folder:/path' names prepare an image folder
  (with skip_corrupt, folder_split and folder_seed as in get_builder).
  """
  data_dir = default_data_dir(data_dir)
  builder = source_for(name).prepare(name, data_dir, manual_dir, skip_corrupt=skip_corrupt,
                                     folder_split=folder_split, folder_seed=folder_seed,
                                     imbalance_ratio=imbalance_ratio)
  return str(builder.data_dir)


def num_examples(builder: tfds.core.DatasetBuilder, split) -> int:
  """Number of examples in `split` (a name, a slice like 'train[:90%]', or a tfds sub-split)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError, AssertionError) as e:
    raise DataError(
        f'Bad split {split!r} for dataset {builder.name}: {e}. Available splits:'
        f' {sorted(builder.info.splits)}; slices look like "train[:90%]" or "test[10:]".') from e


# ------------------------------------------------------------ from a config

# The keys of a config's `dataset` group that choose and prepare the data, with the
# defaults get_builder uses when a plain dict leaves one out.
_DATASET_OPTIONS = {'data_dir': None, 'prepare': True, 'num_classes': None,
                    'skip_corrupt': False, 'folder_split': DEFAULT_FOLDER_SPLIT,
                    'folder_seed': 0, 'imbalance_ratio': None}


def _options(dataset_cfg, data_dir: str | None) -> tuple[str, dict]:
  """(name, get_builder keyword arguments) from a `dataset` group (ConfigDict or dict)."""
  get = dataset_cfg.get
  name = get('name')
  if not name:
    raise DataError('The dataset group names no dataset: set --config.dataset.name.')
  options = {k: get(k, default) for k, default in _DATASET_OPTIONS.items()}
  options['data_dir'] = data_dir or options['data_dir']
  return name, options


def builder_for(dataset_cfg, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared, class-count-checked builder for a config's `dataset` group.

  dataset_cfg: an ml_collections ConfigDict or a dict with name and, optionally, data_dir,
  prepare, num_classes, skip_corrupt, folder_split, folder_seed (missing: get_builder's
  defaults). data_dir, if given, wins over dataset_cfg's.
  """
  name, options = _options(dataset_cfg, data_dir)
  return get_builder(name, options.pop('data_dir'), **options)


def prepare_for(dataset_cfg, data_dir: str | None = None, manual_dir: str | None = None) -> str:
  """Prepares a config's dataset with the options training uses; returns its folder.

  As builder_for (skip_corrupt, folder_split and folder_seed apply to image folders), but
  always prepares, from manual_dir if given, and checks num_classes if the group sets it.
  """
  name, options = _options(dataset_cfg, data_dir)
  path = prepare(name, options['data_dir'], manual_dir, skip_corrupt=options['skip_corrupt'],
                 folder_split=options['folder_split'], folder_seed=options['folder_seed'],
                 imbalance_ratio=options['imbalance_ratio'])
  if options['num_classes'] is not None:
    check_num_classes(get_builder(name, options['data_dir'], prepare=False,
                                  skip_corrupt=options['skip_corrupt'],
                                  folder_split=options['folder_split'],
                                  folder_seed=options['folder_seed'],
                                  imbalance_ratio=options['imbalance_ratio']),
                      name, options['num_classes'])
  return path


def label_names(builder: tfds.core.DatasetBuilder) -> list[str] | None:
  """The class names of the dataset's 'label' (or multi-label 'labels') feature, or None."""
  found = class_label(builder)
  return list(found[1].names) or None if found else None
