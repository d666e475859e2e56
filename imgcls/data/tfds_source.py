"""Plain TFDS by name, the fallback source: fail-fast checks, network probe, preparation.

`TfdsSource` also serves the TFDS names whose preparation is our own (fashion_mnist offline,
the mosaics): they subclass it and override `prepare_files`.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from etils import epath

from imgcls.data.base import (register_source, DataError, base_name, download_hosts,
                              network_available)
from imgcls.registry import lazy_import

tfds = lazy_import('tensorflow_datasets')
log = logging.getLogger(__name__)


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


def tfds_builder(name: str, data_dir: str):
  """tfds.builder(name), with DataErrors that name the fix; the dataset may be unprepared."""
  # tfds.builder also finds datasets that are prepared in data_dir but have no code
  # (e.g. made by store_as_tfds_dataset): it falls back to builder_from_files.
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise _unknown(name, data_dir) from None
  except (ValueError, TypeError) as e:  # Malformed name, bad config or version.
    raise DataError(f'Cannot build dataset {name!r} from data_dir {data_dir}: {e}') from e


def not_prepared(builder, name: str, data_dir: str, why: str) -> DataError:
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  manual_hint = f'\nTFDS manual-download instructions:\n{manual.strip()}' if manual else ''
  return DataError(
      f'Dataset {name!r} is not prepared: expected it in {builder.data_dir} ({why}). Fix: run'
      f' `imgcls prepare {name} --data_dir={data_dir}` where the network is available (then copy'
      f' {data_dir}/{base_name(name)} here), or put the source files in a folder and run'
      f' `imgcls prepare {name} --data_dir={data_dir} --manual_dir=FOLDER`.{manual_hint}')


class TfdsSource:
  """A dataset TFDS knows by name (registered code, or prepared files in data_dir)."""

  names: tuple[str, ...] = ()
  prefix = ''
  fallback = True

  def builder(self, name: str, data_dir: str, *, prepare: bool = True, **options: Any):
    del options  # No options for TFDS datasets.
    builder = self.find(name, data_dir)
    if builder.is_prepared():
      return builder
    if not prepare:
      raise not_prepared(builder, name, data_dir, 'prepare=False')
    log.warning('%s is not prepared in %s: preparing it now.', name, data_dir)
    self.prepare_files(builder, name, data_dir)
    return self.find(name, data_dir)

  def prepare(self, name: str, data_dir: str, manual_dir: str | None = None,
              **options: Any):
    del options
    builder = self.find(name, data_dir)
    if builder.is_prepared():
      return builder
    self.prepare_files(builder, name, data_dir, manual_dir)
    return self.find(name, data_dir)

  def find(self, name: str, data_dir: str):
    """The builder, prepared or not (subclasses import their builder code first)."""
    return tfds_builder(name, data_dir)

  def prepare_files(self, builder, name: str, data_dir: str,
                    manual_dir: str | None = None) -> None:
    """Prepares an unprepared dataset, or raises DataError at once if it cannot."""
    # Without network TFDS would retry its downloads for minutes: check first.
    online = network_available(download_hosts(builder))
    if not online and not manual_dir:
      raise not_prepared(builder, name, data_dir, 'and there is no network to download it')
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=online)
    builder.download_and_prepare(download_config=config)


register_source('tfds', TfdsSource())
