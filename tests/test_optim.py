"""Tests for the optimizer and learning-rate schedules built from a config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imgcls import models, optim


def _config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({
      'optimizer': {'name': 'sgd', 'momentum': 0.9, 'nesterov': True,
                    'b1': 0.9, 'b2': 0.999, 'eps': 1e-8},
      'lr': {'base': 0.1, 'schedule': 'warmup_cosine', 'warmup_steps': 10, 'end_factor': 0.0},
      'weight_decay': 0.0, 'weight_decay_mask': 'no_bias_norm', 'grad_clip_norm': 0.0})
  c.update_from_flattened_dict(overrides)
  return c


def _step(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


@pytest.mark.parametrize('schedule,end_factor,mid,end', [
    ('warmup_cosine', 0.0, 0.05, 0.0),
    ('warmup_cosine', 0.1, 0.055, 0.01),
    ('warmup_linear', 0.0, 0.05, 0.0),
    ('constant', 0.0, 0.1, 0.1),
])
def test_schedule_values(schedule, end_factor, mid, end):
  cfg = _config(**{'lr.schedule': schedule, 'lr.end_factor': end_factor})
  _, sched = optim.make_optimizer(cfg, total_steps=110)
  for step, want in [(0, 0.0), (5, 0.05), (10, 0.1), (60, mid), (110, end), (200, end)]:
    np.testing.assert_allclose(sched(step), want, atol=1e-7, err_msg=f'step {step}')


def test_schedule_without_warmup_starts_at_base():
  _, sched = optim.make_optimizer(_config(**{'lr.warmup_steps': 0}), total_steps=100)
  np.testing.assert_allclose(sched(0), 0.1)
  np.testing.assert_allclose(sched(50), 0.05, atol=1e-7)


def test_decay_mask_excludes_biases_and_batchnorm():
  model = models.get_model('resnet18', num_classes=10, width=8)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']
  mask = optim.decay_mask(params)
  assert mask['head'] == {'kernel': True, 'bias': False}
  assert mask['bn_init'] == {'scale': False, 'bias': False}
  assert mask['conv_init']['kernel'] and mask['stage2_block1']['proj_conv']['kernel']
  assert not any(mask['stage2_block1']['proj_bn'].values())
  flat = jax.tree_util.tree_leaves_with_path(mask)
  for path, decayed in flat:
    assert decayed == (jax.tree_util.keystr(path).endswith("['kernel']")), path


def test_clipping_caps_update_norm():
  cfg = _config(**{'optimizer.momentum': 0.0, 'lr.schedule': 'constant', 'lr.warmup_steps': 0,
                   'lr.base': 1.0, 'grad_clip_norm': 1.0})
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}
  grads = {'w': jnp.full((3, 4), 10.0), 'b': jnp.full(4, -10.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)
  small = jax.tree.map(lambda g: g * 1e-3, grads)  # under the cap: untouched
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), optax.tree.norm(small), rtol=1e-6)


@pytest.mark.parametrize('nesterov', [False, True])
def test_sgd_momentum_two_steps_on_quadratic(nesterov):
  # f(p) = a/2 * p^2 -> grad a*p; torch-style L2: g += wd * p before momentum.
  a, lr, m, wd = 2.0, 0.1, 0.9, 0.01
  cfg = _config(**{'optimizer.nesterov': nesterov, 'lr.schedule': 'constant',
                   'lr.warmup_steps': 0, 'lr.base': lr, 'weight_decay': wd})
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  p = {'kernel': jnp.ones((1, 1))}  # a kernel: decayed
  state = tx.init(p)
  for _ in range(2):
    updates, state = tx.update({'kernel': a * p['kernel']}, state, p)
    p = optax.apply_updates(p, updates)

  w, buf = 1.0, 0.0
  for _ in range(2):
    g = a * w + wd * w
    buf = m * buf + g
    w -= lr * (g + m * buf if nesterov else buf)
  np.testing.assert_allclose(p['kernel'][0, 0], w, rtol=1e-6)
  # Hand values for the plain-momentum case: 1 - 0.1*2.01 = 0.799; g = 1.60599;
  # buf = 1.809 + 1.60599 = 3.41499; w = 0.799 - 0.341499 = 0.457501.
  if not nesterov:
    np.testing.assert_allclose(p['kernel'][0, 0], 0.457501, rtol=1e-6)


@pytest.mark.parametrize('mask,bias_after', [('no_bias_norm', 1.0), ('all', 0.95)])
def test_adamw_decay_respects_mask(mask, bias_after):
  cfg = _config(**{'optimizer.name': 'adamw', 'lr.schedule': 'constant', 'lr.warmup_steps': 0,
                   'weight_decay': 0.5, 'weight_decay_mask': mask})
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}
  new = _step(tx, params, jax.tree.map(jnp.zeros_like, params))
  np.testing.assert_allclose(new['kernel'], 0.95, rtol=1e-6)  # 1 - lr * wd = 1 - 0.1 * 0.5
  np.testing.assert_allclose(new['bias'], bias_after, rtol=1e-6)


def test_sgd_decay_respects_mask():
  cfg = _config(**{'optimizer.momentum': 0.0, 'lr.schedule': 'constant', 'lr.warmup_steps': 0,
                   'weight_decay': 0.5})
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}
  new = _step(tx, params, jax.tree.map(jnp.zeros_like, params))
  np.testing.assert_allclose(new['kernel'], 0.95, rtol=1e-6)
  np.testing.assert_allclose(new['bias'], 1.0)


@pytest.mark.parametrize('key,value,match', [
    ('optimizer.name', 'lamb', "optimizer.name 'lamb'"),
    ('lr.schedule', 'step', "lr.schedule 'step'"),
    ('weight_decay_mask', 'none', "weight_decay_mask 'none'"),
])
def test_unknown_names_raise(key, value, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_config(**{key: value}), total_steps=100)


def test_warmup_longer_than_training_only_warms_up():
  _, sched = optim.make_optimizer(_config(), total_steps=1)  # as when restoring for eval
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.05, 0.1], atol=1e-7)


def test_decay_mask_spares_vit_biases_and_embeddings():
  params = {'embedding': {'kernel': np.zeros((4, 4, 1, 8)), 'bias': np.zeros(8)},
            'cls': np.zeros((1, 1, 8)),
            'Transformer': {'posembed_input': {'pos_embedding': np.zeros((1, 5, 8))},
                            'encoderblock_0': {'MultiHeadDotProductAttention_1': {
                                'query': {'kernel': np.zeros((8, 2, 4)),
                                          'bias': np.zeros((2, 4))}}}},
            'head': {'kernel': np.zeros((8, 3)), 'bias': np.zeros(3)}}
  mask = optim.decay_mask(params)
  attn = mask['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['query']
  assert mask['embedding']['kernel'] and attn['kernel'] and mask['head']['kernel']
  assert not (attn['bias'] or mask['cls'] or mask['embedding']['bias'] or mask['head']['bias']
              or mask['Transformer']['posembed_input']['pos_embedding'])


def _tiny_vit_params(depth=2):
  model = models.get_model('vit', num_classes=3, width=16, depth=depth, mlp_dim=32, num_heads=2,
                           patch_size=4)
  return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']


def _ones_like(tree):
  return jax.tree.map(jnp.ones_like, tree)


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_frozen_parameters_are_not_updated_and_have_no_state(name):
  params = _tiny_vit_params()
  cfg = _config(**{'optimizer.name': name, 'weight_decay': 0.1, 'lr.warmup_steps': 0,
                   'grad_clip_norm': 1.0})
  cfg.optimizer.freeze = (r'^embedding/', r'encoderblock_0/')
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  state = tx.init(params)
  updates, _ = tx.update(_ones_like(params), state, params)
  new = optax.apply_updates(params, updates)
  flat_old = {optim.param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  flat_new = {optim.param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(new)}
  for path, old in flat_old.items():
    frozen = path.startswith('embedding/') or 'encoderblock_0/' in path
    assert np.array_equal(flat_new[path], old) == frozen, path
  # Optimizer state only for the trainable parameters (SGD: momentum; Adam: mu and nu).
  trainable = sum(x.size for p, x in flat_old.items()
                  if not (p.startswith('embedding/') or 'encoderblock_0/' in p))
  stored = sum(x.size for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)
  assert stored == trainable * (1 if name == 'sgd' else 2)


def test_lr_and_wd_multipliers_and_vit_layer_decay():
  params = _tiny_vit_params(depth=2)
  cfg = _config(**{'optimizer.momentum': 0.0, 'lr.warmup_steps': 0, 'lr.schedule': 'constant',
                   'weight_decay': 0.0})
  plain, _ = optim.make_optimizer(cfg, total_steps=10)
  grads = _ones_like(params)
  base = plain.update(grads, plain.init(params), params)[0]
  cfg.optimizer.lr_mults = (('^head/', 10.0),)
  cfg.optimizer.layer_decay = 0.5
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  scaled = tx.update(grads, tx.init(params), params)[0]
  ratio = lambda *keys: float(_get(scaled, keys).ravel()[0] / _get(base, keys).ravel()[0])  # noqa
  assert ratio('head', 'kernel') == pytest.approx(10.0)  # after the encoder: decay ** 0
  assert ratio('Transformer', 'encoder_norm', 'scale') == pytest.approx(1.0)
  assert ratio('Transformer', 'encoderblock_1', 'LayerNorm_0', 'scale') == pytest.approx(0.5)
  assert ratio('Transformer', 'encoderblock_0', 'LayerNorm_0', 'scale') == pytest.approx(0.25)
  assert ratio('embedding', 'kernel') == pytest.approx(0.125)
  assert ratio('cls') == pytest.approx(0.125)
  # wd_mults: no decay on the head kernel, double on the first block's MLP.
  cfg = _config(**{'optimizer.momentum': 0.0, 'lr.warmup_steps': 0, 'lr.schedule': 'constant',
                   'weight_decay': 0.5})
  cfg.optimizer.wd_mults = (('^head/', 0.0), ('encoderblock_0/MlpBlock', 2.0))
  tx, _ = optim.make_optimizer(cfg, total_steps=10)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd = tx.update(zero, tx.init(params), params)[0]
  assert np.all(upd['head']['kernel'] == 0)
  mlp = ('Transformer', 'encoderblock_0', 'MlpBlock_3', 'Dense_0', 'kernel')
  blk1 = ('Transformer', 'encoderblock_1', 'MlpBlock_3', 'Dense_0', 'kernel')
  np.testing.assert_allclose(_get(upd, mlp), -0.1 * 0.5 * 2.0 * _get(params, mlp), rtol=1e-6)
  np.testing.assert_allclose(_get(upd, blk1), -0.1 * 0.5 * _get(params, blk1), rtol=1e-6)


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_rules_that_match_nothing_are_config_errors():
  from imgcls.config import ConfigError
  params = _tiny_vit_params()
  opt = _config().optimizer
  opt.freeze = ('encoderblok_0',)  # typo
  with pytest.raises(ConfigError, match="'encoderblok_0' matches no parameter"):
    optim.Rules(opt).check(params)
  opt.freeze = ('.',)
  with pytest.raises(ConfigError, match='every parameter'):
    optim.Rules(opt).check(params)
  opt.freeze = ()
  opt.lr_mults = (('head', 'ten'),)
  with pytest.raises(ConfigError, match='pairs'):
    optim.Rules(opt)
  opt.lr_mults = ()
  opt.layer_decay = 0.75
  resnet = models.get_model('resnet10', num_classes=2, width=4).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  with pytest.raises(ConfigError, match='needs a ViT'):
    optim.Rules(opt).check(resnet)


def test_warmup_step_schedule_is_bit_hyperrule():
  cfg = _config(**{'lr.schedule': 'warmup_step', 'lr.warmup_steps': 10})
  cfg.lr.decay_boundaries = (0.3, 0.6, 0.9)
  cfg.lr.decay_factor = 0.1
  _, sched = optim.make_optimizer(cfg, total_steps=110)
  values = [float(sched(s)) for s in (5, 10, 39, 40, 70, 100, 110)]
  np.testing.assert_allclose(values, [0.05, 0.1, 0.1, 0.01, 0.001, 0.0001, 0.0001], rtol=1e-5)


def _official_convnext_layer(var_name):
  """facebookresearch/ConvNeXt's optim_factory.get_num_layer_for_convnext, on its own names."""
  if var_name.startswith('downsample_layers'):
    stage = int(var_name.split('.')[1])
    return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
  if var_name.startswith('stages'):
    stage, block = (int(x) for x in var_name.split('.')[1:3])
    return stage + 1 if stage < 2 else 3 + block // 3 if stage == 2 else 12
  return 13


