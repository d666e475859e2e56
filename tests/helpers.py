"""What many tests share: the tiny synthetic config, abstract shapes and parameter counts, and
the data-parallel train step as imgcls train maps it. Fixtures stay in conftest.py."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from imgcls import parallel, step

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'scripts'))
import samples  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

NUM_TEST = 37  # not divisible by the eval batch: the last batch is padded and masked


def write_test_split_pngs(data_dir, root):
  """The synthetic dataset's test split as PNGs, ROOT/LABEL/NNN.png (NNN: its index); root."""
  # pylint: disable=g-import-not-at-top
  from PIL import Image
  import tensorflow_datasets as tfds
  ds = tfds.builder('synthetic_shapes', data_dir=data_dir).as_dataset(split='test',
                                                                       shuffle_files=False)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    (root / str(ex['label'])).mkdir(parents=True, exist_ok=True)
    Image.fromarray(ex['image'][..., 0]).save(root / str(ex['label']) / f'{i:03d}.png')
  return root


def make_tiny_config(data_dir, **overrides):
  """A config that trains a tiny ResNet on the synthetic dataset in seconds."""
  c = samples.tiny_config(data_dir, {'total_steps': 12, 'eval_every_steps': 6,
                                     'log_every_steps': 3})
  c.lr.base = 0.05
  c.lr.warmup_steps = 2
  c.async_checkpoints = False
  c.evals.eval.reports = False  # matplotlib figures cost seconds; test_train turns them on
  for k, v in overrides.items():
    c[k] = v
  return c


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
  create = functools.partial(step.create_train_state, model, tx, input_shape=input_shape,
                             ema=ema)
  return jax.jit(create, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))


def train_step_fn(mesh, **kw):
  """step.train_step(**kw) under shard_map over `mesh`'s batch axis, with imgcls train's
  specs (in: replicated state, batch-sharded batch; out: replicated state and metrics) but
  without donating the state."""
  return parallel.data_parallel(functools.partial(step.train_step, **kw), mesh,
                                in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))

