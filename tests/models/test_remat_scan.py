"""model.remat and model.scan change memory and compile time, never values or parameter names:
remat policies give the loss and gradients of no remat; a scanned ViT equals the unrolled one
and loads the same weight files (a timm fixture, and the official .npz written back)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import models
from imgcls.errors import ConfigError
from imgcls.models import bit, convnext, layers, resnet, weights

FIXTURES = pathlib.Path(__file__).parents[1] / 'fixtures' / 'timm'
POLICIES = [p for p in layers.REMAT_POLICIES if layers.REMAT_POLICIES[p] is not None]
VIT = dict(num_classes=5, width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=4)

TINY = {
    'vit': (lambda **kw: models.get_model('vit', **VIT, **kw), 16),
    'resnet': (lambda **kw: resnet.ResNet(stage_sizes=(1, 2), block=resnet.BasicBlock,
                                          num_classes=5, width=8, stem='small',
                                          bn_axis_name=None, **kw), 16),
    'convnext': (lambda **kw: convnext.ConvNeXt(num_classes=5, depths=(1, 2), dims=(8, 16),
                                                **kw), 16),
    'bit': (lambda **kw: bit.ResNetV2(stage_sizes=(1, 1), width=8, num_groups=4, num_classes=5,
                                      **kw), 32),
}


def _loss_and_grads(model, variables, x, y):
  """Train-mode loss and parameter gradients (BatchNorm statistics updated as in training)."""
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def loss(params):
    logits, _ = model.apply({'params': params, **rest}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.mean((logits - y) ** 2)
  return jax.jit(jax.value_and_grad(loss))(variables['params'])


def _max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))


@pytest.mark.parametrize('family', sorted(TINY))
def test_remat_policies_keep_loss_grads_and_param_names(family):
  make, size = TINY[family]
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  y = jax.random.normal(jax.random.key(2), (4, 5))
  plain = make()
  variables = plain.init(jax.random.key(0), x)
  variables = {**variables, 'params': jax.tree.map(lambda p: p + 0.01, variables['params'])}
  loss, grads = _loss_and_grads(plain, variables, x, y)
  shapes = jax.tree.map(jnp.shape, variables)
  for policy in POLICIES:
    model = make(remat=policy)
    assert jax.tree.map(jnp.shape, model.init(jax.random.key(0), x)) == shapes, policy
    loss_r, grads_r = _loss_and_grads(model, variables, x, y)
    assert abs(float(loss_r - loss)) <= 1e-6, policy
    assert _max_diff(grads, grads_r) <= 1e-6, (policy, _max_diff(grads, grads_r))


def test_bad_remat_is_one_line_listing_the_policies():
  for name in ('vit', 'resnet18', 'convnext_atto', 'bit_r50x1'):
    with pytest.raises(ConfigError) as e:
      models.get_model(name, remat='dots')
    message = str(e.value)
    assert '\n' not in message and "'dots'" in message
    assert all(repr(p) in message for p in layers.REMAT_POLICIES)


@pytest.mark.parametrize('remat', ['', 'nothing_saveable'])
def test_scanned_vit_equals_unrolled(remat):
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  y = jax.random.normal(jax.random.key(2), (2, 5))
  unrolled = models.get_model('vit', **VIT)
  scanned = models.get_model('vit', scan=True, remat=remat, **VIT)
  variables = unrolled.init(jax.random.key(0), x)
  variables = {'params': jax.tree.map(lambda p: p + 0.01, variables['params'])}
  # the same parameter tree (unrolled names) from either model's init
  assert (jax.tree.map(jnp.shape, scanned.init(jax.random.key(0), x)) ==
          jax.tree.map(jnp.shape, variables))
  assert 'encoderblock_2' in variables['params']['Transformer']
  np.testing.assert_allclose(scanned.apply(variables, x), unrolled.apply(variables, x),
                             rtol=0, atol=1e-5)
  (loss, grads), (loss_s, grads_s) = (_loss_and_grads(m, variables, x, y)
                                      for m in (unrolled, scanned))
  assert abs(float(loss - loss_s)) <= 1e-5
  assert _max_diff(grads, grads_s) <= 1e-5


def test_scanned_vit_trains_with_per_layer_stochastic_depth():
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  model = models.get_model('vit', scan=True, stoch_depth=0.5, head_zero_init=False,
                           **VIT)
  variables = model.init(jax.random.key(0), x)
  out = [model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(k)})
         for k in range(2)]
  assert all(np.isfinite(o).all() for o in out)
  assert not np.allclose(out[0], out[1])  # the masks depend on the dropout rng
  np.testing.assert_allclose(model.apply(variables, x), model.apply(variables, x, train=False))


def test_scanned_vit_loads_the_same_weight_files(tmp_path):
  with np.load(FIXTURES / 'vit_tok.npz') as f:
    sd = {k.removeprefix('sd/'): f[k] for k in f.files if k.startswith('sd/')}
    x, expected = f['input'], f['logits']
    config = json.loads(str(f['config']))
  assert config  # the fixture's model: tests/test_parity.py's VIT
  kw = dict(num_classes=7, width=48, depth=2, mlp_dim=192, num_heads=3, patch_size=8,
            approximate_gelu=False, pool='tok')
  scanned = models.get_model('vit', scan=True, **kw)
  template = jax.eval_shape(scanned.init, jax.random.key(0), x[:1])
  variables, report = weights.load_pretrained(sd, template, fmt='timm_vit')
  assert report.ok() and not report.reinitialised
  logits = np.asarray(jax.jit(scanned.apply)(variables, x))
  assert np.max(np.abs(logits - expected)) <= 2e-5
  # its weights export and load back unchanged, into a scanned or an unrolled model
  path = tmp_path / 'vit.npz'
  assert weights.export(variables, path) == 'vit_npz'
  unrolled = models.get_model('vit', **kw)
  for model in (scanned, unrolled):
    loaded, report = weights.load_pretrained(path, jax.eval_shape(model.init, jax.random.key(0),
                                                                  x[:1]))
    assert report.ok()
    np.testing.assert_allclose(model.apply(loaded, x), logits, rtol=0, atol=1e-5)
