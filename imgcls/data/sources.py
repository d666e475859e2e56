"""Finding TFDS builders: fail-fast checks, network probe, auto-preparation."""

from __future__ import annotations

import difflib
import logging
import socket
import threading
import urllib.parse

import tensorflow_datasets as tfds
from etils import epath

log = logging.getLogger(__name__)

# TFDS serves prepared datasets and mirrors of many downloads from here.
TFDS_HOST = 'storage.googleapis.com'


class DataError(ValueError):
  """A user-facing data problem; the message names the problem and the fix."""


def network_available(hosts: tuple[str, ...] = (TFDS_HOST,), timeout: float = 3.0) -> bool:
  """True if any host accepts a TCP connection on port 443 within `timeout` seconds in all."""
  ok = threading.Event()

  def probe(host: str) -> None:
    try:
      with socket.create_connection((host, 443), timeout=timeout):
        ok.set()
    except OSError:
      pass

  threads = [threading.Thread(target=probe, args=(h,), daemon=True) for h in hosts]
  for t in threads:
    t.start()
  # Daemon threads: a slow DNS lookup can neither block us past `timeout` nor block exit.
  ok.wait(timeout)
  return ok.is_set()


def download_hosts(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  """TFDS's host plus the hosts of the builder's registered download URLs."""
  hosts = [TFDS_HOST]
  for url in (type(builder).url_infos or {}):
    host = urllib.parse.urlparse(url).hostname
    if host and host not in hosts:
      hosts.append(host)
  return tuple(hosts)


def default_data_dir(data_dir: str | None = None) -> str:
  """`data_dir`, or TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return str(data_dir) if data_dir else tfds.core.constants.get_default_data_dir()


def base_name(name: str) -> str:
  """'fashion_mnist:3.0.1' or 'foo/config' -> 'fashion_mnist' / 'foo'."""
  return name.split('/')[0].split(':')[0].strip()


def _prepared_names(data_dir: str) -> list[str]:
  path = epath.Path(data_dir)
  try:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != 'downloads')
  except OSError:  # Missing or unreadable data_dir.
    return []


def _unknown(name: str, data_dir: str) -> DataError:
  known = set(tfds.list_builders(with_community_datasets=False)) | set(_prepared_names(data_dir))
  close = difflib.get_close_matches(base_name(name), sorted(known), n=5, cutoff=0.6)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  return DataError(
      f'Unknown dataset {name!r}: not registered in TFDS and not prepared in {data_dir}.{hint}'
      ' List TFDS datasets with `python -c "import tensorflow_datasets as tfds;'
      ' print(tfds.list_builders())"` (or see https://www.tensorflow.org/datasets/catalog),'
      ' or check data_dir.')


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  # tfds.builder also finds datasets that are prepared in data_dir but have no code
  # (e.g. made by store_as_tfds_dataset): it falls back to builder_from_files.
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise _unknown(name, data_dir) from None
  except (ValueError, TypeError) as e:  # Malformed name, bad config or version.
    raise DataError(f'Cannot build dataset {name!r} from data_dir {data_dir}: {e}') from e


def _not_prepared(builder: tfds.core.DatasetBuilder, name: str, data_dir: str,
                  why: str) -> DataError:
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  manual_hint = f'\nTFDS manual-download instructions:\n{manual.strip()}' if manual else ''
  return DataError(
      f'Dataset {name!r} is not prepared: expected it in {builder.data_dir} ({why}). Fix: run'
      f' `imgcls prepare {name} --data_dir={data_dir}` where the network is available (then copy'
      f' {data_dir}/{base_name(name)} here), or put the source files in a folder and run'
      f' `imgcls prepare {name} --data_dir={data_dir} --manual_dir=FOLDER`.{manual_hint}')


def _prepare(builder: tfds.core.DatasetBuilder, name: str, data_dir: str,
             manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares an unprepared dataset, or raises DataError at once if it cannot."""
  if base_name(name) == 'fashion_mnist':
    from imgcls.data import fashion_mnist  # pylint: disable=import-outside-toplevel
    fashion_mnist.prepare(data_dir, manual_dir=manual_dir)
  elif base_name(name) == 'fashion_mnist_mosaic':  # built offline from fashion_mnist
    from imgcls.data import mosaic  # pylint: disable=import-outside-toplevel
    mosaic.prepare(data_dir, manual_dir=manual_dir, config=builder.builder_config)
  else:
    # Without network TFDS would retry its downloads for minutes: check first.
    online = network_available(download_hosts(builder))
    if not online and not manual_dir:
      raise _not_prepared(builder, name, data_dir, 'and there is no network to download it')
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=online)
    builder.download_and_prepare(download_config=config)
  return _builder(name, data_dir)


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
                folder_split: str = 'train=0.8,validation=0.1,test=0.1',
                folder_seed: int = 0) -> tfds.core.DatasetBuilder:
  """A prepared TFDS builder for `name`; prepares it if allowed and possible, else DataError.

  `name` is a TFDS name ('fashion_mnist', 'cifar10:3.0.2') or an image folder
  ('folder:/path/to/images', see imgcls/data/folder.py); skip_corrupt, folder_split and
  folder_seed only apply to folders. With num_classes, a dataset with another number of
  classes is a DataError.
  """
  data_dir = default_data_dir(data_dir)
  from imgcls.data import folder  # pylint: disable=import-outside-toplevel
  if folder.is_folder_name(name):
    builder = folder.get_builder(name, data_dir, prepare=prepare, skip_corrupt=skip_corrupt,
                                 split=folder_split, seed=folder_seed)
  else:
    builder = _tfds_builder(name, data_dir, prepare)
  if num_classes is not None:
    check_num_classes(builder, name, num_classes)
  return builder


def _tfds_builder(name: str, data_dir: str, prepare: bool) -> tfds.core.DatasetBuilder:
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return builder
  if not prepare:
    raise _not_prepared(builder, name, data_dir, 'prepare=False')
  log.warning('%s is not prepared in %s: preparing it now.', name, data_dir)
  return _prepare(builder, name, data_dir)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            skip_corrupt: bool = False,
            folder_split: str = 'train=0.8,validation=0.1,test=0.1',
            folder_seed: int = 0) -> str:
  """Prepares `name` in data_dir (fashion_mnist offline; others by TFDS with manual_dir).

  Returns the prepared dataset's folder. 'folder:/path' names prepare an image folder
  (with skip_corrupt, folder_split and folder_seed as in get_builder).
  """
  data_dir = default_data_dir(data_dir)
  from imgcls.data import folder  # pylint: disable=import-outside-toplevel
  if folder.is_folder_name(name):
    return str(folder.get_builder(name, data_dir, skip_corrupt=skip_corrupt, split=folder_split,
                                  seed=folder_seed).data_dir)
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    builder = _prepare(builder, name, data_dir, manual_dir)
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
                    'skip_corrupt': False, 'folder_split': 'train=0.8,validation=0.1,test=0.1',
                    'folder_seed': 0}


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
                 folder_split=options['folder_split'], folder_seed=options['folder_seed'])
  if options['num_classes'] is not None:
    check_num_classes(get_builder(name, options['data_dir'], prepare=False,
                                  skip_corrupt=options['skip_corrupt'],
                                  folder_split=options['folder_split'],
                                  folder_seed=options['folder_seed']),
                      name, options['num_classes'])
  return path


def label_names(builder: tfds.core.DatasetBuilder) -> list[str] | None:
  """The class names of the dataset's 'label' (or multi-label 'labels') feature, or None."""
  found = class_label(builder)
  return list(found[1].names) or None if found else None
