"""scripts/benchmark.py --smoke runs end to end and writes every figure it promises (the figures
themselves are machine-dependent and asserted nowhere: see docs/speed.md)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]


def test_benchmark_smoke_writes_every_figure(tmp_path):
  out = tmp_path / 'bench.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as users run it
  env['IMGCLS_TORCH_PYTHON'] = ''  # imgcls side only: torch is the optional bench extra
  proc = subprocess.run(
      [sys.executable, 'scripts/benchmark.py', '--smoke', f'--json={out}', '--torch_python=',
       '--ops=5'],
      cwd=ROOT, env={**env, 'TMPDIR': str(tmp_path)}, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['cpu'] and report['backend'] == 'cpu' and report['devices'] == 1
  assert report['matmul_ceiling_flops']['float32'] > 0
  (run,) = report['runs']
  assert run['compile_s']['imgcls'] > 0
  assert run['train_flops_per_step'] > run['eval_flops_per_step'] > 0
  for what in ('train', 'eval'):
    assert all(x > 0 for x in run['img_s'][what]['imgcls'])
    assert run['mfu'][what]['imgcls'] > 0
  assert 'torch' not in run['img_s']['train']
  assert 'imgcls_levers_off' not in run['img_s']['train']
  split = run['op_split']  # --ops: the profiled step's slowest XLA ops
  assert split['step_ms'] > 0 and 0 < len(split['ops_ms']) <= 5
  assert all(ms >= 0 for ms in split['ops_ms'].values()) and sum(split['kinds_ms'].values()) > 0
  pipeline = report['pipeline']
  assert pipeline, 'no pipeline figures'
  assert 'MFU' in proc.stdout and 'img/s' in proc.stdout


pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
