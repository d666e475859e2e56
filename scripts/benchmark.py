"""Speed of imgcls's own train and eval steps, against PyTorch + timm on the same machine.

  # A named model, shape, batch, optimizer and precision:
  uv run python scripts/benchmark.py --model=resnet50 --image_size=224 --batch=8 --optimizer=sgd
  # Three reference shapes (docs/speed.md), imgcls and torch interleaved (A B A B) over 3 rounds:
  uv run python scripts/benchmark.py --preset=cpu_vs_torch --rounds=3 --json=bench.json
  # A config: its step, its own input pipeline, and the compiled memory per grad_accum k:
  uv run python scripts/benchmark.py --config=configs/default.py
  # The JPEG input pipeline at 224 (fused decode + crop, before/after):
  uv run python scripts/benchmark.py --pipeline
  uv run python scripts/benchmark.py --smoke        # seconds; the test suite runs it
  # Where the step's time goes, per XLA op, named by the model code that emitted it:
  uv run python scripts/benchmark.py --config=configs/fashion_mnist_resnet.py --grad_accum= --ops=15
  # XLA's per-device memory of the train step, ViT-B/16 .. g/14, replicated vs fsdp, remat off/on:
  uv run python scripts/benchmark.py --memory      # 8 simulated devices unless XLA_FLAGS says

Per model it prints compile time apart from steady-state train and eval images/s; the
model FLOPs of one step from XLA's cost analysis; the FLOP/s achieved against a matmul
ceiling measured in the same run (MFU, at the step's precision); and, where torch imports
(`uv sync --extra bench`, or any Python with torch + timm named by --torch_python or
$IMGCLS_TORCH_PYTHON), torch's images/s and the imgcls/torch ratio of each round.
--levers=both also times imgcls with the plain lowering (no imgcls.models.cpu_kernels), in the
same rounds.
Every figure also goes to --json. Figures on this noisy 2-core machine drift by up to 2x
over minutes: only ratios measured in one run mean anything, and the CPU (printed first)
changes between machines.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import bench_util  # scripts/, beside this file
from imgcls import hardware

if '--memory' in sys.argv and 'device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +  # --memory: 8 simulated devices
                             ' --xla_force_host_platform_device_count=8').strip()
hardware.set_xla_flags()  # before JAX starts its backends, as the CLI does

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from imgcls import config as config_lib, models, optim, parallel  # noqa: E402
from imgcls import sharding, train  # noqa: E402
from imgcls import evaluators  # noqa: E402
from imgcls.evaluators import base as evaluators_base  # noqa: E402
from imgcls.data import preprocess  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (config mode).')
_PRESET = flags.DEFINE_enum('preset', None, ['cpu_vs_torch'], 'cpu_vs_torch: ResNet-18 '
                            '32 px CIFAR stem b128 SGD, ResNet-50 224 b8 SGD, ViT-S/16 224 b8 '
                            'AdamW (the shapes of docs/speed.md), all float32.')
_MODEL = flags.DEFINE_string('model', None, 'Registered model name (named mode).')
_STEM = flags.DEFINE_string('stem', None, 'ResNet stem: imagenet | small | small_s2.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Named mode: square image size.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Named mode: global batch.')
_OPT = flags.DEFINE_enum('optimizer', 'sgd', ['sgd', 'adamw'], 'Named mode: optimizer.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', "Named mode: model.dtype ('auto' allowed).")
_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Named mode: classes.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per round (after warm-up).')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Interleaved rounds (imgcls, torch, imgcls, ...).')
_TORCH = flags.DEFINE_string('torch_python', None, 'Python with torch + timm for the '
                             'comparison (default: $IMGCLS_TORCH_PYTHON, else this one if '
                             "torch imports; 'none' or empty: no comparison).")
_LEVERS = flags.DEFINE_enum('levers', 'on', ['on', 'both'], 'both: also time imgcls with '
                            'the plain lowering (models.PLAIN; XLA flags stay as set).')
_PIPELINE = flags.DEFINE_bool('pipeline', False, 'Measure the JPEG input pipeline at 224.')
_ACCUM = flags.DEFINE_list('grad_accum', ['1', '2', '4'], 'Config mode: grad_accum_steps '
                           'values whose compiled memory is printed (empty: none).')
_JSON = flags.DEFINE_string('json', None, 'Write every figure here as JSON.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes, 1 round: checks the script runs.')
_MEMORY = flags.DEFINE_bool('memory', False, 'Print XLA\'s per-device argument and temporary '
                            'bytes of the compiled train step (abstract state: nothing '
                            'allocated) per model, size, sharding and remat, and the largest '
                            'per-device batch that fits each of --memory_gib.')
_MEM_MODELS = flags.DEFINE_list('memory_models', ['vit_b16', 'vit_l16', 'vit_h14', 'vit_g14'],
                                '--memory: registered model names.')
_MEM_SIZES = flags.DEFINE_list('memory_sizes', ['224', '384'], '--memory: image sizes, rounded '
                               'down to whole patches (384 -> 378 for a /14 ViT).')
_MEM_BATCH = flags.DEFINE_integer('memory_batch', 8, '--memory: images per device.')
_MEM_REMAT = flags.DEFINE_list('memory_remat', ['', 'nothing_saveable'],
                               '--memory: model.remat policies (empty string: off).')
_MEM_SHARDING = flags.DEFINE_list('memory_sharding', ['replicated', 'fsdp'],
                                  '--memory: config.sharding values.')
_MEM_SCAN = flags.DEFINE_bool('memory_scan', False, '--memory: model.scan=True (the ViT blocks '
                              'as one scanned block; the remat column then says "+ scan").')
_MEM_GIB = flags.DEFINE_list('memory_gib', ['16', '32', '40', '80'],
                             '--memory: per-device memory sizes for the largest-batch columns.')
_MEM_BUDGET = flags.DEFINE_float('memory_budget_s', 0.0, '--memory: start no new compile after '
                                 'this many seconds (0: no limit).')
_OPS = flags.DEFINE_integer('ops', 0, 'Also print where the train step spends its time: the '
                            'N slowest XLA ops of a profiled step and the time per op kind.')


@dataclasses.dataclass
class Spec:
  """One model/shape/batch/optimizer/precision to time."""
  model: str
  image_size: int
  batch: int
  optimizer: str = 'sgd'
  dtype: str = 'float32'
  num_classes: int = 1000
  stem: str | None = None
  width: int | None = None

  @property
  def lr(self) -> float:
    return 0.1 if self.optimizer == 'sgd' else 1e-3

  @property
  def weight_decay(self) -> float:
    return 1e-4 if self.optimizer == 'sgd' else 0.05

  def name(self) -> str:
    stem = f' {self.stem} stem' if self.stem else ''
    return (f'{self.model}{stem} {self.image_size}px b{self.batch} {self.optimizer} '
            f'{self.dtype}')

  def config(self):
    c = config_lib.defaults()
    c.model.name = self.model
    for key in ('stem', 'width', 'dtype'):
      if getattr(self, key) is not None:
        c.model[key] = getattr(self, key)
    c.dataset.num_classes = self.num_classes
    c.batch_size = self.batch
    c.optimizer.name = self.optimizer
    c.lr.base = self.lr
    c.weight_decay = self.weight_decay
    c.label_smoothing = 0.0
    return c


PRESETS = {
    'cpu_vs_torch': [
        Spec('resnet18', 32, 128, 'sgd', num_classes=10, stem='small'),
        Spec('resnet50', 224, 8, 'sgd'),
        Spec('vit_s16', 224, 8, 'adamw'),
    ],
    'smoke': [Spec('resnet18', 16, 8, 'sgd', num_classes=10, stem='small', width=8)],
}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


def matmul_ceiling(dtype: str, n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the best of `reps` n x n matmuls in `dtype`, by XLA on device 0 and, for
  float32, by numpy's BLAS: the MFU denominator. Measured in the run, so it shares the
  machine's state; a framework whose kernels beat both matmuls shows an MFU over 100%."""
  def best(f, a):
    f(a)
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a))
      times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)
  rates = [best(jax.jit(lambda a: a @ a), jnp.ones((n, n), dtype))]
  if dtype == 'float32':
    rates.append(best(lambda a: a @ a, np.ones((n, n), np.float32)))
  return max(rates)


