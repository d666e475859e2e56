"""Few-shot ridge probe: the closed form against least squares, separable vs noise features,
exact and seeded shot draws, the evaluator over a mesh and from its cache, and
fewshot_checkpoint on a tiny trained workdir."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from imgcls import checkpoints, data, evaluators, models, parallel, step as step_lib, train
from imgcls.evaluators import fewshot, ridge
from imgcls.evaluators.checkpoint import fewshot_checkpoint
from imgcls.evaluators.ridge import FewShotError

from helpers import NUM_TEST, make_tiny_config

PP = 'decode|value_range(-1, 1)|onehot(4)'


# ------------------------------------------------------------------- ridge

@pytest.mark.parametrize('n, d', [(12, 30), (40, 8)])  # dual (n < D) and primal form
def test_ridge_equals_least_squares(n, d):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
  l2s = [1e-3, 0.5, 8.0]
  w = ridge.ridge_regression(x, y, l2s)
  assert w.shape == (3, d, 3)
  for l2, got in zip(l2s, w):
    # min ||x w - y||² + l2 ||w||²  ==  least squares on [x; sqrt(l2) I] w = [y; 0]
    a = np.concatenate([x, np.sqrt(l2) * np.eye(d)])
    b = np.concatenate([y, np.zeros((d, 3))])
    np.testing.assert_allclose(got, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-9)
  with pytest.raises(FewShotError, match='positive'):
    ridge.ridge_regression(x, y, [0.0])


def _clusters(rng, centres, per_class, noise=1.0):
  labels = np.repeat(np.arange(len(centres)), per_class)
  return centres[labels] + noise * rng.normal(size=(len(labels), centres.shape[1])), labels


def test_separable_clusters_near_perfect_and_noise_near_chance():
  rng = np.random.default_rng(1)
  centres = 4.0 * rng.normal(size=(10, 64))
  train_x, train_y = _clusters(rng, centres, 20)
  test_x, test_y = _clusters(rng, centres, 40)
  out = ridge.ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5), seeds=(0, 1))
  assert set(out) == {f'fewshot_{k}shot_{m}' for k in (1, 5)
                      for m in ('top1', 'top1_std', 'l2', 'val_top1')}
  assert out['fewshot_5shot_top1'] >= 0.99
  assert out['fewshot_5shot_l2'] in ridge.DEFAULT_L2_REGS
  # Features that carry no label information: chance is 1/10.
  noise = ridge.ridge_fewshot(rng.normal(size=train_x.shape), train_y,
                                rng.normal(size=test_x.shape), test_y, shots=(5,), seeds=(0, 1))
  assert noise['fewshot_5shot_top1'] < 0.2


def test_l2_is_chosen_on_held_out_train_examples_not_test():
  rng = np.random.default_rng(2)
  centres = 4.0 * rng.normal(size=(5, 16))
  train_x, train_y = _clusters(rng, centres, 20)
  test_x, test_y = _clusters(rng, centres, 20)
  a = ridge.ridge_fewshot(train_x, train_y, test_x, test_y, shots=(5,), seeds=(0,))
  # Scrambled test labels change the test top-1 but cannot change the l2 chosen.
  b = ridge.ridge_fewshot(train_x, train_y, test_x, rng.permutation(test_y), shots=(5,),
                            seeds=(0,))
  assert a['fewshot_5shot_l2'] == b['fewshot_5shot_l2']
  assert a['fewshot_5shot_val_top1'] == b['fewshot_5shot_val_top1']
  assert a['fewshot_5shot_top1'] > b['fewshot_5shot_top1'] + 0.3
  with pytest.raises(FewShotError, match='val_per_class'):
    ridge.ridge_fewshot(train_x, train_y, test_x, test_y, shots=(5,), val_per_class=0)
  fixed = ridge.ridge_fewshot(train_x, train_y, test_x, test_y, shots=(5,), seeds=(0,),
                                l2_regs=(a['fewshot_5shot_l2'],), val_per_class=0)
  assert fixed['fewshot_5shot_top1'] == a['fewshot_5shot_top1'] and len(fixed) == 3
  with pytest.raises(FewShotError, match='NaN'):
    ridge.ridge_fewshot(train_x * np.nan, train_y, test_x, test_y)


# ---------------------------------------------------------------- sampling

def test_sample_shots_exact_seeded_nested_and_checked():
  labels = np.random.default_rng(3).integers(0, 4, size=200)
  drawn, held = ridge.sample_shots(labels, 5, seed=0, holdout=3)
  np.testing.assert_array_equal(np.bincount(labels[drawn], minlength=4), [5] * 4)
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=4), [3] * 4)
  assert not set(drawn) & set(held)
  again, held_again = ridge.sample_shots(labels, 5, seed=0, holdout=3)
  np.testing.assert_array_equal(drawn, again)
  np.testing.assert_array_equal(held, held_again)
  other, _ = ridge.sample_shots(labels, 5, seed=1, holdout=3)
  assert set(other) != set(drawn)
  one, held_one = ridge.sample_shots(labels, 1, seed=0, holdout=3)
  assert set(one) <= set(drawn)  # nested in k for one seed ...
  np.testing.assert_array_equal(held_one, held)  # ... with the same held-out set
  small = np.array([0] * 10 + [1] * 3 + [2] * 10)
  with pytest.raises(FewShotError, match=r'class\(es\) 1 \(3\)'):
    ridge.sample_shots(small, 5, seed=0)
  with pytest.raises(FewShotError, match=r'3 \(0\)'):  # a class with no example at all
    ridge.sample_shots(small, 2, seed=0, num_classes=4)


# --------------------------------------------------------------- evaluator

@pytest.fixture(scope='module')
def builder(data_dir):
  return data.get_builder('synthetic_shapes', data_dir, prepare=False)


@pytest.fixture(scope='module')
def tiny_state():
  """The tiny config's untrained ResNet and its train state (on one device)."""
  config = make_tiny_config('unused')
  model = models.from_config(config)
  create = functools.partial(step_lib.create_train_state, model, optax.sgd(0.1),
                             input_shape=(16, 16, 1))
  return config, model, jax.jit(create)(jax.random.key(0))


