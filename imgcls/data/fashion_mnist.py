"""Offline preparation of TFDS's own `fashion_mnist` from local IDX files.

Debian's `dataset-fashion-mnist` ships the four original `.gz` files with rewritten gzip
headers (file name dropped, MTIME changed; the deflate streams are untouched). Restoring the
original headers gives byte-identical originals that pass TFDS's checksums, so TFDS's own
builder prepares the standard dataset from them through `manual_dir`.

Registers the dataset source 'fashion_mnist': TFDS's builder, prepared by `prepare` here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import tempfile

from etils import epath

from imgcls.data import tfds_source
from imgcls.data.base import (register_source, DataError, default_data_dir, download_hosts,
                              network_available)
from imgcls.registry import lazy_import

tfds = lazy_import('tensorflow_datasets')

log = logging.getLogger(__name__)

NAME = 'fashion_mnist'
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
APT_PACKAGE = 'dataset-fashion-mnist'
# MTIME of the original gzip headers (Fashion-MNIST release files).
_MTIME = {'train': 1504176606, 't10k': 1504176627}

_HOWTO = (
    'Fix one of: (1) `sudo apt-get install dataset-fashion-mnist` (puts the files in '
    f'{DEBIAN_DIR}); (2) download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
    't10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from '
    'https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and run '
    '`imgcls prepare fashion_mnist --manual_dir=FOLDER`; (3) run where the network is available.')


def _expected(builder) -> dict[str, tuple[int, str]]:
  """{file name: (size, sha256)} from TFDS's registered checksums."""
  return {i.filename: (int(i.size), i.checksum) for i in type(builder).url_infos.values()}


def restore_gzip_header(data: bytes, filename: str) -> bytes:
  """`data` with the original header: FNAME = filename without '.gz', original MTIME."""
  if data[:3] != b'\x1f\x8b\x08':
    raise ValueError(f'{filename} is not a gzip file')
  flags, pos = data[3], 10
  if flags & 4:  # FEXTRA
    pos += 2 + int.from_bytes(data[10:12], 'little')
  for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
    if flags & bit:
      pos = data.index(b'\0', pos) + 1
  if flags & 2:  # FHCRC
    pos += 2
  mtime = _MTIME[filename.split('-')[0]]
  header = b'\x1f\x8b\x08\x08' + struct.pack('<I', mtime) + data[8:10]
  return header + filename.removesuffix('.gz').encode() + b'\0' + data[pos:]


def _original(path: epath.Path, size: int, sha256: str) -> bytes:
  """The file's bytes as originally released (header restored if needed), else DataError."""
  data = path.read_bytes()
  if len(data) == size and hashlib.sha256(data).hexdigest() == sha256:
    return data
  try:
    restored = restore_gzip_header(data, path.name)
  except ValueError:  # Not gzip, or a header cut short.
    restored = b''
  if len(restored) == size and hashlib.sha256(restored).hexdigest() == sha256:
    return restored
  raise DataError(
      f'{path} is present but wrong (truncated or corrupted: {len(data)} bytes where the '
      f'original has {size}, and the checksum does not match even with the original gzip header '
      f'restored). Delete it and fetch it again. {_HOWTO}')


def _can_apt() -> bool:
  return shutil.which('apt-get') is not None and hasattr(os, 'geteuid') and os.geteuid() == 0


def _apt_install() -> None:
  log.warning('*** No Fashion-MNIST files and no network: running `apt-get install -y %s` '
              '(as root) to get them. ***', APT_PACKAGE)
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')

  def run(*args: str) -> subprocess.CompletedProcess:
    try:
      return subprocess.run(['apt-get', *args], env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    except subprocess.TimeoutExpired as e:
      raise DataError(f'`apt-get {" ".join(args)}` timed out. {_HOWTO}') from e

  result = run('install', '-y', APT_PACKAGE)
  if result.returncode != 0:  # Often: no package lists yet.
    run('update')
    result = run('install', '-y', APT_PACKAGE)
  if result.returncode != 0:
    raise DataError(f'`apt-get install -y {APT_PACKAGE}` failed:\n{result.stderr[-1000:]}\n'
                    f'{_HOWTO}')
  log.warning('*** Installed Debian package %s into %s. ***', APT_PACKAGE, DEBIAN_DIR)


def prepare(data_dir: str | None = None, manual_dir: str | None = None,
            allow_apt: bool = True) -> None:
  """Leaves TFDS's standard prepared `fashion_mnist` in data_dir, offline if need be."""
  data_dir = default_data_dir(data_dir)
  builder = tfds.builder(NAME, data_dir=data_dir)
  if builder.is_prepared():
    return
  expected = _expected(builder)
  folder = epath.Path(manual_dir or DEBIAN_DIR)
  if not manual_dir and not any((folder / f).exists() for f in expected):
    if network_available(download_hosts(builder)):
      log.warning('Downloading and preparing %s into %s.', NAME, data_dir)
      builder.download_and_prepare()
      return
    if not (allow_apt and _can_apt()):
      raise DataError(f'Cannot prepare {NAME} in {data_dir}: no files in {DEBIAN_DIR}, no '
                      f'network, and no apt-get to run (needs root and allow_apt). {_HOWTO}')
    _apt_install()
  missing = [f for f in expected if not (folder / f).exists()]
  if missing:
    raise DataError(f'Missing Fashion-MNIST files in {folder}: {", ".join(missing)}. {_HOWTO}')

  log.warning('Preparing %s in %s from the files in %s.', NAME, data_dir, folder)
  with tempfile.TemporaryDirectory(prefix='fashion_mnist_') as tmp:
    manual = epath.Path(tmp) / 'manual'
    manual.mkdir()
    for filename, (size, sha256) in expected.items():
      (manual / filename).write_bytes(_original(folder / filename, size, sha256))
    config = tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
    builder.download_and_prepare(download_dir=os.path.join(tmp, 'downloads'),
                                 download_config=config)


class FashionMnistSource(tfds_source.TfdsSource):
  """TFDS's fashion_mnist, prepared offline when need be (see `prepare`)."""

  names = (NAME,)
  fallback = False

  def prepare_files(self, builder, name: str, data_dir: str,
                    manual_dir: str | None = None) -> None:
    del builder, name
    prepare(data_dir, manual_dir=manual_dir)


register_source(NAME, FashionMnistSource())
