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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from imgcls import config as config_lib, data  # noqa: E402

NUM_TEST = 37  # not divisible by the eval batch: the last batch is padded and masked


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


def _tiny_config(data_dir, **overrides):
  """A config that trains a tiny ResNet on the synthetic dataset in seconds."""
  c = config_lib.defaults()
  c.dataset.name = 'synthetic_shapes'
  c.dataset.data_dir = data_dir
  c.dataset.num_classes = 4
  c.dataset.shuffle_buffer = 1000
  c.pp_train = 'decode|flip_lr|value_range(-1, 1)|onehot(4)'
  c.pp_eval = 'decode|value_range(-1, 1)|onehot(4)'
  c.model.name = 'resnet10'
  c.model.width = 8
  c.model.stem = 'small'
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 12
  c.eval_every_steps = 6
  c.log_every_steps = 3
  c.lr.base = 0.05
  c.lr.warmup_steps = 2
  c.async_checkpoints = False
  c.evals.eval.reports = False  # matplotlib figures cost seconds; test_train turns them on
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture
def tiny_config():
  return _tiny_config


def shapes(model, x_shape, dtype=jnp.float32, **kw):
  """Variables and outputs by abstract evaluation: shapes and counts without running anything."""
  x = jax.ShapeDtypeStruct(x_shape, dtype)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, **kw), variables, x)
  return variables, out


def count_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def replicated_state(model, tx, mesh, input_shape, ema=False):
  """step.create_train_state (seed 0), jitted and replicated over `mesh`."""
  import functools  # pylint: disable=g-import-not-at-top
  from imgcls import parallel, step  # pylint: disable=g-import-not-at-top
  create = functools.partial(step.create_train_state, model, tx, input_shape=input_shape,
                             ema=ema)
  return jax.jit(create, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))


def train_step_fn(mesh, **kw):
  """step.train_step(**kw) under shard_map over `mesh`'s batch axis, with imgcls train's
  specs (in: replicated state, batch-sharded batch; out: replicated state and metrics) but
  without donating the state."""
  import functools  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from imgcls import parallel, step  # pylint: disable=g-import-not-at-top
  return parallel.data_parallel(functools.partial(step.train_step, **kw), mesh,
                                in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))
