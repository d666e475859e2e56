"""Sharded training state (imgcls.sharding, FSDP over the data axis) on 8 simulated devices:
the same steps as the replicated state, about 1/8 of its bytes per device, and checkpoints
that restore onto a mesh of another size or strategy."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from imgcls import checkpoints, optim, parallel, sharding, step as step_lib
from imgcls.errors import ConfigError
from imgcls.evaluators.base import make_eval_fn
from imgcls.models import get_model

from helpers import replicated_state, train_step_fn

A = parallel.AXIS
IMAGE = (16, 16, 3)


def _vit(**kw):
  return get_model('vit', num_classes=8, width=64, depth=2, mlp_dim=128, num_heads=4,
                   patch_size=4, **kw)


def _resnet():
  return get_model('resnet10', num_classes=8, width=8, stem='small')


def _tx(clip=None, name='adamw'):
  """imgcls's optimizer: AdamW (ViT recipes) or SGD with Nesterov momentum (ResNet recipes)."""
  c = ml_collections.ConfigDict()
  # The attention's key biases are frozen: softmax ignores a shift shared by all keys, so
  # their gradient is 0 up to rounding, which Adam would scale up to steps of size lr.
  c.optimizer = (dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8, freeze=('key/bias',))
                 if name == 'adamw' else dict(name='sgd', momentum=0.9, nesterov=True))
  c.lr = dict(base=1e-3 if name == 'adamw' else 0.1, schedule='warmup_cosine',
              warmup_steps=2, end_factor=0.0)
  c.weight_decay = 0.05 if name == 'adamw' else 1e-4
  c.weight_decay_mask = 'no_bias_norm'
  tx, _ = optim.make_optimizer(c, total_steps=10)
  # optim puts the clip first in its chain: here the optax one, or the shard-aware one.
  return tx if clip is None else optax.chain(clip, tx)


def _batches(n=5, batch=16):
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(batch, *IMAGE)).astype(np.float32),
           'labels': np.eye(8, dtype=np.float32)[rng.integers(0, 8, batch)]}
          for _ in range(n)]


def _create(model, tx):
  return functools.partial(step_lib.create_train_state, model, tx, input_shape=IMAGE, ema=True)


def fsdp_state(model, tx, mesh, min_bytes=0):
  """The seed-0 state, created directly into its shards; and its specs."""
  create, key = _create(model, tx), jax.random.PRNGKey(0)
  specs = sharding.state_specs(jax.eval_shape(create, key), mesh.size, 'fsdp', min_bytes)
  return jax.jit(create, out_shardings=sharding.named(specs, mesh))(key), specs