def op_split(compiled, run_once, top: int, steps: int = 3) -> dict:
  """Where a compiled step spends its time: a jax.profiler trace of `steps` calls, summed per
  XLA op (ms per step), each named by the model code it came from (the op's metadata).

  What TensorBoard's profile tab shows, as text: found that XLA:CPU ran 3x3 convs with a 2x2
  output as loop fusions, 100 ms each (imgcls/models/cpu_kernels.py). XLA:CPU runs independent ops side by
  side, so the per-op sum can exceed the step's wall time.
  """
  import collections  # noqa: PLC0415
  import gzip  # noqa: PLC0415
  import re  # noqa: PLC0415
  import tempfile  # noqa: PLC0415
  jax.block_until_ready(run_once())
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(steps):
      out = run_once()
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    trace, = pathlib.Path(tmp).rglob('*.trace.json.gz')
    events = json.loads(gzip.decompress(trace.read_bytes()))
  events = events['traceEvents'] if isinstance(events, dict) else events
  hlo = {}  # every instruction's name -> the jax/flax scope that emitted it ('' if none)
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = ', line)
    if m:
      scope = re.search(r'op_name="([^"]+)"', line)
      hlo[m.group(1)] = scope.group(1) if scope else ''
  per_op: collections.Counter = collections.Counter()
  for e in events:  # the trace's complete events named after an instruction: one op each
    name = e.get('name', '').split('__')[0]  # 'custom-call.3.clone__onednn$matmul'
    if e.get('ph') == 'X' and name in hlo and not name.startswith('while'):  # body ops count
      per_op[name] += e.get('dur', 0) / 1e3 / steps  # us -> ms per step
  kinds: collections.Counter = collections.Counter()
  for name, ms in per_op.items():
    kinds[re.sub(r'(\.\d+)+$', '', name)] += ms
  print(f'\nop split: step {wall * 1e3:.1f} ms wall; {sum(per_op.values()):.1f} ms summed '
        f'over ops (independent ops run side by side)')
  for name, ms in kinds.most_common(8):
    print(f'  {ms:8.1f} ms/step  {name} (all)')
  for name, ms in per_op.most_common(top):
    print(f'  {ms:8.1f} ms/step  {name:32s} {hlo.get(name, "")[-90:]}')
  return {'step_ms': wall * 1e3, 'ops_ms': dict(per_op.most_common(top)),
          'kinds_ms': dict(kinds.most_common(8))}


