"""The one script to run when a GPU or TPU is lent: what works there, how fast, and why.

  uv run --extra cuda12 python scripts/device_check.py --out=device_check.json   # GPU
  uv run --extra tpu python scripts/device_check.py --out=device_check.json      # TPU host
  uv run python scripts/device_check.py --smoke                                   # CPU, tests

Parts, each under its own time cap (a part past its cap, or past the whole --budget_s,
stops and says so; a failing part is reported and the next one runs):
  env          devices, platform, device kind and memory; JAX/jaxlib/Flax/optax versions
  unit         a few numeric checks on the device (matmul, conv, softmax cross-entropy,
               gradient accumulation == whole batch) against NumPy or float32 references
  step_vs_cpu  one train step (ResNet with BatchNorm, and a ViT) on the device and on the
               CPU from the same state and batch, matmul precision 'highest'
  throughput   ResNet-50 and ViT-B/16 at 224, bf16: train img/s at the largest batch that
               fits among --batches, step FLOPs from XLA's cost analysis, MFU against the
               device's published dense bf16 peak
  pipeline     img/s of decode + inception crop + flip + normalize at 224 from synthetic
               ImageNet-sized JPEGs it writes itself, against the ResNet-50 step's consumption
  train_e2e    `imgcls train` for --train_steps steps on those JPEGs, checkpointing
Writes one JSON (--out) and prints a table. Needs no network.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_OUT = flags.DEFINE_string('out', 'device_check.json', 'Where the JSON report goes.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny models and data: the CPU check of the tests.')
_BUDGET = flags.DEFINE_integer('budget_s', 450, 'Seconds for all parts together.')
_BATCHES = flags.DEFINE_list('batches', ['256', '128', '64', '32'], 'Global batches to try '
                             'for the throughput part, largest first.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 200, 'Steps of the end-to-end run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Scratch folder (default: a temporary one).')

# Published dense bf16 peaks (TFLOP/s per chip) by device_kind substring, most specific first.
PEAK_TFLOPS = [('H200', 989.0), ('H100', 989.0), ('GH200', 989.0), ('B200', 2250.0),
               ('A100', 312.0), ('L40S', 362.0), ('L4', 121.0), ('A10', 125.0),
               ('V100', 125.0), ('T4', 65.0), ('TPU v6', 918.0), ('TPU v5p', 459.0),
               ('TPU v5', 197.0), ('TPU v4', 275.0), ('TPU v3', 123.0)]
CAPS_S = {'env': 30, 'unit': 60, 'step_vs_cpu': 60, 'throughput': 150, 'pipeline': 90,
          'train_e2e': 180}
TOLERANCE = 1e-4  # step_vs_cpu: max |param diff| / max |param| after one step


class PartTimeout(Exception):
  pass


class Clock:
  """The whole run's deadline and the current part's."""

  def __init__(self, budget_s: float):
    self.end = time.monotonic() + budget_s
    self.part_end = self.end

  def start(self, cap: float) -> float:
    self.part_end = min(self.end, time.monotonic() + cap)
    return self.left()

  def left(self) -> float:
    return self.part_end - time.monotonic()

  def check(self, what: str) -> None:
    if self.left() <= 0:
      raise PartTimeout(f'time cap reached during {what}')


def peak_tflops(kind: str) -> float | None:
  return next((p for k, p in PEAK_TFLOPS if k.lower() in kind.lower()), None)


# ------------------------------------------------------------------------------ parts
def part_env(clock: Clock, smoke: bool) -> dict[str, Any]:
  import flax, jax, jaxlib, optax  # pylint: disable=g-import-not-at-top,multiple-import
  d = jax.devices()[0]
  out = {'platform': d.platform, 'device_kind': d.device_kind, 'device_count': jax.device_count(),
         'process_count': jax.process_count(), 'jax': jax.__version__,
         'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
         'python': platform.python_version(), 'host': platform.node(),
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'peak_bf16_tflops': peak_tflops(d.device_kind)}
  try:
    stats = d.memory_stats() or {}
    out['memory_gib'] = round(stats.get('bytes_limit', 0) / 2**30, 1) or None
  except Exception:  # pylint: disable=broad-except  (CPU has none)
    out['memory_gib'] = None
  rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                       text=True, check=False)
  out['imgcls_commit'] = rev.stdout.strip() or None
  return out


def part_unit(clock: Clock, smoke: bool) -> dict[str, Any]:
  import jax, jax.numpy as jnp, numpy as np  # pylint: disable=g-import-not-at-top,multiple-import
  from imgcls import step as step_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(256, 512)).astype(np.float32), rng.normal(size=(512, 128)).astype(
      np.float32)
  checks = {}
  with jax.default_matmul_precision('highest'):
    checks['matmul_f32'] = float(np.abs(np.asarray(jnp.dot(a, b)) - a @ b).max() /
                                 np.abs(a @ b).max())
    x = rng.normal(size=(2, 16, 16, 8)).astype(np.float32)
    k = rng.normal(size=(3, 3, 8, 4)).astype(np.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    on_cpu = jax.device_put((x, k), jax.devices('cpu')[0])
    cpu = jax.jit(conv)(*on_cpu)
    checks['conv_f32_vs_cpu'] = float(np.abs(np.asarray(jax.jit(conv)(x, k)) - np.asarray(cpu))
                                      .max() / np.abs(np.asarray(cpu)).max())
  bf = np.asarray(jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)), np.float32)
  checks['matmul_bf16'] = float(np.abs(bf - a @ b).max() / np.abs(a @ b).max())
  logits, labels = rng.normal(size=(8, 10)).astype(np.float32), np.eye(10)[rng.integers(0, 10, 8)]
  ref = -(labels * (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))).sum(-1)
  checks['softmax_xent'] = float(np.abs(np.asarray(step_lib.softmax_xent(logits, labels)) - ref)
                                 .max())
  clock.check('grad accumulation')
  full, acc = _vit_steps(accum=(1, 2))
  checks['grad_accum_vs_whole_batch'] = max(
      float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(acc)))
  limits = {'matmul_f32': 1e-5, 'conv_f32_vs_cpu': 1e-5, 'matmul_bf16': 3e-2,
            'softmax_xent': 1e-5, 'grad_accum_vs_whole_batch': 1e-5}
  failed = [k for k, v in checks.items() if not v <= limits[k]]
  return {'errors': checks, 'limits': limits, 'passed': not failed, 'failed': failed}


def _vit_steps(accum=(1, 2), devices=None):
  """Params after one step of a small ViT for each grad_accum_steps (same state and batch)."""
  import jax, numpy as np  # pylint: disable=g-import-not-at-top,multiple-import
  from imgcls.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.ViT(num_classes=10, width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                  pool='gap', head_zero_init=False)
  with jax.default_matmul_precision('highest'):
    return [jax.device_get(_one_step(model, (16, 16, 3), 16, k, devices)[0].params)
            for k in accum]


def _train_setup(model, image_shape, mesh, grad_accum_steps=1, donate=False, init_mesh=None):
  """(state, train fn): the package's own builders (train.init_state, train.make_train_fn) with
  the default config's step and SGD; the state is initialised on init_mesh (default: mesh)."""
  import jax, optax  # pylint: disable=g-import-not-at-top,multiple-import
  from imgcls import config as config_lib, parallel, train  # pylint: disable=g-import-not-at-top
  config = config_lib.defaults()
  config.grad_accum_steps = grad_accum_steps
  tx = optax.sgd(0.1, momentum=0.9)
  state = train.init_state(model, tx, 0, image_shape, init_mesh or mesh)
  if init_mesh is not None:  # the same initial values on every platform compared
    state = jax.device_put(jax.device_get(state), parallel.replicated(mesh))
  return state, train.make_train_fn(config, model, tx, mesh, donate=donate)


