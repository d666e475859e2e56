"""Kill a training run with SIGKILL after its first checkpoint, rerun it, compare.

  uv run python scripts/kill_resume.py --config=configs/default.py \
      --workdir=workdirs/killed --reference=workdirs/default

Starts `imgcls train` on --workdir, waits for the first finished checkpoint, kills the
process group with SIGKILL, starts the same command again and lets it finish. Prints the
resumed run's final eval top-1 beside the reference run's (another workdir of the same
config, trained without interruption; it is trained first if it has no metrics yet).
"""

import os
import signal
import subprocess
import sys
import time

from absl import app, flags

from imgcls import compare

_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Config (with :arg).')
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/killed', 'Workdir of the killed run.')
_REFERENCE = flags.DEFINE_string('reference', 'workdirs/default',
                                 'Workdir of an uninterrupted run of the same config.')


def _command(workdir: str) -> list[str]:
  return [sys.executable, '-m', 'imgcls.main', 'train', f'--config={_CONFIG.value}',
          f'--workdir={workdir}']


def _finished_steps(workdir: str) -> list[int]:
  ckpt = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def _final_top1(workdir: str) -> tuple[int, float]:
  evals = [r for r in compare.read_metrics(workdir) if 'eval_top1' in r]
  return evals[-1]['step'], evals[-1]['eval_top1']


def main(_):
  if not any('eval_top1' in r for r in compare.read_metrics(_REFERENCE.value)):
    print(f'training the reference run in {_REFERENCE.value}', flush=True)
    subprocess.run(_command(_REFERENCE.value), check=True)

  t0 = time.time()
  proc = subprocess.Popen(_command(_WORKDIR.value), start_new_session=True)
  while not _finished_steps(_WORKDIR.value):
    if proc.poll() is not None:
      raise SystemExit(f'the run ended (exit {proc.returncode}) before its first checkpoint')
    time.sleep(0.5)
  time.sleep(5)  # let it train on past the checkpoint, so work is lost and redone
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = _finished_steps(_WORKDIR.value)
  print(f'SIGKILL after {time.time() - t0:.0f} s; finished checkpoints: {killed_at}', flush=True)

  subprocess.run(_command(_WORKDIR.value), check=True)
  step, resumed = _final_top1(_WORKDIR.value)
  ref_step, reference = _final_top1(_REFERENCE.value)
  print(f'resumed run:       final step {step}, test top-1 {resumed:.4f}')
  print(f'uninterrupted run: final step {ref_step}, test top-1 {reference:.4f}')
  print(f'difference: {100 * (resumed - reference):+.2f} points')


if __name__ == '__main__':
  app.run(main)
