"""scripts/device_check.py --smoke: every part of the accelerator check runs on this CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_device_check_smoke(tmp_path):
  out = tmp_path / 'report.json'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  r = subprocess.run([sys.executable, 'scripts/device_check.py', '--smoke', f'--out={out}',
                      f'--workdir={tmp_path / "scratch"}', '--budget_s=300'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  parts = report['parts']
  print(r.stdout[-2000:])
  assert list(parts) == ['env', 'unit', 'step_vs_cpu', 'throughput', 'pipeline', 'train_e2e']
  assert all(p['status'] == 'ok' for p in parts.values()), {
      k: p.get('reason') for k, p in parts.items()}
  assert parts['unit']['passed'] and parts['step_vs_cpu']['passed']
  tp = parts['throughput']
  assert tp['resnet50']['img_per_s'] > 0 and tp['resnet50']['step_tflop'] > 0
  assert tp['resnet50']['mfu'] is None  # no published peak for a CPU
  assert parts['pipeline']['input_bound'] in (True, False)
  assert parts['train_e2e']['checkpoints'] and parts['train_e2e']['final'].startswith('Final')
  for name in parts:  # the printed table has a line per part
    assert any(line.startswith(name) for line in r.stdout.splitlines())


pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