def _one_step(model, image_shape, batch_size, k=1, devices=None):
  """(state after one SGD step, metrics) from a fixed init (on the CPU) and batch, on
  `devices`."""
  import jax, numpy as np  # pylint: disable=g-import-not-at-top,multiple-import
  from imgcls import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(devices or jax.devices()[:1])
  state, fn = _train_setup(model, image_shape, mesh, grad_accum_steps=k,
                           init_mesh=parallel.make_mesh(jax.devices('cpu')[:1]))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(batch_size, *image_shape)).astype(np.float32),
           'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch_size)]}
  return fn(state, parallel.shard_batch(batch, mesh))


def part_step_vs_cpu(clock: Clock, smoke: bool) -> dict[str, Any]:
  import jax, numpy as np  # pylint: disable=g-import-not-at-top,multiple-import
  from imgcls.models import resnet, vit  # pylint: disable=g-import-not-at-top
  w = 4 if smoke else 16
  models = {'resnet_bn': resnet.ResNet(stage_sizes=(1,) if smoke else (1, 1),
                                       block=resnet.BasicBlock, num_classes=10, width=w,
                                       stem='small'),
            'vit': vit.ViT(num_classes=10, width=w * 4, depth=1 if smoke else 2,
                           mlp_dim=w * 8, num_heads=2, patch_size=8, head_zero_init=False)}
  if smoke:  # the CPU against itself: the code path only
    del models['vit']
  out = {'tolerance': TOLERANCE, 'matmul_precision': 'highest'}
  for name, model in models.items():
    clock.check(name)
    with jax.default_matmul_precision('highest'):
      dev = jax.device_get(_one_step(model, (32, 32, 3), 16)[0])
      cpu = jax.device_get(_one_step(model, (32, 32, 3), 16, devices=jax.devices('cpu')[:1])[0])
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(cpu.params))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(dev.params),
                                                        jax.tree.leaves(cpu.params)))
    out[name] = {'max_abs_diff': diff, 'relative': diff / scale,
                 'passed': diff / scale <= TOLERANCE}
  out['passed'] = all(v['passed'] for v in out.values() if isinstance(v, dict))
  return out


