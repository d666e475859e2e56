"""Eight simulated CPU devices for every test (must be set before JAX starts), and the
tiny synthetic dataset and config the training tests share."""

import os

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent XLA compilation cache per test run, shared by the pytest-xdist workers
# (they inherit the controller's environment) and the CLI subprocesses the tests start.
# Most of the suite's time is compiling the same tiny train and eval steps again: every
# train_and_evaluate call jits fresh functions. A fresh directory per run keeps CI honest
# (nothing carried over between runs); JAX recompiles when an entry cannot be read.
_OWN_XLA_CACHE = None  # set in the process that made the directory; it removes it at the end
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix='imgcls-tests-xla-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_XLA_CACHE
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top

tf.config.set_visible_devices([], 'GPU')  # tf.data only; keep TF off accelerators

import jax  # noqa: E402
import pytest  # noqa: E402

from imgcls import data  # noqa: E402

from helpers import NUM_TEST, make_tiny_config  # noqa: E402


def pytest_unconfigure(config):
  del config
  if _OWN_XLA_CACHE:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('data')
  data.make_synthetic_dataset(str(d), num_train=160, num_test=NUM_TEST, image_size=16,
                              channels=1, num_classes=4)
  return str(d)


@pytest.fixture
def tiny_config():
  return make_tiny_config