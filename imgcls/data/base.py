"""The bottom of imgcls.data: the error type, data_dir and name helpers, the network probe,
and the registry of dataset sources. It imports no other imgcls.data module.

A dataset source finds (and prepares) the datasets of some names. Each source registers
itself in SOURCES where it is defined (fashion_mnist.py, mosaic.py, folder.py,
tfds_source.py); sources.py declares them first as `LazySource`s (names, prefix and module
only), so every name is known without importing any source, and a source's module is
imported when a lookup first picks it. `source_for(name)` picks the one for a dataset name:

  1. a source that claims the exact name (by its base name: 'fashion_mnist:3.0.1' and
     'fashion_mnist_mosaic/small' count as 'fashion_mnist' and 'fashion_mnist_mosaic'),
  2. else one whose prefix starts the name ('folder:/path/to/images'),
  3. else the fallback: plain TFDS by name.

A source is any object with the attributes of `Source`; `builder(name, data_dir, *,
prepare, **options)` returns a prepared TFDS builder (or raises DataError) and
`prepare(name, data_dir, manual_dir, **options)` prepares it and returns the builder.
`options` are the dataset options of the config (skip_corrupt, folder_split, folder_seed):
each source takes **options and reads the ones it uses.
"""

from __future__ import annotations

import dataclasses
import importlib
import socket
import threading
import urllib.parse
from typing import Any, Protocol

from imgcls.registry import Registry, lazy_import
from imgcls.errors import UserError

tfds = lazy_import('tensorflow_datasets')

# TFDS serves prepared datasets and mirrors of many downloads from here.
TFDS_HOST = 'storage.googleapis.com'


class DataError(UserError):
  """A user-facing data problem; the message names the problem and the fix."""


# ------------------------------------------------------------------ names and paths

def default_data_dir(data_dir: str | None = None) -> str:
  """`data_dir`, or TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return str(data_dir) if data_dir else tfds.core.constants.get_default_data_dir()


def base_name(name: str) -> str:
  """'fashion_mnist:3.0.1' or 'foo/config' -> 'fashion_mnist' / 'foo'."""
  return name.split('/')[0].split(':')[0].strip()


# ------------------------------------------------------------------ network

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


def download_hosts(builder: Any) -> tuple[str, ...]:
  """TFDS's host plus the hosts of the builder's registered download URLs."""
  hosts = [TFDS_HOST]
  for url in (type(builder).url_infos or {}):
    host = urllib.parse.urlparse(url).hostname
    if host and host not in hosts:
      hosts.append(host)
  return tuple(hosts)


# ------------------------------------------------------------------ sources

class Source(Protocol):
  """What a dataset source offers (see the module doc)."""

  names: tuple[str, ...]  # Base names it claims exactly (TFDS names).
  prefix: str  # Or: the prefix of the names it claims ('folder:'); '' for none.
  fallback: bool  # Or: it takes every name no other source claims (plain TFDS).

  def builder(self, name: str, data_dir: str, *, prepare: bool = True, **options: Any) -> Any:
    """The prepared TFDS builder; prepares it first if allowed; DataError if it cannot."""

  def prepare(self, name: str, data_dir: str, manual_dir: str | None = None,
              **options: Any) -> Any:
    """Prepares the dataset (from manual_dir if given); returns the prepared builder."""


@dataclasses.dataclass(frozen=True)
class LazySource:
  """A source known by what it claims and by its module; the module registers the real one."""

  module: str  # e.g. 'imgcls.data.folder'
  names: tuple[str, ...] = ()
  prefix: str = ''
  fallback: bool = False


class SourceRegistry(Registry[Source]):
  """The dataset sources, some declared as LazySource until a lookup first needs them."""

  def register(self, name: str, obj: Any = None, **info: Any) -> Any:
    """As Registry.register; a real source replaces its LazySource if it claims the same."""
    def add(item: Any) -> Any:
      lazy = self._items.get(name)
      if isinstance(lazy, LazySource) and not isinstance(item, LazySource):
        claims = (tuple(getattr(item, 'names', ())), getattr(item, 'prefix', ''),
                  getattr(item, 'fallback', False))
        if claims != (lazy.names, lazy.prefix, lazy.fallback):
          raise ValueError(f'dataset source {name!r} claims {claims}, but was declared with '
                           f'{(lazy.names, lazy.prefix, lazy.fallback)}: fix its declaration.')
        del self._items[name]
      return super(SourceRegistry, self).register(name, item, **info)
    return add if obj is None else add(obj)

  def get(self, name: str) -> Source:
    """The source registered as `name`, its module imported first if it was only declared."""
    item = super().get(name)
    if isinstance(item, LazySource):
      importlib.import_module(item.module)  # registers the real source, replacing `item`
      item = super().get(name)
      if isinstance(item, LazySource):
        raise ValueError(f'{item.module} does not register the dataset source {name!r}.')
    return item


SOURCES = SourceRegistry('dataset source')


def source_for(name: str) -> Source:
  """The registered source for a dataset name (exact base name, then prefix, then fallback);
  only the chosen source's module is imported."""
  items = SOURCES.items()
  stripped = name.strip()
  for key, source in items:
    if base_name(stripped) in getattr(source, 'names', ()):
      return SOURCES.get(key)
  for key, source in items:
    prefix = getattr(source, 'prefix', '')
    if prefix and stripped.startswith(prefix):
      return SOURCES.get(key)
  for key, source in items:
    if getattr(source, 'fallback', False):
      return SOURCES.get(key)
  raise DataError(f'No dataset source takes {name!r} (registered sources: '
                  f'{", ".join(SOURCES.names())}); import imgcls.data.sources to register them.')