def _throughput(model, batch_size: int, size: int, clock: Clock, steps: int):
  """(img/s, step TFLOPs) of the bf16 train step at `batch_size` on every device."""
  import jax, numpy as np  # pylint: disable=g-import-not-at-top,multiple-import
  from imgcls import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  state, fn = _train_setup(model, (size, size, 3), mesh, donate=True)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch(
      {'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
       'labels': np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, batch_size)]}, mesh)
  compiled = fn.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) * mesh.size  # per device program -> whole step
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  clock.check('warm-up')
  done, t0 = 0, time.perf_counter()
  while done < steps and (done < 3 or clock.left() > 5):
    state, m = compiled(state, batch)
    done += 1
  jax.block_until_ready(m)
  dt = time.perf_counter() - t0
  return batch_size * done / dt, flops / 1e12, done


def part_throughput(clock: Clock, smoke: bool) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from imgcls import models  # pylint: disable=g-import-not-at-top
  size = 16 if smoke else 224
  # --smoke: the same code on stand-ins small enough to compile in seconds on a CPU.
  nets = {'resnet50': ('resnet10', dict(width=4, stem='small')) if smoke else ('resnet50', {}),
          'vit_b16': ('vit', dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8))
                     if smoke else ('vit_b16', {})}
  batches = [4] if smoke else [int(b) for b in _BATCHES.value]
  n = jax.device_count()
  peak = peak_tflops(jax.devices()[0].device_kind)
  out = {'image_size': size, 'dtype': 'bfloat16', 'peak_bf16_tflops_per_device': peak}
  per_model_cap = clock.left() / len(nets)
  for name, (registered, kw) in nets.items():
    model = models.get_model(registered, num_classes=1000, dtype='bfloat16', **kw)
    part_end = min(clock.part_end, time.monotonic() + per_model_cap)
    tried = []
    for b in batches:
      if b % n:
        continue
      sub = Clock(0)
      sub.part_end = part_end
      try:
        rate, tflops, steps = _throughput(model, b, size, sub, steps=2 if smoke else 30)
      except PartTimeout as e:
        tried.append({'batch': b, 'error': str(e)})
        break
      except Exception as e:  # pylint: disable=broad-except  (out of memory: a smaller batch)
        tried.append({'batch': b, 'error': str(e).splitlines()[0][:200]})
        continue
      achieved = tflops * rate / b
      out[name] = {'model': registered, 'batch': b, 'img_per_s': rate, 'step_tflop': tflops, 'steps_timed': steps,
                   'achieved_tflops': achieved,
                   'mfu': achieved / (peak * n) if peak else None, 'tried': tried}
      break
    else:
      out[name] = {'error': 'no batch fitted', 'tried': tried}
    if name not in out:
      out[name] = {'error': 'time cap reached', 'tried': tried}
  return out


