"""The bottom of imgcls.data: the error type, data_dir and name helpers, the network probe,
and the registry of dataset sources. It imports no other imgcls.data module.

A dataset source finds (and prepares) the datasets of some names. Each source registers
itself in SOURCES where it is defined (fashion_mnist.py, mosaic.py, folder.py,
tfds_source.py) with what it claims as info; sources.py declares each first (its module and
claims: Registry.declare), so every name is known without importing any source, and a
source's module is imported when a lookup first picks it. `source_for(name)` picks the one for a dataset name:

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


# Registered with what each claims as info: `names=` (base names), `prefix=`, `fallback=`.
# sources.py declares every source with the same info, so a lookup imports only the chosen one.
SOURCES: Registry[Source] = Registry('dataset source')


def register_source(name: str, source: Source) -> Source:
  """Registers `source` under `name` with its claims (its names, prefix, fallback) as info."""
  return SOURCES.register(name, source, **claims(source))


def claims(source: Any) -> dict[str, Any]:
  """What a source claims, as the registry's info."""
  return {'names': tuple(getattr(source, 'names', ())), 'prefix': getattr(source, 'prefix', ''),
          'fallback': bool(getattr(source, 'fallback', False))}


def source_for(name: str) -> Source:
  """The registered source for a dataset name (exact base name, then prefix, then fallback);
  only the chosen source's module is imported."""
  info = {key: SOURCES.info(key) for key in SOURCES.names()}  # imports no source
  stripped = name.strip()
  for key, claim in info.items():
    if base_name(stripped) in claim['names']:
      return SOURCES.get(key)
  for key, claim in info.items():
    if claim['prefix'] and stripped.startswith(claim['prefix']):
      return SOURCES.get(key)
  for key, claim in info.items():
    if claim['fallback']:
      return SOURCES.get(key)
  raise DataError(f'No dataset source takes {name!r} (registered sources: '
                  f'{", ".join(SOURCES.names())}); import imgcls.data.sources to register them.')