def fsdp_step_fn(model, tx, mesh, specs, ema_decay=0.9, **kw):
  """step.train_step on a state sharded by `specs` (a TrainState of PartitionSpecs), per device:
  the parameters are gathered inside the loss, so their gradients come back reduce-scattered
  onto the shards, which optax and the EMA update where they lie."""
  return parallel.data_parallel(
      functools.partial(step_lib.train_step, model=model, tx=tx, specs=specs,
                        ema_decay=ema_decay, **kw),
      mesh, in_specs=(specs, P(A)), out_specs=(specs, P()))


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _sharded_leaves(specs):
  return sum(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


# ------------------------------------------------------------------ the rule

def test_rule_splits_the_largest_dividing_dimension_of_large_arrays():
  f32 = jnp.float32
  assert sharding.spec_for((64, 128), f32, 8, min_bytes=0) == P(None, A)
  assert sharding.spec_for((3, 3, 16, 24), f32, 8, min_bytes=0) == P(None, None, None, A)
  assert sharding.spec_for((12, 16), f32, 8, min_bytes=0) == P(None, A)  # 12 does not divide
  assert sharding.spec_for((16, 16), f32, 8, min_bytes=0) == P(A)  # the first of equals
  assert sharding.spec_for((12, 20), f32, 8, min_bytes=0) == P()  # none divides
  assert sharding.spec_for((), jnp.int32, 8, min_bytes=0) == P()  # optax counts, the step
  assert sharding.spec_for((1024, 1024), f32, 8) == P(A)  # 4 MiB: the default threshold
  assert sharding.spec_for((1024, 1023), f32, 8) == P()  # just below it: replicated
  assert sharding.spec_for((1024, 1024), f32, 8, 'replicated') == P()
  assert sharding.spec_for((1024, 1024), f32, 1) == P()
  assert sharding.spec_for((2,), jax.random.key(0).dtype, 8, min_bytes=0) == P()
  with pytest.raises(ConfigError, match='sharding must be one of replicated, fsdp'):
    sharding.spec_for((8,), f32, 8, 'zero3')


def test_params_gradients_moments_and_ema_are_split_alike():
  model, tx = _vit(), optax.adamw(1e-3)
  state = jax.eval_shape(_create(model, tx), jax.random.PRNGKey(0))
  specs = sharding.state_specs(state, 8, 'fsdp', min_bytes=0)
  mu, nu = specs.opt_state[0].mu, specs.opt_state[0].nu
  assert mu == specs.params and nu == specs.params and specs.ema_params == specs.params
  assert specs.opt_state[0].count == P() and specs.step == P() and specs.rng == P()
  assert specs.params['head']['kernel'] == P(A)  # (64, 8): 64 is the largest
  assert _sharded_leaves(specs.params) > len(jax.tree.leaves(specs.params)) // 2


# ------------------------------------------------- five steps, fsdp = replicated

# SGD for the ResNet, as its recipes: behind its zero-initialised last BatchNorm scales the
# first gradients are near 0, where Adam magnifies the rounding of any summation order.
@pytest.mark.parametrize('make_model,opt', [(_vit, 'adamw'), (_resnet, 'sgd')],
                         ids=['vit_adamw', 'resnet_bn_sgd'])
def test_five_fsdp_steps_equal_five_replicated_steps(make_model, opt):
  mesh, model = parallel.make_mesh(), make_model()
  batches = [parallel.shard_batch(b, mesh) for b in _batches()]

  tx = _tx(optax.clip_by_global_norm(0.5), opt)
  ref = replicated_state(model, tx, mesh, IMAGE, ema=True)
  ref_fn = train_step_fn(mesh, model=model, tx=tx, ema_decay=0.9)
  ref_metrics = []
  for b in batches:
    ref, m = ref_fn(ref, b)
    ref_metrics.append(jax.device_get(m))

  tx = _tx(sharding.clip_by_global_norm(0.5), opt)
  state, specs = fsdp_state(model, tx, mesh)
  assert _sharded_leaves(specs.params) >= 4
  fn = fsdp_step_fn(model, tx, mesh, specs)
  for b, r in zip(batches, ref_metrics):
    state, m = fn(state, b)
    np.testing.assert_allclose(m['loss'], r['loss'], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m['grad_norm'], r['grad_norm'], rtol=1e-6, atol=1e-6)
  assert any(r['grad_norm'] > 0.5 for r in ref_metrics)  # the clip acted

  kernel = state.params['head']['kernel']
  assert kernel.sharding.spec == specs.params['head']['kernel'] != P()
  assert kernel.addressable_shards[0].data.shape[0] * 8 == kernel.shape[0]
  got, want = _flat(state), _flat(ref)
  assert got.keys() == want.keys()
  assert any('batch_stats' in k for k in got) == (make_model is _resnet)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
  host = _flat(parallel.to_host(state))  # whole arrays from the shards (model_init, logs)
  assert all(np.array_equal(host[k], got[k]) for k in got)

  # The evaluators' step takes the sharded state as it is: jit gathers what shard_map's
  # replicated in_specs ask for.
  evaluate = make_eval_fn(model, 'softmax_xent', mesh)
  batch = parallel.shard_batch(dict(_batches(1)[0], mask=np.ones(16, np.float32)), mesh)
  sums, ref_sums = evaluate(state, batch)[0], evaluate(ref, batch)[0]
  for k in ref_sums:
    np.testing.assert_allclose(sums[k], ref_sums[k], rtol=1e-6, err_msg=k)


# ---------------------------------------------------------- bytes per device

def _state_bytes_per_device(state):
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
             if s.device == device)


