"""Two processes (jax.distributed on localhost), one of them sent SIGTERM: JAX's preemption
service and Orbax agree on one step, both save that one checkpoint and exit 0."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from imgcls import checkpoints, compare

pytestmark = pytest.mark.slow  # several processes (jax.distributed on localhost)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_saves_one_step_and_both_exit_0(data_dir, tmp_path):
  config = tmp_path / 'tiny.py'
  config.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
      from helpers import make_tiny_config

      def get_config(arg=None):
        return make_tiny_config({data_dir!r}, total_steps=3000, eval_every_steps=3000,
                            log_every_steps=5)
      '''))
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=ROOT)
  workdir = str(tmp_path / 'two')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'imgcls.main', 'train', f'--config={config}',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  deadline = time.monotonic() + 400
  while not any(r.get('step', 0) >= 10 for r in compare.read_metrics(workdir)):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.5)
  print(f"\nsignal at {time.monotonic() - deadline + 400:.1f} s", flush=True)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  print(f"exited at {time.monotonic() - deadline + 400:.1f} s", flush=True)
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  saved = [re.search(r'saved the checkpoint of step (\d+) of 3000', out) for out in outputs]
  assert all(saved), [out[-2000:] for out in outputs]
  steps = {int(m[1]) for m in saved}
  assert len(steps) == 1  # both processes stopped at the same step
  step = steps.pop()
  assert 10 <= step < 3000
  assert checkpoints.latest_step(workdir) == step
  assert checkpoints.intact(checkpoints.checkpoint_dir(workdir) / str(step))