class Imgcls:
  """imgcls's train and eval steps for one config, compiled ahead of time on fake data."""

  def __init__(self, config, mesh, image_shape: tuple[int, ...], levers: bool = True):
    self.image_shape = image_shape
    self._build(config, mesh, {} if levers else {'lowering': models.PLAIN})

  def _build(self, config, mesh, overrides):
    s = config.batch_size
    rng = np.random.default_rng(0)
    self.batch_size = s
    model = models.from_config(config, **overrides)
    tx, _ = optim.make_optimizer(config, total_steps=10_000)
    n = config.dataset.num_classes
    host = {'image': rng.standard_normal((s, *self.image_shape), np.float32),
            'labels': np.eye(n, dtype=np.float32)[rng.integers(0, n, s)],
            'mask': np.ones((s,), np.float32)}
    self.state = train.init_state(model, tx, 0, self.image_shape, mesh)
    self.batch = parallel.shard_batch(host, mesh)
    t0 = time.perf_counter()
    # exactly train.py's step, with the value_range its input would hand it
    train_vr = preprocess.split_value_range(config.pp_train, config.value_range_on_device)[1]
    fn = train.make_train_fn(config, model, tx, mesh, value_range=train_vr)
    self.train_compiled = fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.train_flops = _flops(self.train_compiled)
    tta = evaluators.eval_tta(config)  # the run's eval step
    # The run's eval step applies its input's value_range; here it gets the float batch.
    eval_fn = evaluators_base.make_eval_fn(model, config.loss, mesh, tta,
                                           evaluators.eval_value_range(config))
    self.eval_compiled = eval_fn.lower(self.state, self.batch).compile()
    self.eval_flops = _flops(self.eval_compiled)
    self.dtype = str(jnp.dtype(getattr(model, 'dtype', 'float32')))
    for _ in range(2):
      self._train_once()
      self._eval_once()

  def _train_once(self):
    self.state, metrics = self.train_compiled(self.state, self.batch)
    return metrics['loss']

  def _eval_once(self):
    return self.eval_compiled(self.state, self.batch)[0]['top1']

  def rate(self, what: str, steps: int) -> float:
    return images_per_s(self._train_once if what == 'train' else self._eval_once, steps,
                        self.batch_size)