def test_fsdp_holds_an_eighth_of_the_state_per_device():
  mesh = parallel.make_mesh()
  model = get_model('vit', num_classes=8, width=128, depth=2, mlp_dim=512, num_heads=4,
                    patch_size=4)
  tx = _tx()
  min_bytes = 2**12  # every kernel and embedding (8 KiB or more) split; biases and norms whole
  state, specs = fsdp_state(model, tx, mesh, min_bytes)
  ref = replicated_state(model, tx, mesh, IMAGE, ema=True)
  assert specs.params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['bias'] == P()
  fsdp_bytes, ref_bytes = _state_bytes_per_device(state), _state_bytes_per_device(ref)
  assert ref_bytes == sum(x.nbytes for x in jax.tree.leaves(ref))
  print(f'state per device: fsdp {fsdp_bytes} B, replicated {ref_bytes} B')
  assert fsdp_bytes < ref_bytes / 7

  # XLA's view of the compiled steps: the arguments are the state and this device's batch.
  batch = parallel.shard_batch(_batches(1)[0], mesh)
  args = {}
  for name, fn, s in (('fsdp', fsdp_step_fn(model, tx, mesh, specs), state),
                      ('replicated', train_step_fn(mesh, model=model, tx=tx, ema_decay=0.9),
                       ref)):
    args[name] = fn.lower(s, batch).compile().memory_analysis().argument_size_in_bytes
  print(f'XLA argument bytes per device: {args}')
  assert args['replicated'] >= ref_bytes
  assert args['fsdp'] < args['replicated'] / 7, args


# ------------------------------------------------- checkpoints across meshes

@pytest.fixture(scope='module')
def saved_on_8(tmp_path_factory):
  """(workdir, state): a ResNet's fsdp state after one step on 8 devices, checkpointed."""
  mesh8, model, tx = parallel.make_mesh(), _resnet(), _tx()
  state, specs = fsdp_state(model, tx, mesh8)
  state, _ = fsdp_step_fn(model, tx, mesh8, specs)(state,
                                                   parallel.shard_batch(_batches(1)[0], mesh8))
  workdir = tmp_path_factory.mktemp('fsdp_ckpt')
  saver = checkpoints.Checkpointer(str(workdir), asynchronous=False)
  saver.save(1, state, {'note': 'fsdp on 8'})
  saver.close()
  return workdir, state


@pytest.mark.parametrize('devices,strategy', [(4, 'fsdp'), (1, 'fsdp'), (8, 'replicated')])
def test_checkpoint_of_8_sharded_devices_restores_onto_another_mesh(saved_on_8, devices,
                                                                     strategy):
  (workdir, state), model, tx = saved_on_8, _resnet(), _tx()
  mesh = parallel.make_mesh(jax.devices()[:devices])
  shapes = jax.eval_shape(_create(model, tx), jax.random.PRNGKey(0))
  target = sharding.abstract_state_with_shardings(shapes, mesh, strategy, min_bytes=0)
  reader = checkpoints.Checkpointer(str(workdir), asynchronous=False, read_only=True)
  restored = reader.restore(1, target)
  reader.close()

  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  sharded = restored.params['head']['kernel'].sharding.spec
  assert sharded == (P(A) if strategy == 'fsdp' and devices > 1 else P())
  got, want = _flat(restored), _flat(state)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------- skipping non-finite updates

