"""Offline Fashion-MNIST: header restoration, checks, a real preparation from the Debian files."""

import shutil
import subprocess
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from imgcls import data
from imgcls.data import fashion_mnist

FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
         't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')


@pytest.fixture(scope='module')
def debian_dir():
  folder = epath.Path(fashion_mnist.DEBIAN_DIR)
  missing = [f for f in FILES if not (folder / f).exists()]
  if missing and fashion_mnist._can_apt():  # The same path the main job takes.
    fashion_mnist._apt_install()
    missing = [f for f in FILES if not (folder / f).exists()]
  if missing:  # Not a skip: CI must have the data.
    pytest.fail(f'{missing} not in {folder}: run `apt-get install dataset-fashion-mnist`.')
  return folder


@pytest.fixture
def offline(monkeypatch):
  """No network for TFDS."""
  monkeypatch.setattr(fashion_mnist, 'network_available', lambda *a, **k: False)


def test_restored_headers_match_tfds_checksums(debian_dir):
  expected = fashion_mnist._expected(tfds.builder('fashion_mnist'))
  for name in FILES:
    size, sha256 = expected[name]
    assert len(fashion_mnist._original(debian_dir / name, size, sha256)) == size


def test_prepare_offline_from_debian_files(debian_dir, tmp_path, offline):
  builder = data.get_builder('fashion_mnist', str(tmp_path))  # Prepares it.
  assert builder.is_prepared()
  assert data.num_examples(builder, 'train') == 60_000
  assert data.num_examples(builder, 'test') == 10_000
  batch = next(iter(builder.as_dataset(split='test', batch_size=10_000)))
  assert batch['image'].shape == (10_000, 28, 28, 1) and batch['image'].dtype == np.uint8
  assert sorted(np.unique(batch['label'].numpy())) == list(range(10))
  start = time.perf_counter()
  fashion_mnist.prepare(str(tmp_path))  # Already prepared: nothing to do.
  assert time.perf_counter() - start < 5


def test_wrong_file_is_named(debian_dir, tmp_path, offline):
  manual = tmp_path / 'manual'
  manual.mkdir()
  for name in FILES:
    shutil.copy(debian_dir / name, manual / name)
  truncated = manual / 't10k-labels-idx1-ubyte.gz'
  truncated.write_bytes(truncated.read_bytes()[:-100])
  with pytest.raises(data.DataError, match='t10k-labels-idx1-ubyte.gz.*truncated'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'), manual_dir=str(manual))
  truncated.write_bytes(b'not a gzip file')
  with pytest.raises(data.DataError, match='t10k-labels-idx1-ubyte.gz.*corrupted'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'), manual_dir=str(manual))
  truncated.unlink()
  with pytest.raises(data.DataError, match='Missing.*t10k-labels-idx1-ubyte.gz'):
    data.prepare('fashion_mnist', str(tmp_path / 'tfds'), manual_dir=str(manual))


def test_no_files_no_network_no_apt_fails_fast(tmp_path, monkeypatch, offline):
  monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', str(tmp_path / 'none'))
  monkeypatch.setattr(fashion_mnist, '_can_apt', lambda: False)
  start = time.perf_counter()
  with pytest.raises(data.DataError) as e:
    fashion_mnist.prepare(str(tmp_path / 'tfds'))
  assert time.perf_counter() - start < 5
  for hint in ('apt-get install dataset-fashion-mnist', '--manual_dir=FOLDER', 'network'):
    assert hint in str(e.value)


def test_apt_install_is_tried_then_files_are_used(debian_dir, tmp_path, monkeypatch, offline):
  target = tmp_path / 'debian'
  monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', str(target))
  monkeypatch.setattr(fashion_mnist, '_can_apt', lambda: True)
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd[1])
    if cmd[1] == 'install' and 'update' not in calls:
      return subprocess.CompletedProcess(cmd, 100, '', 'E: Unable to locate package')
    if cmd[1] == 'install':  # "Installs" only the label files.
      target.mkdir()
      for name in FILES[1::2]:
        shutil.copy(debian_dir / name, target / name)
    return subprocess.CompletedProcess(cmd, 0, '', '')

  monkeypatch.setattr(fashion_mnist.subprocess, 'run', fake_run)
  with pytest.raises(data.DataError, match='Missing.*train-images-idx3-ubyte.gz'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'))
  assert calls == ['install', 'update', 'install']
