"""A damaged WORKDIR/config.json: recovered from the newest checkpoint's metadata (with a
warning naming the file), or refused in one line when no checkpoint holds a copy."""

import json
import os
import subprocess
import sys

from absl import logging
import pytest

from helpers import make_tiny_config
from imgcls import checkpoints, compare, run_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('damaged') / 'run')
  train.train_and_evaluate(make_tiny_config(data_dir, total_steps=2, eval_every_steps=2), workdir)
  return workdir


@pytest.mark.parametrize('damage', ['{"model": {"name": "resn', '[1, 2, 3]', ''])
def test_recovered_from_the_newest_checkpoint(trained, damage, monkeypatch):
  path = os.path.join(trained, 'config.json')
  good = json.loads(open(path).read())
  open(path, 'w').write(damage)
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  assert run_config.read(trained) == good
  assert json.loads(open(path).read()) == good  # rewritten
  assert len(warnings) == 1 and path in warnings[0] and 'step 2' in warnings[0]


def test_train_resumes_a_workdir_whose_config_json_is_damaged(trained, data_dir, tiny_config):
  open(os.path.join(trained, 'config.json'), 'w').write('not json')
  c = tiny_config(data_dir, total_steps=4, eval_every_steps=2)
  train.train_and_evaluate(c, trained, allow_config_change=True)  # recovered, then compared
  assert checkpoints.latest_step(trained) == 4
  assert json.loads(open(os.path.join(trained, 'config.json')).read())['total_steps'] == 4


def test_refused_in_one_line_without_a_checkpoint(tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"truncated": ')
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint holds a copy') as e:
    run_config.read(str(workdir))
  assert '\n' not in str(e.value) and 'delete it' in str(e.value)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device
  proc = subprocess.run(
      [sys.executable, '-m', 'imgcls.main', 'train', f'--config={ROOT}/configs/default.py',
       f'--workdir={workdir}', '--config.total_steps=1'],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('imgcls: error:') and 'config.json is damaged' in last
  assert 'Traceback' not in proc.stderr


def test_compare_names_the_damaged_file(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{')
  with pytest.raises(compare.CompareError, match='config.json is damaged'):
    compare.table(str(tmp_path))
