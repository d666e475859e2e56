"""FSDP gathers each parameter where the model reads it (sharding.gather_on_read): a ViT
block's parameters inside its remat and scan, so the backward pass gathers them again instead
of keeping every whole parameter alive. The same steps as gathering all of them at the top of
the loss (the step before it), and fewer temporary bytes, on 8 simulated devices."""

import functools

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from imgcls import parallel, sharding, step as step_lib
from imgcls.models.vit import ViT

A = parallel.AXIS
IMAGE = (16, 16, 3)


def _vit(remat='nothing_saveable', scan=False, width=64, depth=3):
  return ViT(num_classes=8, width=width, depth=depth, mlp_dim=2 * width, num_heads=4,
             patch_size=4, remat=remat, scan=scan)


def _state_and_step(model, tx, mesh):
  """The seed-0 state in its fsdp shards (every array split) and the step over them."""
  create = functools.partial(step_lib.create_train_state, model, tx, input_shape=IMAGE)
  key = jax.random.PRNGKey(0)
  specs = sharding.state_specs(jax.eval_shape(create, key), mesh.size, 'fsdp', min_bytes=0)
  state = jax.jit(create, out_shardings=sharding.named(specs, mesh))(key)
  fn = parallel.data_parallel(functools.partial(step_lib.train_step, model=model, tx=tx,
                                                specs=specs),
                              mesh, in_specs=(specs, P(A)), out_specs=(specs, P()))
  return state, fn


def _gather_all(monkeypatch):
  """The step as it was: every parameter gathered whole at the top of the loss."""
  monkeypatch.setattr(sharding, 'gather_on_read', sharding.gather)


def _batches(n=5, batch=16):
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(batch, *IMAGE)).astype(np.float32),
           'labels': np.eye(8, dtype=np.float32)[rng.integers(0, 8, batch)]}
          for _ in range(n)]


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


@pytest.mark.parametrize('scan', [False, True], ids=['remat', 'remat_scan'])
def test_gather_on_read_gives_the_steps_of_gather_all(scan, monkeypatch):
  mesh, model = parallel.make_mesh(), _vit(scan=scan)
  tx = optax.chain(sharding.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.05))
  batches = [parallel.shard_batch(b, mesh) for b in _batches()]
  runs = {}
  for how in ('on_read', 'all'):
    with monkeypatch.context() as m:
      if how == 'all':
        _gather_all(m)
      state, fn = _state_and_step(model, tx, mesh)
      metrics = []
      for b in batches:
        state, out = fn(state, b)
        metrics.append(jax.device_get(out))
    runs[how] = metrics, _flat(state)
  (got_m, got), (want_m, want) = runs['on_read'], runs['all']
  for g, w in zip(got_m, want_m):
    for k in ('loss', 'grad_norm'):
      np.testing.assert_allclose(g[k], w[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert got.keys() == want.keys()
  assert any('encoderblock_2' in k for k in got)  # the unrolled names, scanned or not
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_remat_temporaries_hold_a_block_of_whole_parameters_not_all(monkeypatch):
  """A ViT whose parameters outweigh its activations: gathered all at once, the whole
  parameters and their gradients are temporaries; gathered on read, about one block's.
  Scanned: unrolled, the CPU's default (concurrency-optimised) XLA scheduler starts every
  all-gather at the top of the step (scripts/benchmark.py --memory turns it off)."""
  mesh, model = parallel.make_mesh(), _vit(width=256, depth=6, scan=True)
  tx = optax.adamw(1e-3)
  batch = parallel.shard_batch(_batches(1, batch=8)[0], mesh)
  temps = {}
  for how in ('on_read', 'all'):
    with monkeypatch.context() as m:
      if how == 'all':
        _gather_all(m)
      state, fn = _state_and_step(model, tx, mesh)
      temps[how] = fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  print(f'temporaries per device: {temps}, whole parameters {param_bytes} B')
  assert temps['all'] > param_bytes
  assert temps['on_read'] < min(param_bytes / 2, temps['all'] / 3), temps