def _write_jpegs(root: pathlib.Path, n: int, size: tuple[int, int]) -> float:
  """n of bench_pipeline's photo-like JPEGs (size = (height, width)) in root/train/CLASS/ and a
  tenth as many in root/val/CLASS/; returns their mean size in KB."""
  import bench_pipeline  # scripts/, beside this file  # pylint: disable=g-import-not-at-top
  h, w = size
  shutil.rmtree(root, ignore_errors=True)  # a rerun in the same --workdir writes them anew
  root.mkdir(parents=True)
  for split, count in (('train', n), ('val', max(bench_pipeline.CLASSES, n // 10))):
    cache = tempfile.mkdtemp(prefix=f'{split}_', dir=root.parent)
    (bench_pipeline.write_jpegs(count, (w, h), cache_dir=cache) / 'train').rename(root / split)
    shutil.rmtree(cache)
  sizes = [p.stat().st_size for p in root.glob('*/*/*.jpg')]
  return sum(sizes) / len(sizes) / 1024


def part_pipeline(clock: Clock, smoke: bool, scratch: pathlib.Path,
                  consumption: float | None) -> dict[str, Any]:
  from imgcls import data  # pylint: disable=g-import-not-at-top
  n = 40 if smoke else 1200
  size = (48, 64) if smoke else (375, 500)  # ImageNet's typical 500x375
  root = scratch / 'jpegs'
  t0 = time.perf_counter()
  kb = _write_jpegs(root, n, size)
  classes = len(list((root / 'train').iterdir()))
  clock.check('writing JPEGs')
  crop = 16 if smoke else 224
  builder = data.get_builder(f'folder:{root}', str(scratch / 'tfds'))
  batch = 8 if smoke else 128
  pp = f'decode(3)|inception_crop({crop})|flip_lr|value_range(-1, 1)|onehot({classes})'
  it = data.train_iterator(builder, split='train', pp=pp, global_batch_size=batch, seed=0,
                           shuffle_buffer=1000, cache=False)
  next(it)
  clock.check('preparing the folder dataset')
  done, t1 = 0, time.perf_counter()
  while done < (5 if smoke else 100) and clock.left() > 3:
    next(it)
    done += 1
  rate = done * batch / (time.perf_counter() - t1)
  out = {'images': n, 'jpeg_size': list(size), 'mean_kb': kb, 'crop': crop, 'batch': batch,
         'host_cpus': os.cpu_count(), 'img_per_s': rate, 'batches_timed': done,
         'setup_s': t1 - t0, 'root': str(root)}
  if consumption:
    out['resnet50_step_img_per_s'] = consumption
    out['input_bound'] = rate < consumption
  return out


def part_train_e2e(clock: Clock, smoke: bool, scratch: pathlib.Path, batch: int | None
                   ) -> dict[str, Any]:
  root = scratch / 'jpegs'
  if not root.is_dir():
    raise RuntimeError('no JPEGs: the pipeline part did not run')
  steps = 2 if smoke else _TRAIN_STEPS.value
  size, model = (16, 'resnet10') if smoke else (224, 'resnet50')
  batch = 8 if smoke else min(batch or 128, 128)  # input-bound past this on a small host
  classes = len(list((root / 'train').iterdir()))
  workdir = scratch / 'train_e2e'
  cmd = [sys.executable, '-m', 'imgcls.main', 'train',
         f'--config={ROOT}/configs/image_folder.py:root={root},classes={classes},size={size},'
         f'model={model},batch={batch}', f'--workdir={workdir}',
         f'--config.dataset.data_dir={scratch / "tfds"}', f'--config.total_steps={steps}',
         f'--config.checkpoint_every_steps={max(1, steps // 2)}',
         f'--config.eval_every_steps={steps}', '--config.evals.eval.reports=False',
         f'--config.log_every_steps={max(1, steps // 4)}', '--config.model.dtype=bfloat16']
  if smoke:
    cmd += ['--config.model.width=4', '--config.model.stem=small']
  t0 = time.perf_counter()
  try:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=max(10, clock.left()))
  except subprocess.TimeoutExpired as e:
    raise PartTimeout(f'imgcls train did not finish in {e.timeout:.0f} s') from e
  wall = time.perf_counter() - t0
  if r.returncode:
    errors = [l for l in r.stderr.splitlines() if 'error' in l.lower() and 'oneDNN' not in l]
    raise RuntimeError(f'imgcls train exit {r.returncode}: '
                       f'{" | ".join(errors[-3:]) or r.stderr[-1500:]}')
  ckpts = sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  final = [l for l in r.stdout.splitlines() if l.startswith('Final')]
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  rates = [x['steps_per_sec'] for x in records if 'steps_per_sec' in x]
  return {'steps': steps, 'batch': batch, 'model': model, 'wall_s': wall,
          'checkpoints': ckpts, 'final': final[-1] if final else None,
          'last_steps_per_sec': rates[-1] if rates else None, 'passed': bool(final and ckpts)}


# ------------------------------------------------------------------------------ driver
def _watchdog(report: dict, grace_s: float) -> None:
  """Past the budget + grace (a device call cannot be interrupted), write what was measured,
  mark the part in flight as timed out, and exit."""
  import threading  # pylint: disable=g-import-not-at-top

  def fire():
    running = report.get('running')
    if running:
      report['parts'][running] = {'status': 'timeout', 'reason': 'the run budget + grace '
                                  'was spent inside one device call', 'seconds': None}
    report['ok'] = False
    pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=2, default=str))
    print(table(report), flush=True)
    print(f'report: {_OUT.value} (stopped by the watchdog)', flush=True)
    os._exit(3)  # pylint: disable=protected-access
  timer = threading.Timer(_BUDGET.value + grace_s, fire)
  timer.daemon = True
  timer.start()


