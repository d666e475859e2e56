"""Sweeps from a config file's get_sweep(), and the comparison of their runs."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from imgcls import compare, config as config_lib, sweep

SWEEP_CONFIG = '''
import os
import sys
sys.path.insert(0, os.environ['IMGCLS_SCRIPTS'])
import samples


def get_config(arg=None):
  return samples.tiny_config(os.environ['IMGCLS_TEST_DATA_DIR'], {
      'dataset.shuffle_buffer': 100, 'pp_train': 'decode|value_range(-1, 1)|onehot(4)',
      'model.width': 4, 'total_steps': 3, 'eval_every_steps': 3, 'log_every_steps': 1,
      'lr.warmup_steps': 1, 'async_checkpoints': False, 'evals.eval.reports': False})


def get_sweep(arg=None):
  return %s
'''

GOOD = "[{'name': 'w4'}, {'model.width': 8}, {'model.width': 8, 'lr.base': 0.2}]"


def _write(tmp_path, sweep_list=GOOD, body=SWEEP_CONFIG):
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(body % sweep_list if '%s' in body else body)
  return str(path)


@pytest.fixture
def env_data(data_dir, monkeypatch):
  monkeypatch.setenv('IMGCLS_TEST_DATA_DIR', data_dir)
  monkeypatch.setenv('IMGCLS_SCRIPTS', str(pathlib.Path(__file__).resolve().parents[1] /
                                           'scripts'))
  return data_dir


def test_sweep_runs_resumes_and_compares(tmp_path, env_data):
  config = _write(tmp_path)
  root = str(tmp_path / 'runs')
  lines = []
  found = sweep.run(config, root, echo=lines.append)
  names = ['w4', 'width=8', 'width=8,base=0.2']
  assert [v.name for v in found] == names
  commands = [l for l in lines if l.startswith('imgcls train')]
  assert commands[0] == f'imgcls train --config={config} --workdir={root}/w4'
  assert commands[2] == (f'imgcls train --config={config} --workdir={root}/width=8,base=0.2 '
                         '--config.model.width=8 --config.lr.base=0.2')
  assert sorted(os.listdir(root)) == sorted(names)
  metrics = [os.path.join(root, n, 'metrics.jsonl') for n in names]
  before = [(os.stat(m).st_mtime_ns, open(m).read()) for m in metrics]

  lines = []
  sweep.run(config, root, echo=lines.append)  # finished runs are skipped, not retrained
  assert sum('finished, skipped' in l for l in lines) == 3
  assert [(os.stat(m).st_mtime_ns, open(m).read()) for m in metrics] == before

  out = tmp_path / 'cmp'
  md = compare.compare(root, str(out))
  assert sorted(os.listdir(out)) == ['compare.csv', 'compare.md', 'curves.png']
  header = md.splitlines()[0]
  assert header == ('| run | lr.base | model.width | final_top1 | best_top1 | best_step | '
                    'final_train_loss | steps |')
  with open(out / 'compare.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == sorted(names)
  assert all(r['steps'] == '3' and r['best_step'] == '3' and r['final_top1'] for r in rows)
  assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_dry_run_on_the_command_line(tmp_path, env_data):
  config = _write(tmp_path)
  root = tmp_path / 'runs'
  p = subprocess.run([sys.executable, '-m', 'imgcls.main', 'sweep', f'--config={config}',
                      f'--workdir={root}', '--dry_run', '--config.seed=1',
                      '--config.model.dtype=bfloat16'],  # a model argument the file lacks
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  commands = [l for l in p.stdout.splitlines() if l.startswith('imgcls train')]
  assert len(commands) == 3
  assert commands[1] == (f'imgcls train --config={config} --workdir={root}/width=8 '
                         '--config.seed=1 --config.model.dtype=bfloat16 --config.model.width=8')
  assert not root.exists()


def test_config_without_get_sweep(tmp_path, env_data):
  config = _write(tmp_path, body=SWEEP_CONFIG.split('def get_sweep')[0])
  with pytest.raises(config_lib.ConfigError, match='no get_sweep'):
    sweep.variants(config)


def test_bad_variants_fail_before_anything_runs(tmp_path, env_data):
  config = _write(tmp_path, "[{'model.width': 8}, {'name': 'x', 'lr.bse': 0.1}, "
                            "{'name': 'y', 'batch_size': 'big'}, {'name': 'x'}]")
  root = tmp_path / 'runs'
  with pytest.raises(config_lib.ConfigError) as e:
    sweep.run(config, str(root), echo=lambda _: None)
  message = str(e.value)
  assert "variant 'x': unknown key 'lr.bse'. Did you mean 'base'?" in message
  assert "variant 'y': 'batch_size'" in message
  assert "two variants are named 'x'" in message
  assert not root.exists()


def test_compare_without_runs(tmp_path):
  with pytest.raises(compare.CompareError, match='no runs under'):
    compare.compare(str(tmp_path))
  p = subprocess.run([sys.executable, '-m', 'imgcls.main', 'compare', str(tmp_path)],
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  assert 'imgcls: error: no runs under' in p.stderr


def test_compare_adds_ema_and_ece_columns_when_runs_have_them(tmp_path):
  for name, ema in (('a', 0.0), ('b', 0.99)):
    run = tmp_path / name
    run.mkdir()
    (run / 'config.json').write_text(json.dumps({'ema_decay': ema}))
    record = {'step': 5, 'eval_top1': 0.5, 'eval_ece': 0.1}
    if ema:
      record['eval_ema_top1'] = 0.75
    (run / 'metrics.jsonl').write_text(json.dumps(record) + '\n')
  columns, rows = compare.table(str(tmp_path))
  assert columns[-2:] == ['final_ema_top1', 'final_ece']
  assert [r['final_ema_top1'] for r in rows] == [None, 0.75]
  assert [r['final_ece'] for r in rows] == [0.1, 0.1]