def test_all_finite_and_global_norm_see_every_shard():
  mesh = parallel.make_mesh()
  x = np.arange(16, dtype=np.float32)

  def per_device(shards, whole):
    tree = {'shards': shards, 'whole': whole}
    return sharding.all_finite(tree), sharding.global_norm(tree)

  fn = parallel.data_parallel(per_device, mesh, in_specs=(P(A), P()), out_specs=(P(), P()))
  finite, norm = fn(x, np.ones(3, np.float32))
  assert bool(finite)
  np.testing.assert_allclose(norm, np.sqrt(np.sum(x ** 2) + 3), rtol=1e-6)
  assert not bool(fn(np.where(x == 13, np.nan, x), np.ones(3, np.float32))[0])  # one device's
  assert not bool(fn(x, np.array([1, np.inf, 1], np.float32))[0])


def test_skipped_nonfinite_update_under_fsdp_equals_replicated():
  mesh, model = parallel.make_mesh(), _vit()
  good = _batches(2)
  bad = dict(good[0], labels=np.where(np.arange(16)[:, None] == 5, np.nan, good[0]['labels']))
  batches = [parallel.shard_batch(b, mesh) for b in (good[0], bad, good[1])]

  tx = optax.apply_if_finite(_tx(), 2)
  ref = replicated_state(model, tx, mesh, IMAGE, ema=True)
  ref_fn = train_step_fn(mesh, model=model, tx=tx, ema_decay=0.9, skip_nonfinite_steps=2)
  tx = sharding.apply_if_finite(_tx(), 2)
  state, specs = fsdp_state(model, tx, mesh)
  fn = fsdp_step_fn(model, tx, mesh, specs, skip_nonfinite_steps=2)
  for i, b in enumerate(batches):
    ref, r = ref_fn(ref, b)
    state, m = fn(state, b)
    assert int(r['skipped']) == (i == 1)
    assert int(step_lib.skipped_update(state.opt_state, 2)) == (i == 1)
    np.testing.assert_allclose(m['loss'], r['loss'], rtol=1e-6)
    got, want = _flat(state), _flat(ref)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


# ------------------------------------------- the run: train_and_evaluate, config.sharding

def _run_config(tiny_config, data_dir, model, strategy):
  c = tiny_config(data_dir, total_steps=5, eval_every_steps=5, log_every_steps=1,
                  sharding=strategy, sharding_min_bytes=0, ema_decay=0.9, grad_clip_norm=1.0)
  if model == 'vit':  # AdamW, key biases frozen (see _tx)
    c.model = ml_collections.ConfigDict(dict(name='vit', width=64, depth=2, mlp_dim=128,
                                             num_heads=4, patch_size=4))
    c.optimizer.name, c.optimizer.freeze, c.lr.base = 'adamw', ('key/bias',), 1e-3
  else:  # the ResNet also accumulates 2 microbatches and may skip non-finite updates
    c.grad_accum_steps, c.skip_nonfinite_steps = 2, 2
  return c


@pytest.mark.parametrize('model', ['vit', 'resnet'])
def test_five_fsdp_steps_of_train_and_evaluate_equal_replicated(model, tiny_config, data_dir,
                                                                tmp_path):
  from imgcls import compare, train  # pylint: disable=g-import-not-at-top
  runs = {}
  for strategy in ('replicated', 'fsdp'):
    workdir = str(tmp_path / strategy)
    result = train.train_and_evaluate(_run_config(tiny_config, data_dir, model, strategy),
                                      workdir)
    weights = checkpoints.find(workdir, 'latest').weights('raw')
    runs[strategy] = result, compare.read_metrics(workdir), _flat(weights)
  (r_res, r_log, r_w), (f_res, f_log, f_w) = runs['replicated'], runs['fsdp']
  assert [r['step'] for r in f_log if 'train_loss' in r] == [1, 2, 3, 4, 5]
  for r, f in zip(r_log, f_log):
    for k in ('train_loss', 'train_grad_norm', 'eval_loss'):
      if k in r:
        np.testing.assert_allclose(f[k], r[k], rtol=1e-6, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(f_res['loss'], r_res['loss'], rtol=1e-6, atol=1e-6)
  assert f_w.keys() == r_w.keys()
  for k in r_w:
    np.testing.assert_allclose(f_w[k], r_w[k], rtol=1e-6, atol=1e-6, err_msg=k)