def images_per_s(fn, steps: int, batch_size: int) -> float:
  """Images/s of `steps` calls of fn (one warm call first), waiting for the last result."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return steps * batch_size / (time.perf_counter() - t0)


def make_imgcls(spec: Spec, mesh, levers: bool) -> Imgcls:
  config = config_lib.validate(spec.config())
  return Imgcls(config, mesh, (spec.image_size, spec.image_size, 3), levers)


class Torch:
  """The PyTorch worker (scripts/bench_torch.py) in its own process, kept warm."""

  def __init__(self, python: str, spec: Spec):
    here = pathlib.Path(__file__).resolve().parent
    self.proc = subprocess.Popen([python, str(here / 'bench_torch.py')], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    self.info = self._ask({'cmd': 'setup', **dataclasses.asdict(spec), 'lr': spec.lr,
                           'weight_decay': spec.weight_decay})

  def _ask(self, msg: dict) -> dict:
    self.proc.stdin.write(json.dumps(msg) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the torch worker stopped (exit {self.proc.wait()}); see its error '
                         'above')
    return json.loads(line)

  def rate(self, what: str, steps: int) -> float:
    return self._ask({'cmd': what, 'steps': steps})['img_s']

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def torch_python() -> str | None:
  if _TORCH.value is not None:  # 'none' or '': asked for no comparison
    return None if _TORCH.value.lower() in ('', 'none') else _TORCH.value
  if os.environ.get('IMGCLS_TORCH_PYTHON'):
    return os.environ['IMGCLS_TORCH_PYTHON']
  if importlib.util.find_spec('torch') and importlib.util.find_spec('timm'):
    return sys.executable
  return None


def _spread(xs: list[float]) -> str:
  return ' / '.join(f'{x:.3g}' for x in xs)


def compare(spec: Spec, mesh, ceilings: dict[str, float], steps: int, rounds: int,
            python: str | None) -> dict:
  """Interleaved rounds of imgcls (levers on, optionally off) and torch for one spec."""
  print(f'\n== {spec.name()}', flush=True)
  runners = {'imgcls': make_imgcls(spec, mesh, levers=True)}
  if _LEVERS.value == 'both':
    runners['imgcls_levers_off'] = make_imgcls(spec, mesh, levers=False)
  first = runners['imgcls']
  out = {'spec': dataclasses.asdict(spec), 'dtype': first.dtype,
         'compile_s': {k: r.compile_s for k, r in runners.items()},
         'train_flops_per_step': first.train_flops, 'eval_flops_per_step': first.eval_flops}
  print(f'compile: {", ".join(f"{k} {r.compile_s:.1f} s" for k, r in runners.items())}; '
        f'model GFLOPs/step (XLA cost analysis): train {first.train_flops / 1e9:.2f}, '
        f'eval {first.eval_flops / 1e9:.2f}', flush=True)
  torch_runner = None
  if python and spec.width in (None, 64):
    torch_runner = Torch(python, spec)
    runners['torch'] = torch_runner
    out['torch'] = torch_runner.info
  rates = {what: {k: [] for k in runners} for what in ('train', 'eval')}
  for _ in range(rounds):
    for what in ('train', 'eval'):
      for k, r in runners.items():  # A B A B: the same window for each framework
        rates[what][k].append(r.rate(what, steps))
  if torch_runner:
    torch_runner.close()
  if _OPS.value:
    out['op_split'] = op_split(first.train_compiled, first._train_once, _OPS.value)
  out['img_s'] = rates
  ceiling = ceilings[first.dtype]
  for what in ('train', 'eval'):
    flops = first.train_flops if what == 'train' else first.eval_flops
    for k, xs in rates[what].items():
      med = float(np.median(xs))
      mfu = flops / spec.batch * med / ceiling
      out.setdefault('mfu', {}).setdefault(what, {})[k] = mfu
      print(f'{what:5s} {k:18s} img/s {_spread(xs):28s} MFU {100 * mfu:5.1f}%', flush=True)
    if 'torch' in rates[what]:
      ratios = [a / b for a, b in zip(rates[what]['imgcls'], rates[what]['torch'])]
      out.setdefault('ratio_vs_torch', {})[what] = ratios
      print(f'{what:5s} imgcls/torch per round: {_spread(ratios)}', flush=True)
    if 'imgcls_levers_off' in rates[what]:
      gains = [a / b for a, b in zip(rates[what]['imgcls'], rates[what]['imgcls_levers_off'])]
      out.setdefault('levers_gain', {})[what] = gains
      print(f'{what:5s} levers on/off per round: {_spread(gains)}', flush=True)
  return out


def config_mode(config, mesh) -> dict:
  """The config's own step, its own input pipeline, and compiled memory per grad_accum k."""
  from imgcls import data  # noqa: PLC0415  (TensorFlow only here)
  ds = config.dataset
  builder = data.builder_for(ds)
  batches = data.train_iterator(builder, split=ds.train_split, pp=config.pp_train,
                                global_batch_size=config.batch_size, seed=0,
                                shuffle_buffer=ds.shuffle_buffer, cache=ds.cache,
                                value_range_on_device=config.value_range_on_device)
  host = next(batches)
  image_shape = tuple(host['image'].shape[1:])
  model = models.from_config(config)
  tx, _ = optim.make_optimizer(config, total_steps=1000)
  state = train.init_state(model, tx, 0, image_shape, mesh)
  batch = parallel.shard_batch({k: host[k] for k in ('image', 'labels')}, mesh)
  out: dict = {'config_model': config.model.to_dict(), 'batch': config.batch_size,
               'memory_mib': {}}
  per_device = config.batch_size // mesh.size
  for k in map(int, _ACCUM.value):
    if per_device % k:
      print(f'grad_accum {k}: does not divide the per-device batch {per_device}, skipped')
      continue
    c = config.copy_and_resolve_references()
    c.grad_accum_steps = k
    m = train.make_train_fn(c, model, tx, mesh, donate=False,
                            value_range=batches.value_range).lower(
        state, batch).compile().memory_analysis()
    mib = {'arguments': m.argument_size_in_bytes / 2**20,
           'outputs': m.output_size_in_bytes / 2**20, 'temporaries': m.temp_size_in_bytes / 2**20}
    out['memory_mib'][k] = mib
    print(f'grad_accum {k} (microbatch {per_device // k}/device, global batch '
          f'{config.batch_size}): compiled memory arguments {mib["arguments"]:.1f} MiB, '
          f'outputs {mib["outputs"]:.1f} MiB, temporaries {mib["temporaries"]:.1f} MiB',
          flush=True)
  t0 = time.perf_counter()
  compiled = train.make_train_fn(config, model, tx, mesh,
                                 value_range=batches.value_range).lower(state, batch).compile()
  out['compile_s'] = time.perf_counter() - t0
  out['train_flops_per_step'] = _flops(compiled)

  def one_step():
    nonlocal state
    state, metrics = compiled(state, batch)
    return metrics['loss']

  out['train_img_s'] = images_per_s(one_step, _STEPS.value, config.batch_size)
  if _OPS.value:
    out['op_split'] = op_split(compiled, one_step, _OPS.value)
  out['pipeline_img_s'] = images_per_s(lambda: np.asarray(next(batches)['image']),
                                       _STEPS.value, config.batch_size)
  print(f'model {config.model.to_dict()} batch {config.batch_size} on {mesh.size} device(s)')
  print(f'compile {out["compile_s"]:.1f} s; '
        f'train GFLOPs/step {out["train_flops_per_step"] / 1e9:.2f}')
  print(f'train step (fake data, fixed batch): {out["train_img_s"]:8.0f} images/s')
  print(f'input pipeline alone:                {out["pipeline_img_s"]:8.0f} images/s')
  print(f'pipeline / step ratio:               '
        f'{out["pipeline_img_s"] / out["train_img_s"]:8.2f}')
  return out


