"""Long runs cannot be lost or poisoned: preemption, divergence, damaged checkpoints, a second
launch and config changes on resume, each checked by the state it leaves on disk."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from imgcls import checkpoints, compare, data, lock as lock_lib, run_config, train
from imgcls.errors import UserError


def _stop_at(monkeypatch, n_batches, action):
  """Runs action() when the training loop draws batch n_batches (0-based)."""
  real = data.train_iterator

  def iterator(*args, **kwargs):
    batches = real(*args, **kwargs)

    def stop():
      for i, batch in enumerate(batches):
        if i == n_batches:
          action(batch)
        yield batch
    return data.TrainBatches(stop(), batches.value_range)
  monkeypatch.setattr(data, 'train_iterator', iterator)


def _params(workdir, step='latest'):
  return jax.tree.leaves(checkpoints.find(workdir, step).weights('raw'))


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """An undisturbed 18-step run: the weights every recovered run must end with."""
  from helpers import make_tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('reliability') / 'ref')
  result = train.train_and_evaluate(_config(make_tiny_config, data_dir), workdir)
  return workdir, result


def _config(tiny_config, data_dir, **kw):
  c = tiny_config(data_dir, **{'total_steps': 18, 'eval_every_steps': 6,
                               'log_every_steps': 100, 'keep_checkpoints': 2, **kw})
  return c


# --------------------------------------------------------------- preemption

def test_sigterm_saves_the_step_reached_and_the_rerun_is_the_same_run(
    data_dir, tiny_config, tmp_path, monkeypatch, reference):
  workdir = str(tmp_path / 'run')
  handler = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as m:  # the signal arrives while step 9 trains
    _stop_at(m, 8, lambda _: os.kill(os.getpid(), signal.SIGTERM))
    out = train.train_and_evaluate(_config(tiny_config, data_dir), workdir)
  assert out == {'preempted': True, 'step': 9}
  assert checkpoints.Checkpointer(workdir, read_only=True).latest_step() == 9
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))  # released
  assert signal.getsignal(signal.SIGTERM) == handler  # the handlers are given back

  resumed = train.train_and_evaluate(_config(tiny_config, data_dir), workdir)
  _assert_same(_params(workdir), _params(reference[0]))  # bit-identical to undisturbed
  assert resumed['top1'] == reference[1]['top1']


def test_a_second_signal_during_the_save_does_not_cut_it(data_dir, tiny_config, tmp_path,
                                                         monkeypatch):
  workdir = str(tmp_path / 'twice')

  def twice(_):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
  with monkeypatch.context() as m:
    _stop_at(m, 3, twice)
    out = train.train_and_evaluate(_config(tiny_config, data_dir, async_checkpoints=True),
                                   workdir)
  assert out == {'preempted': True, 'step': 4}
  assert checkpoints.intact(checkpoints.checkpoint_dir(workdir) / '4')


# --------------------------------------------------------------- divergence

def _poison(batch):
  # float32 even where tf.data hands the step uint8 images (config.value_range_on_device)
  batch['image'] = np.full(batch['image'].shape, np.nan, np.float32)


def test_divergence_stops_before_any_nan_is_saved(data_dir, tiny_config, tmp_path,
                                                  monkeypatch):
  workdir = str(tmp_path / 'nan')
  with monkeypatch.context() as m:  # step 9 sees NaN images: loss and gradients NaN
    _stop_at(m, 8, _poison)
    with pytest.raises(train.DivergedError, match=r'NaN/inf at step 9.*last good checkpoint '
                       r'is step 6'):
      train.train_and_evaluate(_config(tiny_config, data_dir), workdir)
  steps = checkpoints.step_dirs(checkpoints.checkpoint_dir(workdir))
  assert sorted(steps) == [6]  # the eval at 12 never ran on the NaN state
  for step in steps:
    for x in jax.tree.leaves(checkpoints.find(workdir, step).all_weights()):
      assert np.all(np.isfinite(x))
  assert issubclass(train.DivergedError, UserError)  # the CLI prints one line


def test_skip_nonfinite_steps_skips_and_counts_bad_updates(data_dir, tiny_config, tmp_path,
                                                           monkeypatch, reference):
  workdir = str(tmp_path / 'skip')
  c = _config(tiny_config, data_dir, log_every_steps=3)
  c.skip_nonfinite_steps = 2
  with monkeypatch.context() as m:
    _stop_at(m, 8, _poison)
    train.train_and_evaluate(c, workdir)
  skipped = {r['step']: r['train_skipped_steps'] for r in compare.read_metrics(workdir)
             if 'train_skipped_steps' in r}
  assert skipped[9] == 1 and sum(skipped.values()) == 1
  for x in _params(workdir):
    assert np.all(np.isfinite(x))

  bad = _config(tiny_config, data_dir)
  bad.skip_nonfinite_steps = 2
  with monkeypatch.context() as m:  # NaN from step 9 on: 2 skipped, the 3rd stops the run
    real = data.train_iterator

    def poisoned(*args, **kwargs):
      batches = real(*args, **kwargs)

      def poison():
        for i, batch in enumerate(batches):
          if i >= 8:
            _poison(batch)
          yield batch
      return data.TrainBatches(poison(), batches.value_range)
    m.setattr(data, 'train_iterator', poisoned)
    with pytest.raises(train.DivergedError, match='at step 11'):
      train.train_and_evaluate(bad, str(tmp_path / 'skip_bad'))


def test_a_nonfinite_eval_never_ranks_best():
  assert checkpoints.ranking_value({'eval_top1': float('nan')}, 'eval_top1') is None
  assert checkpoints.ranking_value({'top1': 0.5}, 'eval_top1') == 0.5  # older checkpoints
  assert checkpoints.ranking_value({'eval_top1': 0.25}, 'eval_top1') == 0.25


# ------------------------------------------------------ damaged checkpoints

def _truncate_largest(step_dir, every=False):
  """Cuts the largest data file of a saved state (every data file with every=True) in half."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state'))
           for f in fs if not f.startswith('_')]
  for path in files if every else [max(files, key=os.path.getsize)]:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _crashed_run(tiny_config, data_dir, workdir, monkeypatch):
  """Steps 6 and 12 on disk (a crash while step 14 trained)."""
  def crash(_):
    raise RuntimeError('simulated kill')
  with monkeypatch.context() as m:
    _stop_at(m, 13, crash)
    with pytest.raises(RuntimeError):
      train.train_and_evaluate(_config(tiny_config, data_dir), workdir)
  assert sorted(checkpoints.step_dirs(checkpoints.checkpoint_dir(workdir))) == [6, 12]


