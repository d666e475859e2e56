"""config.evals: several evaluators on several splits in one run, the same list in
`imgcls eval`, the older fields mapped onto the list, and bad lists refused up front."""

import json

import ml_collections
import numpy as np
import pytest

from imgcls import checkpoints, compare, config as config_lib, evaluators, train
from imgcls.evaluators.checkpoint import evaluate_checkpoint

from helpers import NUM_TEST


def _old_style(config, **legacy):
  """A config as older imgcls wrote it into checkpoints: evaluation from eval_reports and
  fewshot.*, with no `evals`."""
  old = config.to_dict()
  del old['evals']
  fewshot = dict(shots=(), seeds=(0, 1, 2), train_split='', test_split='', max_test_examples=0)
  fewshot.update(legacy.pop('fewshot', {}))
  return ml_collections.ConfigDict(dict(old, eval_reports=legacy.pop('eval_reports', True),
                                        fewshot=fewshot))


def test_older_fields_map_onto_one_eval_evaluator(tiny_config):
  c = config_lib.upgrade(_old_style(tiny_config('unused'), eval_reports=True))
  assert evaluators.specs(c) == {'eval': dict(type='classification', prefix='eval',
                                              reports=True)}
  assert 'eval_reports' not in c and 'fewshot' not in c
  c = config_lib.upgrade(_old_style(tiny_config('unused'), fewshot=dict(shots=(1, 5))))
  spec = evaluators.specs(c)['fewshot']
  assert spec['type'] == 'fewshot' and spec['prefix'] == 'eval' and spec['shots'] == (1, 5)
  config_lib.validate(c)


def test_a_checkpoint_with_an_old_style_config_still_evaluates(data_dir, tiny_config, tmp_path):
  from imgcls import models, optim, parallel  # noqa: PLC0415
  c = tiny_config(data_dir)
  model = models.from_config(c)
  tx, _ = optim.make_optimizer(c, 10)
  state = train.init_state(model, tx, 0, (16, 16, 1), parallel.make_mesh())
  old = _old_style(c, eval_reports=False, fewshot=dict(shots=(1,), seeds=(0,)))
  workdir = str(tmp_path / 'old')
  ckpt = checkpoints.Checkpointer(workdir, asynchronous=False)
  ckpt.save(2, state, {'config': old.to_dict(), 'image_shape': [16, 16, 1],
                       'label_names': None}, metrics={'eval_top1': 0.5})
  ckpt.close()
  scored = evaluate_checkpoint(workdir, 'latest')
  assert scored['examples'] == NUM_TEST and scored['step'] == 2
  assert 0.0 <= scored['eval_fewshot_1shot_top1'] <= 1.0


@pytest.mark.parametrize('evals, best, message', [
    ({'val': {'type': 'clasification'}}, 'val_top1',
     "evals.val.type: unknown evaluator 'clasification'. Did you mean classification?"),
    ({'val': {'type': 'classification', 'splt': 'test'}}, 'val_top1',
     "unknown option 'evals.val.splt' for a classification evaluator"),
    ({'val': {'type': 'classification'}}, 'eval_top1',
     "best_metric 'eval_top1' is not written by any evaluator"),
    ({'fs': {'type': 'fewshot', 'shots': (0,)}}, 'fs_fewshot_1shot_top1',
     'evals.fs: shots must be positive ints'),
    ({'val': {'type': 'classification', 'tta': 'rot90'}}, 'val_top1',
     "evals.val: tta must be 'flip'"),
])
def test_bad_evaluator_lists_are_refused_before_anything_runs(tiny_config, evals, best,
                                                              message):
  c = tiny_config('unused')
  c.evals = ml_collections.ConfigDict(evals)
  c.best_metric = best
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
    config_lib.validate(c)


def test_two_evaluators_on_two_splits_in_one_run(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir, total_steps=6, eval_every_steps=3)
  c.evals = ml_collections.ConfigDict()  # this run's own list, in place of the default
  c.evals.test = dict(type='classification', split='test', reports=True)
  c.evals.train = dict(type='classification', split='train[:40]', reports=False)
  c.evals.flip = dict(type='classification', split='test', reports=False, tta='flip')
  c.best_metric = 'test_top1'
  workdir = str(tmp_path / 'two')
  result = train.train_and_evaluate(c, workdir)

  evals = [r for r in compare.read_metrics(workdir) if 'test_top1' in r]
  assert [r['step'] for r in evals] == [3, 6]
  for r in evals:  # each evaluator scored its own split, every example once
    assert r['test_examples'] == NUM_TEST and r['train_examples'] == 40
    assert 'test_ece' in r and 'train_ece' not in r  # reports only where asked
    assert 'eval_top1' not in r
    assert r['flip_examples'] == NUM_TEST and 'flip_ece' not in r
  assert result['test_top1'] == evals[-1]['test_top1']
  assert result['train_top1'] == evals[-1]['train_top1']
  # The reports of an evaluator other than `eval` go to reports/PREFIX/.
  report = json.loads((tmp_path / 'two' / 'reports' / 'test' / 'report_6.json').read_text())
  assert report['num_examples'] == NUM_TEST
  assert not (tmp_path / 'two' / 'reports' / 'train').exists()

  # The checkpoint is ranked by best_metric, and `imgcls eval` runs the same list.
  best = checkpoints.find(workdir, 'best')
  assert best.meta['best_metric'] == 'test_top1'
  by_test = max(evals, key=lambda r: (r['test_top1'], r['step']))['step']
  assert best.step == by_test  # kept by the policy (latest + best) and found by `find`
  assert best.meta['metrics']['test_top1'] == max(r['test_top1'] for r in evals)
  scored = evaluate_checkpoint(workdir, 'latest')
  np.testing.assert_allclose(scored['test_top1'], result['test_top1'], atol=1e-6)
  np.testing.assert_allclose(scored['train_top1'], result['train_top1'], atol=1e-6)
  assert scored['step'] == 6


