"""Imbalance in training and eval: the real train step's class-weighted / logit-adjusted loss
equals imbalance.py's functions, post-hoc adjustment with a uniform prior changes no
prediction in the eval path, config errors are one line, and a tiny run uses them all."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imgcls import config as config_lib, models, optim, parallel, step, train
from imgcls.errors import ConfigError
from imgcls.evaluators import base, imbalance

COUNTS = np.array([50, 20, 8, 2])


def _setup(tiny_config, **imb):
  cfg = tiny_config('/nonexistent', label_smoothing=0.0)
  for k, v in imb.items():
    cfg.imbalance[k] = v
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = models.from_config(cfg)
  tx, _ = optim.make_optimizer(cfg, 10)
  state = train.init_state(model, tx, 0, (16, 16, 1), mesh)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 16)
  batch = {'image': rng.normal(size=(16, 16, 16, 1)).astype(np.float32),
           'labels': np.eye(4, dtype=np.float32)[labels]}
  return cfg, mesh, model, tx, state, batch, labels


def _train_loss(cfg, mesh, model, tx, state, batch):
  fn = train.make_train_fn(cfg, model, tx, mesh, donate=False, class_counts=COUNTS)
  _, metrics = fn(state, parallel.shard_batch(batch, mesh))
  # The same logits the step saw: train mode, this batch's BatchNorm statistics.
  def apply(state, images):
    return model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                       train=True, mutable=['batch_stats'])[0]
  logits = parallel.data_parallel(apply, mesh, in_specs=(P(), P(parallel.AXIS)),
                                  out_specs=P(parallel.AXIS))(state, batch['image'])
  return float(metrics['loss']), np.asarray(logits)


@pytest.mark.parametrize('imb', [
    dict(logit_adjust_tau=1.0),
    dict(logit_adjust_tau=0.5),
    dict(class_weights='balanced'),
    dict(class_weights='effective_number', class_weights_beta=0.9),
    dict(class_weights=(1.0, 2.0, 0.5, 3.0)),
])
def test_train_step_loss_equals_imbalance_functions(tiny_config, imb):
  cfg, mesh, model, tx, state, batch, labels = _setup(tiny_config, **imb)
  loss, logits = _train_loss(cfg, mesh, model, tx, state, batch)
  if 'logit_adjust_tau' in imb:
    want = imbalance.logit_adjusted_xent(logits, labels, imbalance.log_prior(COUNTS),
                                         imb['logit_adjust_tau'])
  else:
    w = imbalance.class_weights(COUNTS, cfg.imbalance.class_weights,
                                cfg.imbalance.class_weights_beta)
    want = imbalance.class_weighted_xent(logits, labels, w)
  np.testing.assert_allclose(loss, float(np.mean(want)), rtol=2e-5)
  plain, _ = _train_loss(*_setup(tiny_config)[:6])
  assert abs(plain - loss) > 1e-4  # the options did change the loss


def test_loss_fn_for_with_label_smoothing_and_both_options():
  logits = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1]]
  lp, w = imbalance.log_prior(COUNTS), imbalance.class_weights(COUNTS)
  fn = step.loss_fn_for('softmax_xent', log_prior=lp, logit_adjust_tau=1.0, class_weights=w)
  smooth = labels * 0.9 + 0.1 / 4
  want = imbalance.logit_adjusted_xent(logits, smooth, lp) * (smooth @ w)
  np.testing.assert_allclose(fn(logits, labels, 0.1), want, rtol=1e-6)
  assert step.loss_fn_for('softmax_xent') is step.softmax_xent


def test_posthoc_with_uniform_prior_changes_no_prediction_in_the_eval_step(tiny_config):
  cfg, mesh, model, _, state, batch, _ = _setup(tiny_config, posthoc_tau=1.0)
  offset = base.posthoc_logit_offset(cfg, None, counts=np.full(4, 25))
  assert offset is not None and np.ptp(offset) == 0
  batch = dict(batch, mask=np.ones(16, np.float32))
  batch = parallel.shard_batch(batch, mesh)
  plain = base.make_eval_fn(model, 'softmax_xent', mesh)(state, batch)
  adjusted = base.make_eval_fn(model, 'softmax_xent', mesh, logit_offset=offset)(state, batch)
  np.testing.assert_array_equal(np.argmax(plain[1]['probs'], -1),
                                np.argmax(adjusted[1]['probs'], -1))
  np.testing.assert_allclose(plain[1]['probs'], adjusted[1]['probs'], atol=1e-6)
  assert float(plain[0]['top1']) == float(adjusted[0]['top1'])
  # A skewed prior moves predictions towards the rare classes.
  skewed = base.make_eval_fn(model, 'softmax_xent', mesh,
                             logit_offset=base.posthoc_logit_offset(cfg, None, COUNTS))
  rare = np.asarray(skewed(state, batch)[1]['probs'])[:, 3]
  assert np.all(rare >= np.asarray(plain[1]['probs'])[:, 3] - 1e-6)
  cfg.imbalance.posthoc_tau = 0.0
  assert base.posthoc_logit_offset(cfg, None) is None


@pytest.mark.parametrize('key, value, message', [
    ('dataset.sampling', 'stratified', 'dataset.sampling must be one of uniform, balanced'),
    ('dataset.imbalance_ratio', 0.5, 'dataset.imbalance_ratio must be >= 1'),
    ('imbalance.class_weights', 'balance', "Did you mean 'balanced'"),
    ('imbalance.class_weights', (1.0, 2.0), '10 non-negative numbers'),
    ('imbalance.class_weights', (1.0,) * 9 + (-1.0,), '10 non-negative numbers'),
    ('imbalance.class_weights_beta', 1.0, 'class_weights_beta must be in [0, 1)'),
    ('imbalance.logit_adjust_tau', -1.0, 'logit_adjust_tau must be >= 0'),
    ('imbalance.posthoc_tau', -0.5, 'posthoc_tau must be >= 0'),
])
def test_bad_values_give_one_line_errors(key, value, message):
  cfg = config_lib.defaults()
  group, field = key.split('.')
  cfg[group][field] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  lines = [l for l in str(e.value).splitlines() if l.startswith('  - ')]
  assert len(lines) == 1 and message in lines[0], str(e.value)


def test_imbalance_options_need_a_single_label_loss():
  cfg = config_lib.defaults()
  cfg.loss = 'sigmoid_xent'
  cfg.imbalance.logit_adjust_tau = 1.0
  with pytest.raises(ConfigError, match="need loss='softmax_xent'"):
    config_lib.validate(cfg)


def test_tiny_run_with_every_option_keeps_the_counts(tiny_config, data_dir, tmp_path):
  cfg = tiny_config(data_dir, total_steps=4, eval_every_steps=4)
  cfg.dataset.sampling = 'balanced'
  cfg.imbalance.logit_adjust_tau = 1.0
  cfg.imbalance.class_weights = 'effective_number'
  cfg.imbalance.posthoc_tau = 1.0
  result = train.train_and_evaluate(cfg, str(tmp_path))
  assert np.isfinite(result['loss'])
  saved = json.loads((tmp_path / 'class_counts.json').read_text())
  assert saved['split'] == 'train' and sum(saved['counts']) == 160
  from imgcls.data import label_counts  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(label_counts.load(str(tmp_path)), saved['counts'])
  from imgcls import checkpoints  # pylint: disable=g-import-not-at-top
  step_dirs = [p for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert step_dirs and all(checkpoints.read_meta(d)['class_counts'] == saved['counts']
                           for d in step_dirs)
  # imgcls.load applies the run's post-hoc adjustment: probabilities are the softmax of
  # logits - tau * log(prior), as the run's evals scored them.
  import imgcls  # pylint: disable=g-import-not-at-top
  from imgcls.evaluators import imbalance  # pylint: disable=g-import-not-at-top
  clf = imgcls.load(str(tmp_path))
  x = np.random.default_rng(0).uniform(-1, 1, (3,) + clf.image_shape).astype(np.float32)
  logits = np.asarray(clf.model.apply(clf.variables, x, train=False), np.float32)
  expected = jax.nn.softmax(logits - imbalance.log_prior(saved['counts']), axis=-1)
  np.testing.assert_allclose(clf.logit_offset, -imbalance.log_prior(saved['counts']))
  assert clf.calibration is None  # the tiny run has no val_split: scores are not calibrated
  np.testing.assert_allclose(clf.scores(x), expected, atol=1e-5)
