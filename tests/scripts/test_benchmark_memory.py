"""scripts/benchmark.py --memory on a tiny ViT: one table row per sharding, parsed back, with
the figures in its JSON (the big models' table: docs/scale.md)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]


def test_memory_table_smoke(tmp_path):
  out = tmp_path / 'memory.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the script sets 8 devices
  proc = subprocess.run(
      [sys.executable, 'scripts/benchmark.py', '--memory', '--memory_models=vit_ti16',
       '--memory_sizes=32', '--memory_remat=nothing_saveable', '--memory_gib=16',
       f'--json={out}', '--torch_python='],
      cwd=ROOT, env={**env, 'TMPDIR': str(tmp_path)}, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split('|')[1:-1] for line in proc.stdout.splitlines()
          if line.startswith('| vit_ti16 ')]
  assert [r[2].strip() for r in rows] == ['replicated', 'fsdp']
  for row in rows:
    assert row[3].strip() == 'nothing_saveable' and float(row[4]) > 5  # params (M)
    assert float(row[5]) > 0 and float(row[6]) > 0  # arguments, temporaries GiB
    assert float(row[7]) > 0 and int(row[8]) > 0  # temporaries at 64/dev, batch in 16 GiB
  report = json.loads(out.read_text())
  assert report['devices'] == 8
  for row in report['memory']:
    assert row['large']['temporaries'] >= row['small']['temporaries'] > 0
    assert row['small']['arguments'] > 0 and row['max_batch_per_device']['16'] > 0


pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)