def test_imgcls_eval_on_a_split_keeps_the_runs_test_time_augmentation(data_dir, tiny_config,
                                                                      tmp_path):
  c = tiny_config(data_dir, total_steps=2, eval_every_steps=2)
  c.evals.eval = dict(type='classification', tta='flip', reports=False)
  workdir = str(tmp_path / 'tta')
  result = train.train_and_evaluate(c, workdir)
  scored = evaluate_checkpoint(workdir, 'latest', split='test')
  # The same split, scored with the mirror as in the run: the same numbers.
  np.testing.assert_allclose(scored['eval_top1'], result['eval_top1'], atol=1e-6)
  np.testing.assert_allclose(scored['eval_loss'], result['eval_loss'], rtol=1e-5)


@pytest.mark.parametrize('tta', ['', 'flip'])
def test_uint8_eval_batches_score_exactly_as_float_ones(data_dir, tiny_config, tta):
  """config.value_range_on_device moves pp_eval's final value_range into the eval step, as
  for training: the evaluator's batches are uint8 and every figure, per-example
  probabilities and confidently wrong images included, equals the float32 pipeline's."""
  import jax  # noqa: PLC0415
  from imgcls import data, models, optim, parallel  # noqa: PLC0415
  from imgcls.evaluators import metrics  # noqa: PLC0415

  scores = {}
  for on in (True, False):
    c = tiny_config(data_dir, value_range_on_device=on)
    c.pp_eval = 'decode|value_range(-0.5, 2.5, in_min=10, in_max=200)|onehot(4)'
    c.evals.eval = dict(type='classification', tta=tta, reports=False)
    mesh = parallel.make_mesh(jax.devices()[:2])
    model = models.from_config(c)
    context, (ev,) = evaluators.from_config(c, model, mesh, data.builder_for(c.dataset))
    batch = next(iter(ev.data))
    if on:
      assert ev.data.value_range == {'vmin': -0.5, 'vmax': 2.5, 'in_min': 10, 'in_max': 200}
      assert batch['image'].dtype == np.uint8
    else:
      assert ev.data.value_range is None and batch['image'].dtype == np.float32
    assert context.image_shape() == (16, 16, 1)
    tx, _ = optim.make_optimizer(c, 10)
    state = train.init_state(model, tx, 0, context.image_shape(), mesh)
    scores[on] = metrics.evaluate(ev.eval_fn, state, ev.data, mesh, collect=True,
                                  keep_images=5)
  (on, on_out), (off, off_out) = scores[True], scores[False]
  assert on == off and on['examples'] == NUM_TEST
  np.testing.assert_array_equal(on_out.probs, off_out.probs)
  assert [m[:2] for m in on_out.mistakes] == [m[:2] for m in off_out.mistakes]
  assert len(on_out.mistakes) == 5
  for (_, _, a), (_, _, b) in zip(on_out.mistakes, off_out.mistakes):  # uint8 vs its range
    np.testing.assert_allclose((np.asarray(a, np.float64) - 10) * 3 / 190 - 0.5, b, atol=1e-5)


def test_training_imports_no_serving_code():
  """imgcls.train runs the evaluators (imgcls.evaluators) and never loads imgcls.inference."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  code = ('import sys, imgcls.train, imgcls.evaluators.checkpoint; '
          "print('imgcls.inference' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == 'False'


def test_fewshot_code_loads_only_for_a_config_that_lists_it():
  """Every type is known by name up front; fewshot (and ridge) load on their first use."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  code = '''
import json, sys
from imgcls import config as config_lib, evaluators
loaded = lambda: [m for m in ('fewshot', 'ridge') if f'imgcls.evaluators.{m}' in sys.modules]
c = config_lib.defaults()
out = {'names': evaluators.EVALUATORS.names(), 'start': loaded()}
out['errors'] = evaluators.check(c)
out['default'] = loaded()
c.evals.fs = dict(type='fewshot', shots=(1, 5))
out['fs_errors'] = evaluators.check(c)
out['with_fewshot'] = loaded()
print(json.dumps(out))
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['names'] == ['classification', 'fewshot']
  assert result['start'] == result['default'] == []
  assert result['errors'] == [] and result['fs_errors'] == []
  assert result['with_fewshot'] == ['fewshot', 'ridge']