@pytest.fixture(scope='module')
def tiny_model(tiny_state):
  _, model, state = tiny_state
  return model, {'params': state.params, 'batch_stats': state.batch_stats}


def test_extract_features_every_example_once_in_file_order(builder, tiny_model):
  model, variables = tiny_model
  fn = functools.partial(fewshot.make_features_fn(model), variables)
  feats, labels = fewshot.extract_features(fn, builder, 'test', PP, batch_size=16)
  expected = [int(e['label']) for e in tfds.as_numpy(builder.as_dataset(split='test'))]
  assert feats.shape == (NUM_TEST, 8 * 8) and feats.dtype == np.float32  # padding dropped
  np.testing.assert_array_equal(labels, expected)
  first, _ = fewshot.extract_features(fn, builder, 'test', PP, batch_size=16, max_examples=5)
  np.testing.assert_allclose(first, feats[:5], rtol=1e-5, atol=1e-6)
  pool, pool_labels = fewshot.extract_features(fn, builder, 'train', PP, batch_size=16,
                                               max_per_class=3, num_classes=4)
  np.testing.assert_array_equal(np.bincount(pool_labels), [3] * 4)
  assert pool.shape == (12, 64)


def _probe(builder, model, **options):
  """The few-shot evaluator on the synthetic dataset's train/test splits (4 classes, PP)."""
  context = evaluators.Context(make_tiny_config('unused'), model, None, builder)
  return fewshot.FewShot('fewshot', context, train_split='train', test_split='test', pp=PP,
                         num_classes=4, **options)


def test_evaluator_on_mesh_matches_one_device_and_its_cache(builder, tiny_model):
  model, variables = tiny_model
  mesh = parallel.make_mesh()
  on_mesh = functools.partial(fewshot.make_features_fn(model, mesh),
                              jax.device_put(variables, parallel.replicated(mesh)))
  single = functools.partial(fewshot.make_features_fn(model), variables)
  ev = _probe(builder, model, shots=(1, 5), seeds=(0, 1), batch_size=16)
  assert ev.train.images is None
  streamed, labels = ev.train.features(on_mesh)  # read through tf.data, split over 8 devices
  assert ev.train.images is not None  # small: kept after the first pass
  cached, cached_labels = ev.train.features(single)  # from the cache, on one device
  np.testing.assert_array_equal(labels, cached_labels)
  np.testing.assert_array_equal(np.bincount(labels), [15] * 4)  # max(shots) + val_per_class
  np.testing.assert_allclose(streamed, cached, rtol=1e-4, atol=1e-5)
  first = ev.probe(on_mesh)
  assert ev.examples == {'pool': 4 * 15, 'test': NUM_TEST}
  assert ev.probe(on_mesh) == first
  for k in (1, 5):
    assert 0.0 <= first[f'fewshot_{k}shot_top1'] <= 1.0