@pytest.mark.parametrize('damage', ['truncate', 'metadata'])
def test_a_damaged_latest_step_resumes_from_the_one_before(
    damage, data_dir, tiny_config, tmp_path, monkeypatch, reference):
  workdir = str(tmp_path / damage)
  _crashed_run(tiny_config, data_dir, workdir, monkeypatch)
  latest = os.path.join(workdir, 'checkpoints', '12')
  if damage == 'truncate':  # every data file: the weights' chunks surely among them
    _truncate_largest(latest, every=True)
  else:
    os.remove(os.path.join(latest, 'state', '_METADATA'))
  assert not checkpoints.intact(checkpoints.checkpoint_dir(workdir) / '12')
  assert checkpoints.find(workdir, 'latest').step == 6  # load / eval / model_init fall back
  with pytest.raises(checkpoints.CheckpointError, match='does not read'):
    checkpoints.find(workdir, 12)

  train.train_and_evaluate(_config(tiny_config, data_dir), workdir)
  _assert_same(_params(workdir), _params(reference[0]))  # resumed at 6: the same run
  assert os.listdir(os.path.join(workdir, 'checkpoints_broken')) == ['12']  # kept aside


def test_no_intact_step_moves_them_aside_and_starts_over(data_dir, tiny_config, tmp_path,
                                                         monkeypatch, reference):
  workdir = str(tmp_path / 'all')
  _crashed_run(tiny_config, data_dir, workdir, monkeypatch)
  for step in ('6', '12'):
    _truncate_largest(os.path.join(workdir, 'checkpoints', step), every=True)
  with pytest.raises(checkpoints.CheckpointError, match='no intact checkpoint'):
    checkpoints.find(workdir, 'best')
  train.train_and_evaluate(_config(tiny_config, data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints_broken'))) == ['12', '6']
  _assert_same(_params(workdir), _params(reference[0]))


# ----------------------------------------------------------- one run, one dir

def test_a_second_launch_is_refused_and_a_stale_lock_taken_over(data_dir, tiny_config,
                                                                 tmp_path):
  workdir = tmp_path / 'locked'
  workdir.mkdir()
  holder = lock_lib.WorkdirLock(str(workdir)).acquire()  # a live run (this process)
  before = (workdir / lock_lib.LOCK_FILE).read_text()
  start = time.monotonic()
  with pytest.raises(lock_lib.LockError, match=f'in use by another run: pid {os.getpid()}'):
    train.train_and_evaluate(_config(tiny_config, data_dir), str(workdir))
  assert time.monotonic() - start < 10
  assert sorted(os.listdir(workdir)) == [lock_lib.LOCK_FILE]  # nothing written
  assert (workdir / lock_lib.LOCK_FILE).read_text() == before  # the holder unharmed
  holder.release()

  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()  # a run killed on this host: its pid is gone
  record = {'host': os.uname().nodename, 'pid': dead.pid, 'started': 0, 'heartbeat': 0,
            'token': 'old', 'command': 'imgcls train'}
  (workdir / lock_lib.LOCK_FILE).write_text(json.dumps(record))
  c = _config(tiny_config, data_dir)
  c.total_steps = 6
  train.train_and_evaluate(c, str(workdir))
  assert checkpoints.latest_step(str(workdir)) == 6
  assert not (workdir / lock_lib.LOCK_FILE).exists()

  elsewhere = lock_lib.WorkdirLock(str(workdir), stale=300)
  assert elsewhere.is_stale(dict(record, host='other', heartbeat=time.time() - 1000))
  assert elsewhere.is_stale(dict(record, host='other', heartbeat=time.time())) is None


# ------------------------------------------------------- config on resume

def test_resume_refuses_a_changed_schedule_before_writing(data_dir, tiny_config, tmp_path):
  workdir = tmp_path / 'changed'
  c = _config(tiny_config, data_dir)
  c.total_steps = 6
  train.train_and_evaluate(c, str(workdir))
  saved = (workdir / 'config.json').read_text()
  listing = sorted(os.listdir(workdir))

  changed = _config(tiny_config, data_dir)
  changed.total_steps = 6
  changed.lr.base = 0.1
  changed.log_every_steps = 2  # not the run's math: allowed silently
  with pytest.raises(checkpoints.CheckpointError, match=r'lr\.base: 0\.05 -> 0\.1'):
    train.train_and_evaluate(changed, str(workdir))
  assert (workdir / 'config.json').read_text() == saved
  assert sorted(os.listdir(workdir)) == listing

  changed.total_steps = 12
  train.train_and_evaluate(changed, str(workdir), allow_config_change=True)
  assert json.loads((workdir / 'config.json').read_text())['lr']['base'] == 0.1
  record = json.loads((workdir / 'config_changes.jsonl').read_text())
  assert record['step'] == 6
  assert record['changes'] == ['lr.base: 0.05 -> 0.1', 'total_steps: 6 -> 12']
  assert run_config.config_changes({'log_every_steps': 1}, {'log_every_steps': 2}) == []
