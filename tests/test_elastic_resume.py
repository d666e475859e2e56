"""Elastic resume: a run checkpointed on 8 devices (or 2 processes) resumes on 4, 2, 1 (or 1
process) and across config.sharding with the same examples in every following batch and, for
the 4 steps compared, the same losses within 1e-5 (later steps may drift with the summation
order). The examples are recorded by id (a digest of each image and label after the random
pp ops, so the per-example pp seeds are compared too)."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from imgcls import compare, data, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVED = 8, 4  # a run of 8 steps checkpointed at 4; steps 5..8 compared after a resume


def _ids(batch):
  return [hashlib.sha1(batch['image'][i].tobytes() + batch['labels'][i].tobytes()).hexdigest()[:12]
          for i in range(len(batch['image']))]


def _record(ids_per_step):
  """data.train_iterator whose batches' ids are appended to `ids_per_step` as they are read."""
  original = data.train_iterator
  def recording(*args, **kwargs):
    it = original(*args, **kwargs)
    inner = it._batches  # pylint: disable=protected-access
    def batches():
      for b in inner:
        ids_per_step.append(_ids(b))
        yield b
    it._batches = batches()  # pylint: disable=protected-access
    return it
  return recording


def _config(tiny_config, data_dir, strategy='replicated'):
  return tiny_config(data_dir, total_steps=STEPS, checkpoint_every_steps=SAVED,
                     eval_every_steps=STEPS, log_every_steps=1, keep_checkpoints=3,
                     sharding=strategy, sharding_min_bytes=0)


def _run(monkeypatch, config, workdir, devices=8):
  """(ids of each step's global batch, {step: train loss}) of train_and_evaluate on the first
  `devices` devices; a run of another sharding than the checkpoint's is allowed to resume."""
  ids = []
  make_mesh = parallel.make_mesh
  monkeypatch.setattr(parallel, 'make_mesh',
                      lambda d=None: make_mesh(jax.devices()[:devices] if d is None else d))
  monkeypatch.setattr(data, 'train_iterator', _record(ids))
  train.train_and_evaluate(config, workdir, allow_config_change=True)
  monkeypatch.undo()
  return ids, _losses(workdir)


def _losses(workdir):
  return {r['step']: r['train_loss'] for r in compare.read_metrics(workdir) if 'train_loss' in r}


def _resumable(src, dst):
  """A copy of workdir `src` cut back to its checkpoint of step SAVED."""
  shutil.copytree(src, dst)
  for name in os.listdir(os.path.join(dst, 'checkpoints')):
    if name.isdigit() and int(name) > SAVED:
      shutil.rmtree(os.path.join(dst, 'checkpoints', name))
  return str(dst)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """The undisturbed run on 8 devices: its workdir, step ids and losses."""
  from helpers import make_tiny_config  # pylint: disable=g-import-not-at-top
  mp = pytest.MonkeyPatch()
  workdir = str(tmp_path_factory.mktemp('elastic') / 'ref')
  ids, losses = _run(mp, _config(make_tiny_config, data_dir), workdir)
  assert len(ids) == STEPS and sorted(losses) == list(range(1, STEPS + 1))
  return workdir, ids, losses


def _assert_continues(reference, ids, losses):
  _, ref_ids, ref_losses = reference
  assert ids == ref_ids[SAVED:]  # the same examples, in the same rows, of steps 5..8
  for s in range(SAVED + 1, STEPS + 1):
    np.testing.assert_allclose(losses[s], ref_losses[s], rtol=1e-5, atol=1e-5, err_msg=s)


@pytest.mark.parametrize('devices,strategy', [(4, 'replicated'), (2, 'replicated'),
                                              (1, 'replicated'), (8, 'fsdp'), (4, 'fsdp')])
def test_resume_on_another_device_count_or_sharding(reference, devices, strategy, tiny_config,
                                                    data_dir, tmp_path, monkeypatch):
  workdir = _resumable(reference[0], tmp_path / 'resumed')
  ids, losses = _run(monkeypatch, _config(tiny_config, data_dir, strategy), workdir, devices)
  _assert_continues(reference, ids, losses)


def test_fsdp_checkpoint_resumes_replicated(reference, tiny_config, data_dir, tmp_path,
                                            monkeypatch):
  fsdp = str(tmp_path / 'fsdp')
  ids, _ = _run(monkeypatch, _config(tiny_config, data_dir, 'fsdp'), fsdp)
  assert ids == reference[1]
  workdir = _resumable(fsdp, tmp_path / 'resumed')
  ids, losses = _run(monkeypatch, _config(tiny_config, data_dir), workdir, 2)
  _assert_continues(reference, ids, losses)


def test_global_batches_do_not_depend_on_the_process_count(data_dir):
  builder = data.get_builder('synthetic_shapes', data_dir)
  def global_batches(count, start_step, n=3):
    its = [data.train_iterator(builder, split='train', pp='decode|flip_lr|onehot(4)',
                               global_batch_size=16, seed=1, start_step=start_step,
                               shuffle_buffer=50, process_index=p, process_count=count)
           for p in range(count)]
    return [sum((_ids(next(it)) for it in its), []) for _ in range(n)]
  one = global_batches(1, 0, 12)  # 12 * 16 > 160 examples: an epoch boundary is crossed
  assert len(set(sum(one[:10], []))) == 160  # the first 10 batches: each example once
  for count in (2, 4):
    assert global_batches(count, 0) == one[:3]
    assert global_batches(count, 8) == one[8:11]


_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
from imgcls import parallel
data_dir, workdir, port, pid, out = sys.argv[1:6]
parallel.initialize_distributed(f'127.0.0.1:{{port}}', 2, int(pid))
from helpers import make_tiny_config
import test_elastic_resume as t
from imgcls import data, train
ids = []
data.train_iterator = t._record(ids)
train.train_and_evaluate(t._config(make_tiny_config, data_dir), workdir)
open(out, 'w').write(json.dumps(ids))
"""


@pytest.mark.slow
def test_two_process_run_resumes_in_one(reference, tiny_config, data_dir, tmp_path,
                                        monkeypatch):
  worker = tmp_path / 'worker.py'
  worker.write_text(_WORKER.format(tests=os.path.join(ROOT, 'tests')))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT)
  two = str(tmp_path / 'two')
  procs = [subprocess.Popen(
      [sys.executable, str(worker), data_dir, two, str(port), str(i), str(tmp_path / f'{i}.json')],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  halves = [json.loads((tmp_path / f'{i}.json').read_text()) for i in range(2)]
  assert [a + b for a, b in zip(*halves)] == reference[1]  # each process: its rows of each batch
  workdir = _resumable(two, tmp_path / 'resumed')
  ids, losses = _run(monkeypatch, _config(tiny_config, data_dir), workdir)
  _assert_continues(reference, ids, losses)


def test_a_resume_may_change_the_sharding_without_allow_config_change():
  from imgcls import config as config_lib, run_config  # pylint: disable=g-import-not-at-top
  old = config_lib.defaults().to_dict()
  new = dict(old, sharding='fsdp', sharding_min_bytes=0)
  assert run_config.config_changes(old, new) == []
  assert run_config.config_changes(old, dict(old, batch_size=7)) != []