def run_part(report: dict, name: str, clock: Clock, fn: Callable[[], dict]) -> None:
  report['running'] = name
  if clock.end - time.monotonic() <= 1:
    report['parts'][name] = {'status': 'skipped', 'reason': 'the run budget was spent'}
    return
  clock.start(CAPS_S[name] if not _SMOKE.value else 150)  # a loaded 2-core CPU
  t0 = time.perf_counter()
  try:
    result = {'status': 'ok', **fn()}
    if result.get('passed') is False:
      result['status'] = 'failed'
  except PartTimeout as e:
    result = {'status': 'timeout', 'reason': str(e)}
  except Exception as e:  # pylint: disable=broad-except  (report it, run the next part)
    result = {'status': 'error', 'reason': f'{type(e).__name__}: {str(e)[:500]}',
              'traceback': traceback.format_exc()[-2000:]}
  result['seconds'] = round(time.perf_counter() - t0, 1)
  report['parts'][name] = result
  report['running'] = None
  print(f'[{name}] {result["status"]} in {result["seconds"]} s', flush=True)


def table(report: dict) -> str:
  """The printed summary: one line per part with its key figures."""
  p = report['parts']
  lines = [f'{"part":<12} {"status":<8} {"s":>6}  figures', '-' * 78]

  def fmt(name, figures):
    r = p.get(name, {})
    extra = r.get('reason') if r.get('status') not in ('ok', 'failed') else figures(r)
    seconds = r.get('seconds') if r.get('seconds') is not None else '-'
    lines.append(f'{name:<12} {r.get("status", "-"):<8} {seconds:>6}  {extra}')

  fmt('env', lambda r: f'{r["device_count"]}x {r["device_kind"]} ({r["platform"]}), '
      f'jax {r["jax"]}, flax {r["flax"]}, {r["memory_gib"]} GiB')
  fmt('unit', lambda r: 'all within limits' if r['passed'] else f'FAILED {r["failed"]}')
  fmt('step_vs_cpu', lambda r: ', '.join(f'{k} rel {r[k]["relative"]:.1e}' for k in
                                         ('resnet_bn', 'vit') if k in r) +
      f' (tol {r["tolerance"]})')

  def tp(r):
    def one(k):
      m = r.get(k, {})
      if 'img_per_s' not in m:
        return f'{k} {m.get("error", "-")}'
      mfu = f', MFU {100 * m["mfu"]:.1f}%' if m.get('mfu') is not None else ''
      return f'{k} b{m["batch"]} {m["img_per_s"]:.0f} img/s{mfu}'
    return '; '.join(one(k) for k in ('resnet50', 'vit_b16'))
  fmt('throughput', tp)
  fmt('pipeline', lambda r: f'{r["img_per_s"]:.0f} img/s on {r["host_cpus"]} CPUs' + (
      f' vs step {r["resnet50_step_img_per_s"]:.0f}: '
      f'{"INPUT-BOUND" if r["input_bound"] else "not input-bound"}'
      if 'input_bound' in r else ''))
  fmt('train_e2e', lambda r: f'{r["steps"]} steps b{r["batch"]} in {r["wall_s"]:.0f} s, '
      f'checkpoints {r["checkpoints"]}; {r["final"]}')
  return '\n'.join(lines)


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  smoke = _SMOKE.value
  clock = Clock(_BUDGET.value)
  scratch = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix='device_check-'))
  scratch.mkdir(parents=True, exist_ok=True)
  report = {'smoke': smoke, 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
            'budget_s': _BUDGET.value, 'parts': {}}
  del jax
  _watchdog(report, grace_s=60)
  run_part(report, 'env', clock, lambda: part_env(clock, smoke))
  run_part(report, 'unit', clock, lambda: part_unit(clock, smoke))
  run_part(report, 'step_vs_cpu', clock, lambda: part_step_vs_cpu(clock, smoke))
  run_part(report, 'throughput', clock, lambda: part_throughput(clock, smoke))
  r50 = report['parts']['throughput'].get('resnet50', {})
  run_part(report, 'pipeline', clock,
           lambda: part_pipeline(clock, smoke, scratch, r50.get('img_per_s')))
  run_part(report, 'train_e2e', clock,
           lambda: part_train_e2e(clock, smoke, scratch, r50.get('batch')))
  report.pop('running', None)
  report['total_s'] = round(_BUDGET.value - (clock.end - time.monotonic()), 1)
  report['ok'] = all(p['status'] == 'ok' for p in report['parts'].values())
  pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=2, default=str))
  print(table(report))
  print(f'report: {_OUT.value} ({report["total_s"]} s; all parts ok: {report["ok"]})')


if __name__ == '__main__':
  app.run(main)
