"""Two processes on localhost (jax.distributed, CPU collectives) train, checkpoint and
score every eval example exactly once."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from imgcls import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _write_config(path, data_dir) -> str:
  path.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
      from conftest import _tiny_config

      def get_config(arg=None):
        return _tiny_config({data_dir!r}, total_steps=8, eval_every_steps=4)
      '''))
  return str(path)


def test_two_processes_train_and_evaluate(data_dir, tmp_path):
  config_file = _write_config(tmp_path / 'tiny.py', data_dir)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT)
  workdir = str(tmp_path / 'two')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'imgcls.main', 'train', f'--config={config_file}',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'Final synthetic_shapes test top-1' in outputs[0]

  # Each process reads its own half of the split, so the batches (and the trajectory)
  # differ from a one-process run's; what must hold is the exact, complete eval.
  records = writers.read_metrics(workdir)
  evals = [r for r in records if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [4, 8]
  assert all(r['eval_examples'] == 37 for r in evals)
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '8'
