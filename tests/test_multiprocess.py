"""Two processes on localhost (jax.distributed, CPU collectives): `imgcls train` launched as
srun launches it (SLURM's environment, no flags) trains, checkpoints and scores every eval
example exactly once; the reports' per-example outputs and images are the split's own."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imgcls import compare

pytestmark = pytest.mark.slow  # several processes (jax.distributed on localhost)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _write_config(path, data_dir) -> str:
  path.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
      from helpers import make_tiny_config

      def get_config(arg=None):
        return make_tiny_config({data_dir!r}, total_steps=8, eval_every_steps=4)
      '''))
  return str(path)


def _slurm_port() -> tuple[int, int]:
  """(job id, port): JAX's SLURM detection puts the coordinator on port
  61440 + SLURM_JOB_ID % 4096 of the step's first node; find a job id whose port is free."""
  for _ in range(50):
    port = _free_port()
    if port >= 61440:
      return 4096 * 7 + port - 61440, port
    with socket.socket() as s:
      try:
        candidate = 61440 + int.from_bytes(os.urandom(2), 'little') % 4096
        s.bind(('127.0.0.1', candidate))
        return 4096 * 7 + candidate - 61440, candidate
      except OSError:
        continue
  raise RuntimeError('no free port in 61440-65535')


def _slurm_env(task: int, job_id: int) -> dict[str, str]:
  """What `srun --ntasks=2` sets for task `task` on one node (the variables JAX reads)."""
  return {'SLURM_JOB_ID': str(job_id), 'SLURM_STEP_NODELIST': 'localhost',
          'SLURM_NTASKS': '2', 'SLURM_PROCID': str(task), 'SLURM_LOCALID': str(task),
          'SLURM_STEP_NUM_NODES': '1'}


def test_two_processes_train_and_evaluate_under_slurm(data_dir, tmp_path):
  config_file = _write_config(tmp_path / 'tiny.py', data_dir)
  job_id, _ = _slurm_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT)
  workdir = str(tmp_path / 'two')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'imgcls.main', 'train', f'--config={config_file}',
       f'--workdir={workdir}', '--verbosity=0'],  # no --coordinator_address: auto-detected
      env=dict(env, **_slurm_env(i, job_id)), cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'Final synthetic_shapes test top-1' in outputs[0]
  assert 'jax.distributed (slurm): process 1 of 2, 4 local / 8 global devices' in outputs[1]

  # Each process reads its own half of the split, so the batches (and the trajectory)
  # differ from a one-process run's; what must hold is the exact, complete eval.
  records = compare.read_metrics(workdir)
  evals = [r for r in records if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [4, 8]
  assert all(r['eval_examples'] == 37 for r in evals)
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '8'


_EVAL_WORKER = """
import sys
import numpy as np
from imgcls import parallel
data_dir, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
parallel.initialize_distributed(f'127.0.0.1:{port}', 2, pid)  # the CLI's explicit flags
import jax
from imgcls import data, models, step
from imgcls.evaluators import metrics as evaluate
from imgcls.evaluators.base import make_eval_fn
model = models.get_model('resnet10', num_classes=4, width=4, stem='small')
mesh = parallel.make_mesh()
variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 1), np.float32))
state = step.TrainState.for_eval(jax.device_put(variables, parallel.replicated(mesh)))
# As the evaluators run it (config.value_range_on_device): uint8 batches, value_range in the step.
eval_fn = make_eval_fn(model, 'softmax_xent', mesh,
                       value_range=dict(vmin=-1, vmax=1, in_min=0, in_max=255))
builder = data.get_builder('synthetic_shapes', data_dir)
batches = data.eval_data(builder, split='test', pp='decode|onehot(4)', global_batch_size=16)
_, outputs = evaluate.evaluate(eval_fn, state, batches, mesh, collect=True, keep_images=40)
np.savez(out, probs=outputs.probs, labels=outputs.labels,
         index=np.array([i for _, i, _ in outputs.mistakes], np.int64),
         conf=np.array([c for c, _, _ in outputs.mistakes], np.float32),
         images=np.stack([im for _, _, im in outputs.mistakes]))
"""


def test_two_process_report_outputs_are_the_splits_own(data_dir, tmp_path):
  """Each mistake's index names the split's example with that very image and label, and
  the gathered probabilities and labels come in split order (as one process sees them).
  The batches are uint8 with the value_range in the eval step, as the evaluators run them."""
  from imgcls import data  # pylint: disable=g-import-not-at-top
  worker = tmp_path / 'worker.py'
  worker.write_text(_EVAL_WORKER)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=ROOT)
  procs = [subprocess.Popen(
      [sys.executable, str(worker), data_dir, str(port), str(i), str(tmp_path / f'{i}.npz')],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  split = list(data.eval_data(data.get_builder('synthetic_shapes', data_dir), split='test',
                              pp='decode|onehot(4)', global_batch_size=37,
                              process_index=0, process_count=1))[0]
  r0, r1 = (np.load(tmp_path / f'{i}.npz') for i in range(2))
  for k in ('probs', 'labels', 'index', 'images'):
    np.testing.assert_array_equal(r0[k], r1[k])  # every process holds the same report
  np.testing.assert_array_equal(r0['labels'], split['labels'])
  wrong = np.argmax(r0['probs'], -1) != np.argmax(split['labels'], -1)
  assert len(r0['index']) == min(40, wrong.sum()) > 8
  assert list(r0['conf']) == sorted(r0['conf'], reverse=True)
  for i, image in zip(r0['index'], r0['images']):
    assert wrong[i]
    np.testing.assert_array_equal(image, split['image'][i])