def compiled_memory(config, mesh, per_device: int, image_size: int) -> dict:
  """XLA's memory analysis (bytes per device) of the run's train step (train.make_train_fn,
  the state donated) for `per_device` images per device, lowered on an abstract state
  (jax.eval_shape of train.init_state's function, with the state's shardings): nothing is
  allocated, so models far larger than this machine's memory are measured."""
  from imgcls import step as step_lib  # noqa: PLC0415
  model = models.from_config(config)
  tx, _ = optim.make_optimizer(config, total_steps=10_000)
  shape = (image_size, image_size, 3)
  shapes = jax.eval_shape(lambda k: step_lib.create_train_state(model, tx, k, input_shape=shape),
                          jax.random.PRNGKey(0))
  state = sharding.abstract_state_with_shardings(shapes, mesh, config.sharding,
                                                 config.sharding_min_bytes)
  n = per_device * mesh.size
  batched = parallel.batch_sharded(mesh)
  batch = {'image': jax.ShapeDtypeStruct((n, *shape), jnp.float32, sharding=batched),
           'labels': jax.ShapeDtypeStruct((n, config.dataset.num_classes), jnp.float32,
                                          sharding=batched)}
  t0 = time.perf_counter()
  m = train.make_train_fn(config, model, tx, mesh).lower(state, batch).compile().memory_analysis()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params))
  return {'params': params, 'arguments': m.argument_size_in_bytes,
          'outputs': m.output_size_in_bytes, 'aliased': m.alias_size_in_bytes,
          'temporaries': m.temp_size_in_bytes, 'compile_s': time.perf_counter() - t0}


