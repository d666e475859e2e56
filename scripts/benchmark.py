"""Throughput of a config's train step on fake data, and of its input pipeline alone.

  uv run python scripts/benchmark.py --config=configs/default.py --steps=30

Prints images/s for each and their ratio: a pipeline slower than the step means the
run is input-bound. Figures on this noisy 2-core machine vary by up to 2x over
minutes: compare configs within one run.

It first prints the compiled train step's memory (XLA's memory analysis: arguments, outputs,
temporaries) for each --grad_accum k at the config's global batch: accumulation runs the
per-device batch as k microbatches, so the temporaries (activations) shrink with k.
"""

import functools
import time

from absl import app, flags
import jax
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from imgcls import config as config_lib, data, models, optim, parallel, step as step_lib, train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps (after 3 warm-up steps).')
_ACCUM = flags.DEFINE_list('grad_accum', ['1', '2', '4'], 'grad_accum_steps values whose '
                           'compiled memory is printed (empty: none).')


def step_memory(train_fn, state, batch) -> dict[str, float]:
  """MiB of the compiled step's arguments, outputs and temporaries (XLA memory analysis)."""
  m = train_fn.lower(state, batch).compile().memory_analysis()
  mib = lambda b: b / 2**20  # noqa: E731
  return {'arguments': mib(m.argument_size_in_bytes), 'outputs': mib(m.output_size_in_bytes),
          'temporaries': mib(m.temp_size_in_bytes)}


def _rate(fn, steps: int, batch_size: int) -> float:
  for _ in range(3):
    out = fn()
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return steps * batch_size / (time.perf_counter() - t0)


def main(_):
  config = config_lib.validate(_CONFIG.value)
  mesh = parallel.make_mesh()
  ds = config.dataset
  builder = data.builder_for(ds)
  batches = data.train_iterator(builder, split=ds.train_split, pp=config.pp_train,
                                global_batch_size=config.batch_size, seed=0,
                                shuffle_buffer=ds.shuffle_buffer, cache=ds.cache)
  host = next(batches)
  host = {k: host[k] for k in ('image', 'labels')}
  model = models.from_config(config)
  tx, _ = optim.make_optimizer(config, total_steps=1000)
  state = train.init_state(model, tx, 0, host['image'].shape[1:], mesh)
  batch = parallel.shard_batch(host, mesh)

  def make_step(k):
    return parallel.data_parallel(
        functools.partial(step_lib.train_step, model=model, tx=tx, grad_accum_steps=k),
        mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))

  per_device = config.batch_size // mesh.size
  for k in map(int, _ACCUM.value):
    if per_device % k:
      print(f'grad_accum {k}: does not divide the per-device batch {per_device}, skipped')
      continue
    m = step_memory(make_step(k), state, batch)
    print(f'grad_accum {k} (microbatch {per_device // k}/device, global batch '
          f'{config.batch_size}): compiled memory arguments {m["arguments"]:.1f} MiB, '
          f'outputs {m["outputs"]:.1f} MiB, temporaries {m["temporaries"]:.1f} MiB', flush=True)
  train_fn = make_step(config.grad_accum_steps)

  def one_step():
    nonlocal state
    state, metrics = train_fn(state, batch)
    return metrics['loss']

  step_rate = _rate(one_step, _STEPS.value, config.batch_size)
  pipe_rate = _rate(lambda: np.asarray(next(batches)['image']), _STEPS.value,
                    config.batch_size)
  print(f'model {config.model.to_dict()} batch {config.batch_size} on {mesh.size} device(s)')
  print(f'train step (fake data, fixed batch): {step_rate:8.0f} images/s')
  print(f'input pipeline alone:                {pipe_rate:8.0f} images/s')
  print(f'pipeline / step ratio:               {pipe_rate / step_rate:8.2f}')


if __name__ == '__main__':
  app.run(main)