def _official_name(path):
  """imgcls's ConvNeXt path as the official code names it (stem = downsample_layers.0)."""
  head, _, _ = path.partition('/')
  if head.startswith('stem_'):
    return 'downsample_layers.0'
  if '_down_' in head:
    return f'downsample_layers.{int(head[5:head.index("_")]) - 1}'
  if '_block' in head:
    stage, block = head[5:].split('_block')
    return f'stages.{int(stage) - 1}.{int(block) - 1}'
  return 'head'


def test_convnext_layer_decay_follows_the_official_groups_for_convnext_base():
  """Every parameter of a convnext_base (stage 3: 27 blocks) gets the official layer id; the
  ids come from the paths, not from a depth a recipe assumed."""
  params = jax.eval_shape(lambda: models.get_model('convnext_base', num_classes=3).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params']
  paths = [optim.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  ids, top = optim.layer_ids(paths)
  assert top == 13 and sorted(ids) == sorted(paths)
  for path in paths:
    assert ids[path] == _official_convnext_layer(_official_name(path)), path
  stage3 = {b: ids[f'stage3_block{b}/fc1/kernel'] for b in range(1, 28)}
  assert stage3 == {b: 3 + (b - 1) // 3 for b in range(1, 28)}  # 3, 3, 3, 4, ..., 11, 11, 11
  assert ids['stem_conv/kernel'] == 0 and ids['stage3_down_conv/kernel'] == 3
  assert ids['stage4_block3/layer_scale'] == ids['stage4_down_norm/scale'] == 12
  assert ids['head/kernel'] == ids['head_norm/scale'] == 13
  rules = optim.Rules(ml_collections.ConfigDict({'name': 'adamw', 'layer_decay': 0.8}))
  rules.check(params)
  mults = rules.lr_mults(params)
  assert mults['stage3_block27']['conv_dw']['bias'] == pytest.approx(0.8 ** 2)
  assert mults['stem_norm']['scale'] == pytest.approx(0.8 ** 13) and mults['head']['bias'] == 1


def test_resnet_paths_are_not_taken_for_convnext_and_optim_imports_no_model_family():
  """ResNet's blocks are stage{s}_block{b} too: no layer ids. imgcls.optim imports no model
  family at module level (a ResNet run must not load the ViT or ConvNeXt code)."""
  import ast  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  assert optim.layer_ids(['conv_init/kernel', 'stage1_block1/conv1/kernel', 'head/kernel']) is None
  tree = ast.parse(pathlib.Path(optim.__file__).read_text())
  top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
  names = [a.name for n in top for a in n.names] + [
      n.module or '' for n in top if isinstance(n, ast.ImportFrom)]
  assert not [n for n in names if n.startswith('imgcls.models') or n in ('vit', 'convnext')]
