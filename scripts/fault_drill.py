"""Fault drill: each fault a long run meets, done to a tiny synthetic run through the CLI.

  uv run python scripts/fault_drill.py [--out=/tmp/fault_drill] [--steps=300]

Faults: SIGTERM mid-run, SIGKILL during an asynchronous save, NaN before a log step, a
truncated latest checkpoint, a deleted _METADATA, two launches on one workdir, a full disk
(a small tmpfs, where this machine lets root mount one) and a changed config on resume. For
each it prints what the user saw (the last line of output), the exit code, the steps lost
and the final weights against an undisturbed run of the same config (bit for bit), and
writes the table to OUT/fault_drill.md and .json.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imgcls import checkpoints, compare, data  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', '/tmp/fault_drill', 'Folder for the runs and the table.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Steps of the tiny run.')

CONFIG = '''
import sys
sys.path.insert(0, {scripts!r})
import samples

def get_config(arg=None):
  return samples.tiny_config({data_dir!r}, {{
      'total_steps': {steps}, 'eval_every_steps': {steps} // 3, 'log_every_steps': 10,
      'keep_checkpoints': 2, 'evals.eval.reports': False, 'lr.base': 0.05,
      'lr.warmup_steps': 10}})
'''


class Drill:
  """Runs `imgcls train` on workdirs under OUT and collects the table's rows."""

  def __init__(self, out: str, steps: int):
    self.out, self.steps, self.rows = out, steps, []
    data_dir = os.path.join(out, 'data')
    data.make_synthetic_dataset(data_dir, num_train=320, num_test=64, image_size=16,
                                channels=1, num_classes=4)
    self.config = os.path.join(out, 'drill_config.py')
    with open(self.config, 'w') as f:
      f.write(CONFIG.format(scripts=os.path.join(ROOT, 'scripts'), data_dir=data_dir,
                            steps=steps))
    self.env = dict(os.environ, PYTHONPATH=ROOT,
                    JAX_COMPILATION_CACHE_DIR=os.path.join(out, 'xla_cache'),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.3')
    self.env.pop('XLA_FLAGS', None)
    self.reference = None

  def start(self, workdir: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, '-m', 'imgcls.main', 'train', f'--config={self.config}',
         f'--workdir={workdir}', *extra], env=self.env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  def run(self, workdir: str, *extra: str) -> tuple[int, str]:
    proc = self.start(workdir, *extra)
    out = proc.communicate(timeout=900)[0]
    return proc.returncode, out

  def path(self, name: str) -> str:
    path = os.path.join(self.out, name)
    shutil.rmtree(path, ignore_errors=True)
    return path

  @staticmethod
  def wait_for(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
      if proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f'the run ended before the fault: {proc.communicate()[0][-2000:]}')
      time.sleep(0.01)

  def reached(self, workdir: str, step: int):
    return lambda: any(r.get('step', 0) >= step for r in compare.read_metrics(workdir))

  def final(self, workdir: str) -> str:
    """'bit-identical' / 'differs' for the last checkpoint against the undisturbed run."""
    try:
      got = checkpoints.find(workdir, 'latest')
    except checkpoints.CheckpointError as e:
      return f'no checkpoint ({e})'[:60]
    if got.step != self.steps:
      return f'stopped at step {got.step}'
    same = all(np.array_equal(a, b) for a, b in zip(
        _leaves(got.all_weights()), _leaves(self.reference.all_weights())))
    return 'bit-identical' if same else 'differs'

  def row(self, fault: str, rc: int, out: str, lost: str, final: str) -> None:
    lines = [re.sub(r'^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\] ', '', l).strip()
             for l in out.strip().splitlines() if l.strip()]
    at = next((i for i in range(len(lines) - 1, -1, -1) if any(
        k in lines[i] for k in ('imgcls: error', 'saved the checkpoint', 'Final'))),
              len(lines) - 1)
    seen = ' '.join(lines[at:at + 2] if lines[at].endswith(':') else lines[at:at + 1])
    self.rows.append(dict(fault=fault, user_saw=seen[:160], exit=rc, steps_lost=lost,
                          final=final))
    print(f'[{fault}] exit {rc}, lost {lost}, final {final}\n    {seen[:200]}', flush=True)


def _leaves(tree):
  return jax.tree.leaves(tree)


def _last_saved(out: str) -> int | None:
  m = re.search(r'saved the checkpoint of step (\d+)', out)
  return int(m[1]) if m else None


def drill(d: Drill) -> None:
  steps = d.steps
  ref = d.path('reference')
  rc, out = d.run(ref)
  assert rc == 0, out[-3000:]
  d.reference = checkpoints.find(ref, 'latest')
  d.row('none (undisturbed run)', rc, out, '0', 'reference')

  # SIGTERM mid-run: the step reached is saved, exit 0, the rerun finishes the same run.
  w = d.path('sigterm')
  proc = d.start(w)
  d.wait_for(proc, d.reached(w, steps // 2))
  t = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate()[0]
  grace = time.monotonic() - t
  saved = _last_saved(out)
  reached = max(r['step'] for r in compare.read_metrics(w) if 'step' in r)
  rc2, out2 = d.run(w)
  d.row(f'SIGTERM mid-run ({grace:.1f} s from signal to exit)', proc.returncode, out,
        f'{0 if saved and saved >= reached else "?"} (saved step {saved}, reached {reached})',
        d.final(w))

  # SIGKILL while an asynchronous save is being written.
  w = d.path('sigkill_save')
  proc = d.start(w)
  pattern = os.path.join(w, 'checkpoints', f'{steps // 3}*')
  d.wait_for(proc, lambda: glob.glob(pattern))
  proc.kill()
  proc.communicate()
  during = any('tmp' in p for p in glob.glob(pattern))
  kept = checkpoints.latest_step(w)
  rc, out = d.run(w)
  kept = _resumed_at(out)
  d.row(f'SIGKILL during an async save ({"tmp folder seen" if during else "save done"})',
        rc, out, f'{steps // 3 - (kept or 0)} (resumed at {kept or 0})', d.final(w))

  # NaN before a log step: lr 1e6 diverges between evals.
  w = d.path('nan')
  rc, out = d.run(w, '--config.lr.base=1e6', '--config.eval_every_steps=2',
                  '--config.log_every_steps=100')
  finite = all(np.all(np.isfinite(x)) for s in checkpoints.step_dirs(
      checkpoints.checkpoint_dir(w)) for x in _leaves(checkpoints.find(w, s).all_weights()))
  d.row('NaN before a log step (lr 1e6)', rc, out,
        f'0 (kept step {checkpoints.latest_step(w)}, all finite: {finite})', 'stopped, as asked')

  # A damaged latest checkpoint: truncated data file, deleted _METADATA.
  crashed = d.path('crashed')
  proc = d.start(crashed)
  second = os.path.join(crashed, 'checkpoints', str(2 * (steps // 3)))
  d.wait_for(proc, lambda: os.path.isdir(os.path.join(second, 'state')))
  proc.kill()
  proc.communicate()
  for name, damage in (('truncated latest checkpoint', _truncate),
                       ('deleted _METADATA in the latest step', _drop_metadata)):
    w = d.path(name.split()[0] + '_' + name.split()[-1])
    shutil.copytree(crashed, w)
    latest = checkpoints.latest_step(w)
    damage(os.path.join(w, 'checkpoints', str(latest)))
    rc, out = d.run(w)
    resumed = _resumed_at(out)
    d.row(name, rc, out, f'{latest - resumed} (step {latest} damaged, resumed at {resumed})',
          d.final(w))

  # Two launches on one workdir (the first made long enough to be still running).
  w = d.path('two_launches')
  first = d.start(w, f'--config.total_steps={5 * steps}')
  d.wait_for(first, d.reached(w, 10))
  t = time.monotonic()
  rc, out = d.run(w, f'--config.total_steps={5 * steps}')
  refused = time.monotonic() - t
  out1 = first.communicate()[0]
  d.row(f'second launch ({refused:.1f} s to refuse)', rc, out, '0', 'first run unharmed: exit '
        f'{first.returncode}, finished {_finished(out1)}')

  # Disk full: a 300 KB tmpfs as the workdir.
  mount = os.path.join(d.out, 'full_disk')
  os.makedirs(mount, exist_ok=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', mount],
                           capture_output=True).returncode == 0
  if mounted:
    try:
      rc, out = d.run(os.path.join(mount, 'run'))
      d.row('disk full (300 KB tmpfs)', rc, out, 'n/a', 'stopped, as asked')
    finally:
      subprocess.run(['umount', mount], check=False)
  else:
    d.row('disk full', -1, 'not run: this machine does not let us mount a tmpfs', 'n/a', 'n/a')

  # A changed config on resume: refused before any write, then allowed explicitly.
  w = d.path('changed')
  shutil.copytree(ref, w)
  before = open(os.path.join(w, 'config.json')).read()
  rc, out = d.run(w, '--config.lr.base=0.1')
  same = open(os.path.join(w, 'config.json')).read() == before
  d.row('changed lr on resume', rc, out, f'0 (config.json unchanged: {same})', 'refused')


def _finished(out: str) -> bool:
  return 'Final synthetic_shapes' in out


def _resumed_at(out: str) -> int:
  m = re.search(r'resumed from the checkpoint at step (\d+)', out)
  return int(m[1]) if m else 0


def _truncate(step_dir: str) -> None:
  files = [os.path.join(p, f) for p, _, fs in os.walk(os.path.join(step_dir, 'state'))
           for f in fs if not f.startswith('_')]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _drop_metadata(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def main(_):
  os.makedirs(_OUT.value, exist_ok=True)
  start = time.monotonic()
  d = Drill(_OUT.value, _STEPS.value)
  drill(d)
  header = '| fault | what the user saw | exit | steps lost | final vs undisturbed |'
  lines = [header, '|---|---|---:|---|---|']
  lines += [f'| {r["fault"]} | `{r["user_saw"]}` | {r["exit"]} | {r["steps_lost"]} | '
            f'{r["final"]} |' for r in d.rows]
  table = '\n'.join(lines)
  print('\n' + table + f'\n\n{time.monotonic() - start:.0f} s in all')
  with open(os.path.join(_OUT.value, 'fault_drill.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(_OUT.value, 'fault_drill.json'), 'w') as f:
    json.dump(d.rows, f, indent=2)


if __name__ == '__main__':
  app.run(main)