def max_batch(small: dict, large: dict, b_small: int, b_large: int, gib: float) -> int:
  """The largest per-device batch whose arguments + unaliased outputs + temporaries fit `gib`,
  the temporaries extrapolated linearly in the batch through the two compiled batch sizes."""
  slope = (large['temporaries'] - small['temporaries']) / (b_large - b_small)
  fixed = (small['arguments'] + small['outputs'] - small['aliased'] + small['temporaries'] -
           slope * b_small)
  if slope <= 0:
    return -1
  return max(0, int((gib * 2**30 - fixed) // slope))


def whole_patches(name: str, size: int) -> int:
  """`size` rounded down to whole patches for a ViT (384 -> 378 at /14, timm's `_clip_378`
  size), else `size`: the ViT refuses images its patches do not tile."""
  dims = getattr(models.get_model(name), 'dims', None)
  return size - size % dims()['patch_size'] if dims else size


def memory_mode(mesh) -> list[dict]:
  """The memory table: one row per model, image size, sharding and remat policy."""
  gibs = [float(g) for g in _MEM_GIB.value]
  # Temporaries are not linear at small batches (the optimizer's update, not the activations,
  # sets the peak there): the fit goes through 4x and 8x the table's batch.
  b, b2, b3 = _MEM_BATCH.value, 4 * _MEM_BATCH.value, 8 * _MEM_BATCH.value
  t_start = time.perf_counter()
  rows = []
  print(f'\n== memory of the compiled train step per device ({mesh.size} devices, AdamW, '
        f'float32, {b} images per device; largest batch: arguments + outputs not aliased + '
        f'temporaries, temporaries linear in the batch through {b2} and {b3} per device)',
        flush=True)
  head = (f'| model | px | sharding | remat | params (M) | arguments GiB | temporaries GiB | '
          f'temporaries GiB at {b3}/dev | '
          + ' | '.join(f'max batch/dev {g:g} GiB' for g in gibs) + ' | compile s |')
  print(head, flush=True)
  print('|' + '---|' * (head.count('|') - 1), flush=True)
  for name in _MEM_MODELS.value:
    for size in (whole_patches(name, int(px)) for px in _MEM_SIZES.value):
      for strategy in _MEM_SHARDING.value:
        for remat in _MEM_REMAT.value:
          label = (remat or 'off') + (' + scan' if _MEM_SCAN.value else '')
          if _MEM_BUDGET.value and time.perf_counter() - t_start > _MEM_BUDGET.value:
            print(f'| {name} | {size} | {strategy} | {label} | (not measured: '
                  '--memory_budget_s spent) |', flush=True)
            continue
          spec = Spec(name, size, b * mesh.size, 'adamw')
          c = spec.config()
          c.sharding = strategy
          if remat:
            c.model.remat = remat
          c.model.scan = _MEM_SCAN.value
          c = config_lib.validate(c)
          small = compiled_memory(c, mesh, b, size)
          mid = compiled_memory(c, mesh, b2, size)
          large = compiled_memory(c, mesh, b3, size)
          fits = [max_batch(mid, large, b2, b3, g) for g in gibs]
          row = {'model': name, 'image_size': size, 'sharding': strategy,
                 'remat': remat or 'off', 'scan': _MEM_SCAN.value, 'per_device_batch': b, 'small': small,
                 'mid': mid, 'large': large, 'batches': (b, b2, b3), 'max_batch_per_device': dict(zip(_MEM_GIB.value, fits))}
          rows.append(row)
          gib = lambda x: f'{x / 2**30:.2f}'  # noqa: E731
          print(f'| {name} | {size} | {strategy} | {label} | '
                f'{small["params"] / 1e6:.1f} | {gib(small["arguments"])} | '
                f'{gib(small["temporaries"])} | {gib(large["temporaries"])} | ' +
                ' | '.join(map(str, fits)) +
                f' | {small["compile_s"] + mid["compile_s"] + large["compile_s"]:.0f} |',
                flush=True)
  return rows


def main(_):
  mesh = parallel.make_mesh()
  report: dict = {'cpu': bench_util.cpu_model_name(), 'native_bf16': hardware.native_bf16(),
                  'cores': os.cpu_count(), 'devices': mesh.size, 'backend': jax.default_backend(),
                  'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                  'levers': hardware.levers_on()}
  print(f'CPU: {report["cpu"]} ({report["cores"]} cores, native bf16: {report["native_bf16"]}); '
        f'backend {report["backend"]} x{mesh.size}; jax {jax.__version__}; '
        f'XLA_FLAGS={report["xla_flags"]!r}', flush=True)
  steps, rounds = (2, 1) if _SMOKE.value else (_STEPS.value, _ROUNDS.value)
  if _MEMORY.value:
    report['memory'] = memory_mode(mesh)
  if _CONFIG.value is not None:
    report['config'] = config_mode(config_lib.validate(_CONFIG.value), mesh)
  specs = PRESETS['smoke'] if _SMOKE.value else PRESETS.get(_PRESET.value or '', [])
  if _MODEL.value:
    specs = [Spec(_MODEL.value, _SIZE.value, _BATCH.value, _OPT.value, _DTYPE.value,
                  _CLASSES.value, _STEM.value)]
  if specs:
    dtypes = {make_dtype(s.dtype) for s in specs}
    report['matmul_ceiling_flops'] = {d: matmul_ceiling(d, n=256 if _SMOKE.value else 2048)
                                      for d in dtypes}
    print('matmul ceiling: ' + ', '.join(f'{d} {v / 1e9:.0f} GFLOP/s'
                                         for d, v in report['matmul_ceiling_flops'].items()))
    python = torch_python()
    report['torch_python'] = python
    if not python and _TORCH.value is not None:
      print('torch: comparison off (--torch_python); imgcls only')
    elif not python:
      print('torch: not importable here (uv sync --extra bench, or --torch_python=PATH); '
            'imgcls only')
    report['runs'] = [compare(s, mesh, report['matmul_ceiling_flops'], steps, rounds, python)
                      for s in specs]
  if _PIPELINE.value or _SMOKE.value:
    import bench_pipeline  # noqa: PLC0415  (scripts/, beside this file)
    report['pipeline'] = bench_pipeline.compare(smoke=_SMOKE.value)
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(report, indent=1, default=str))
    print(f'wrote {_JSON.value}')


def make_dtype(name: str) -> str:
  return hardware.auto_dtype() if name == 'auto' else str(jnp.dtype(name))


if __name__ == '__main__':
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  app.run(main)