def test_evaluator_rejects_a_pool_the_split_cannot_fill(builder, tiny_model):
  model, _ = tiny_model
  with pytest.raises(FewShotError, match='pool needs 110 examples of every class'):
    _probe(builder, model, shots=(100,), batch_size=16)
  with pytest.raises(FewShotError, match='pool_per_class=8 is below'):
    _probe(builder, model, shots=(5,), pool_per_class=8)


# -------------------------------------------------------------- checkpoint

@pytest.fixture(scope='module')
def workdir(data_dir, tiny_state, tmp_path_factory):
  """A workdir holding one checkpoint (step 4) as train_and_evaluate writes it, saved directly:
  training through the loop costs a minute on this CPU and the probe needs only weights."""
  config, _, state = tiny_state
  config.dataset.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp('fewshot') / 'run')
  meta = {'config': config.to_dict(), 'image_shape': [16, 16, 1], 'label_names': None}
  ckpt = checkpoints.Checkpointer(workdir, asynchronous=False)
  ckpt.save(4, state.replace(step=state.step + 4), meta, metrics={'top1': 0.5})
  ckpt.close()
  return workdir


def test_fewshot_checkpoint_scores_and_writes_json(workdir):
  # No dataset: the checkpoint's own (synthetic_shapes in data_dir), train and eval splits.
  result = fewshot_checkpoint(workdir, shots=(1, 5), seeds=(0, 1), batch_size=16)
  for k in (1, 5):
    assert 0.0 <= result[f'fewshot_{k}shot_top1'] <= 1.0
    assert result[f'fewshot_{k}shot_l2'] in ridge.DEFAULT_L2_REGS
  assert 'fewshot_10shot_top1' not in result
  assert result['step'] == 4 and result['test_examples'] == NUM_TEST
  assert (result['dataset'], result['train_split'], result['test_split']) == (
      'synthetic_shapes', 'train', 'test')
  assert result['pp'] == 'decode|value_range(-1, 1)'  # the checkpoint's pp_eval, image ops
  path = os.path.join(workdir, 'fewshot_synthetic_shapes.json')
  assert result['written_to'] == path
  with open(path) as f:
    saved = json.load(f)
  assert saved['fewshot_5shot_top1'] == result['fewshot_5shot_top1']
  assert saved['seeds'] == [0, 1]


def test_fewshot_checkpoint_names_a_wrong_image_shape(workdir, data_dir):
  with pytest.raises(FewShotError, match=r'model takes \(16, 16, 1\).*resize\(16, 16\)'):
    fewshot_checkpoint(workdir, 'synthetic_shapes', data_dir=data_dir, shots=(1,), seeds=(0,),
                       pp='decode|resize(8)|value_range(-1, 1)', batch_size=16, write=False)


def test_fewshot_probe_runs_at_each_eval_of_training(data_dir, tiny_config, tmp_path):
  from imgcls import compare, train  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, total_steps=4, eval_every_steps=2)
  config.evals.fewshot = dict(type='fewshot', prefix='eval', shots=(1, 3), seeds=(0, 1))
  result = train.train_and_evaluate(config, str(tmp_path / 'fs'))
  for k in (1, 3):
    assert 0.0 <= result[f'fewshot_{k}shot_top1'] <= 1.0
  evals = [r for r in compare.read_metrics(str(tmp_path / 'fs')) if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [2, 4]
  assert all('eval_fewshot_3shot_top1' in r for r in evals)
  bad = tiny_config(data_dir, total_steps=4)
  bad.evals.fewshot = dict(type='fewshot', shots=(100,))  # 40 train examples per class cannot fill 100 shots + held-out
  with pytest.raises(ridge.FewShotError, match='needs 110 examples of every class'):
    train.train_and_evaluate(bad, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad' / 'checkpoints').exists()  # failed before any write
