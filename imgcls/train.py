"""train_and_evaluate(config, workdir): the whole training run, top to bottom.

Sections: config, mesh, input, model and optimizer, steps, checkpoint, loop. All
checks that can fail on bad input run before anything is written to the workdir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from typing import Any

from absl import logging
from clu import parameter_overview, periodic_actions
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from imgcls import augment, checkpoints, config as config_lib, data, evaluators
from imgcls import models, optim, parallel, preemption, run_config, sharding
from imgcls import step as step_lib, writers
from imgcls.errors import UserError
from imgcls.evaluators import metrics as metrics_lib
from imgcls.lock import WorkdirLock


def init_state(model, tx, seed: int, image_shape: tuple[int, ...], mesh, ema: bool = False,
               strategy: str = 'replicated', min_bytes: int = sharding.MIN_BYTES):
  """The initial train state (with an EMA copy of the weights if asked), created directly
  into its shards on `mesh` under `strategy` (config.sharding)."""
  create = functools.partial(step_lib.create_train_state, model, tx,
                             input_shape=tuple(image_shape), ema=ema)
  key = jax.random.PRNGKey(seed)
  shardings = sharding.state_shardings(jax.eval_shape(create, key), mesh, strategy, min_bytes)
  return jax.jit(create, out_shardings=shardings)(key)


def make_train_fn(config: ml_collections.ConfigDict, model, tx, mesh, donate: bool = True,
                  value_range: dict[str, float] | None = None, class_counts: Any = None):
  """The run's data-parallel train step: step.train_step under shard_map over the mesh's batch
  axis, the state donated (scripts/benchmark.py times this same function). value_range: the
  train input's (`data.TrainBatches.value_range`), applied to its uint8 batches on the device.
  The state is laid out by config.sharding (as `init_state` makes it); under 'fsdp' the
  specs are read from the first state the function sees (call or `.lower`)."""
  step = functools.partial(step_lib.train_step, model=model, tx=tx,
                           label_smoothing=config.label_smoothing, loss=config.loss,
                           mix=augment.MixConfig(**config.mixup.to_dict()),
                           ema_decay=config.ema_decay,
                           skip_nonfinite_steps=config.skip_nonfinite_steps,
                           grad_accum_steps=config.grad_accum_steps,
                           value_range=value_range, axis_name=parallel.AXIS,
                           imbalance=imbalance_loss_options(config, class_counts))
  donate_argnums = (0,) if donate else ()
  if config.sharding == 'replicated':
    return parallel.data_parallel(step, mesh, in_specs=(P(), P(parallel.AXIS)),
                                  out_specs=(P(), P()), donate_argnums=donate_argnums)
  return _ShardedTrainFn(step, mesh, config.sharding, config.sharding_min_bytes, donate_argnums)


class _ShardedTrainFn:
  """step.train_step on a sharded state: the shard_map, its specs taken from the first state's
  shapes (sharding.state_specs), built once; callable and `.lower`-able as a jitted function."""

  def __init__(self, step, mesh, strategy: str, min_bytes: int, donate_argnums):
    self._args = step, mesh, strategy, min_bytes, donate_argnums
    self._fn = None

  def _built(self, state):
    if self._fn is None:
      step, mesh, strategy, min_bytes, donate_argnums = self._args
      specs = sharding.state_specs(state, mesh.size, strategy, min_bytes)
      self._fn = parallel.data_parallel(
          functools.partial(step, specs=specs), mesh, in_specs=(specs, P(parallel.AXIS)),
          out_specs=(specs, P()), donate_argnums=donate_argnums)
    return self._fn

  def __call__(self, state, batch):
    return self._built(state)(state, batch)

  def lower(self, state, batch):
    return self._built(state).lower(state, batch)


def imbalance_loss_options(config: ml_collections.ConfigDict,
                           class_counts: Any) -> dict[str, Any] | None:
  """step.train_step's `imbalance` from config.imbalance and the train split's label counts
  (None: plain loss). class_counts may be None when neither weights nor tau is set."""
  from imgcls.evaluators import imbalance  # pylint: disable=g-import-not-at-top
  imb = config.get('imbalance')
  if imb is None or not (imb.class_weights not in ('', None) or imb.logit_adjust_tau):
    return None
  weights = None
  if imb.class_weights not in ('', None):
    weights = imbalance.class_weights(class_counts, imb.class_weights, imb.class_weights_beta)
  return {'log_prior': imbalance.log_prior(class_counts) if imb.logit_adjust_tau else None,
          'logit_adjust_tau': float(imb.logit_adjust_tau), 'class_weights': weights}


def needs_class_counts(config: ml_collections.ConfigDict) -> bool:
  """Whether the run uses the train split's class prior (config.imbalance)."""
  imb = config.get('imbalance')
  return imb is not None and bool(imb.class_weights not in ('', None) or imb.logit_adjust_tau
                                  or imb.posthoc_tau)


def total_steps(config: ml_collections.ConfigDict, builder) -> tuple[int, int]:
  """(steps per epoch, steps in all) of a run: total_steps, or num_epochs of the train split."""
  n_train = data.num_examples(builder, config.dataset.train_split)
  steps_per_epoch = max(1, n_train // config.batch_size)
  return steps_per_epoch, config.total_steps or int(round(config.num_epochs * steps_per_epoch))


def _pretrained(source: str, template: dict[str, Any], load: ml_collections.ConfigDict):
  """(variables, report) of config.model_init merged onto the template: an imgcls workdir
  or checkpoint folder (its best step, EMA weights when kept), or a weights file."""
  from imgcls.models import weights  # pylint: disable=g-import-not-at-top  (only for model_init)
  ckpt = checkpoints.find(source, 'best') if checkpoints.absolute(source).is_dir() else None
  try:
    variables, report = weights.load_pretrained(
        ckpt.weights('auto') if ckpt else source, template,
        fmt=weights.IMGCLS if ckpt else load.format or None,  # a workdir holds imgcls names
        strict=load.strict, ignore=[p for p in load.ignore.split(',') if p],
        posemb_resize=load.posemb_resize)
  except weights.WeightsError as e:
    raise checkpoints.CheckpointError(
        f'model_init {source}: {e}\nSet model_load.ignore / model_load.strict in '
        'the config to adapt.') from e
  if ckpt:
    report.source = str(ckpt.path)
  return variables, report


def load_model_init(config: ml_collections.ConfigDict, state, mesh):
  """The state with params (and BatchNorm statistics) from config.model_init, and the report.

  The head keeps its zero init when the class count differs and the position embedding is
  resized to the model's patch grid (imgcls.models.weights). Nothing is written here.
  """
  template = {'params': state.params}
  if state.batch_stats:
    template['batch_stats'] = state.batch_stats
  variables, report = _pretrained(config.model_init, parallel.to_host(template),
                                  config.model_load)
  logging.info('model_init: %s', report)
  # Placed as the state's arrays are: replicated, or config.sharding='fsdp' shards.
  shardings = jax.tree.map(lambda x: x.sharding, template)
  variables = {k: jax.device_put(v, shardings.get(k, parallel.replicated(mesh)))
               for k, v in variables.items()}
  return state.replace(params=variables['params'],
                       batch_stats=variables.get('batch_stats', state.batch_stats)), report


PROFILE_WARMUP = 5  # steps past the (resumed) start before config.profile_steps: compilation


def profile_window(start: int, num_steps: int, steps: int) -> range:
  """The train steps config.profile_steps traces: `steps` of them after PROFILE_WARMUP steps
  past `start`, fewer warm-up steps when the run is too short; empty when `steps` is 0."""
  if steps <= 0:
    return range(0)
  first = start + max(0, min(PROFILE_WARMUP, num_steps - start - steps))
  return range(first, min(first + steps, num_steps))


class StepProfiler:
  """A jax.profiler trace of a window of train steps in WORKDIR/profile/plugins/profile/TIME/
  (HOST.xplane.pb), which TensorBoard's Profile tab shows under `--logdir WORKDIR`. Process 0
  only: every process runs the same steps. The trace holds exactly the window's steps."""

  def __init__(self, workdir: str, window: range):
    self.window = window if jax.process_index() == 0 else range(0)
    self.logdir = str(checkpoints.absolute(workdir) / 'profile')
    self.active = False

  def before(self, step: int, state) -> None:
    if self.window and step == self.window[0]:
      jax.block_until_ready(state)  # the steps dispatched earlier stay out of the trace
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step == self.window[-1]:
      jax.block_until_ready(outputs)  # the last step runs to its end inside the trace
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profile of train steps %d-%d written to %s: `tensorboard --logdir WORKDIR`, '
                   'Profile tab', self.window[0], self.window[-1], self.logdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains, evaluates and checkpoints; resumes from WORKDIR's newest intact checkpoint.

  Returns the last eval's metrics under their written names (`eval_top1`, `val_top1`, ...),
  with the default evaluator's also without prefix (`top1`, `loss`, ...); after SIGTERM or
  SIGINT, {'preempted': True, 'step': N} once step N is saved. Every refusal (bad config,
  another run holding the workdir, a resume that would change the run's math without
  allow_config_change) happens before anything is written.
  """
  # ----------------------------------------------------------------- config
  config_lib.validate(config)
  cfg = config.to_dict()

  # ------------------------------------------------------------------- mesh
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, 'batch_size')
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  parallel.check_grad_accum(config.batch_size, config.grad_accum_steps, mesh)
  logging.info('mesh: %d devices over %d process(es), axis %r', mesh.size,
               jax.process_count(), parallel.AXIS)
  changes = run_config.check_resume(workdir, cfg, allow_config_change)
  # Process 0 holds the workdir's lock: a second launch is refused now, before minutes of
  # set-up; the lock is taken just before the first write, and released at the end.
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock:
    lock.check_free()
  with contextlib.ExitStack() as held:  # the lock, once taken below, is released on any exit
    if lock:
      held.callback(lock.release)

    # ------------------------------------------------------------------ input
    ds = config.dataset
    builder = data.builder_for(ds)
    steps_per_epoch, num_steps = total_steps(config, builder)
    eval_every = config.eval_every_steps or steps_per_epoch

    # ------------------------------------------------- model and evaluators
    model = models.from_config(config)
    context, evals = evaluators.from_config(config, model, mesh, builder)
    image_shape = context.image_shape()
    logging.info('data: %s %s (%d steps/epoch), image %s; %d steps in all; evaluators: %s',
                 ds.name, ds.train_split, steps_per_epoch, image_shape, num_steps,
                 ', '.join(f'{e.name} ({type(e).__name__})' for e in evals))

    # -------------------------------------------------------------- optimizer
    tx, schedule = optim.make_optimizer(config, num_steps)
    state = init_state(model, tx, config.seed, image_shape, mesh, ema=config.ema_decay > 0,
                       strategy=config.sharding, min_bytes=config.sharding_min_bytes)
    rules = optim.Rules(config.optimizer)
    rules.check(state.params)  # a typo'd rule fails here, before anything is written
    if rules.freeze:
      frozen = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(state.params)
                   if rules.frozen(optim.param_path(p)))
      logging.info('optimizer.freeze: %d of %d parameters frozen', frozen,
                   sum(x.size for x in jax.tree.leaves(state.params)))
    init_report = None
    if config.model_init and not checkpoints.has_checkpoints(workdir):  # before any write
      state, init_report = load_model_init(config, state, mesh)
      state = state.with_ema_reset()
    # Statistics read whole arrays: not of the shards other processes hold.
    parameter_overview.log_parameter_overview(
        state.params, include_stats=jax.process_count() == 1 or config.sharding == 'replicated')
    if lock:
      lock.acquire()  # nothing was written before this line

    # ------------------------------------------------------------- checkpoint
    ckpt = checkpoints.Checkpointer(workdir, asynchronous=config.async_checkpoints,
                                    best_metric=config.best_metric, keep=config.keep_checkpoints)
    start, restored = ckpt.restore_newest(state)
    if start:
      state = restored
      logging.info('resumed from the checkpoint at step %d', start)
    elif config.model_init and init_report is None:  # every saved step was damaged
      state, init_report = load_model_init(config, state, mesh)
      state = state.with_ema_reset()
    if jax.process_index() == 0:
      run_config.write(workdir, cfg)
      if changes:
        run_config.record_changes(workdir, start, changes)
        logging.warning('resuming at step %d with a changed config (--allow_config_change): %s',
                        start, '; '.join(changes))
    if not start and init_report is not None and jax.process_index() == 0:
      (checkpoints.absolute(workdir) / 'model_init_report.json').write_text(
          json.dumps(init_report.to_dict(), indent=2))
    meta = {'config': cfg, 'image_shape': list(image_shape), 'label_names': context.label_names}
    writer, jsonl = writers.create(workdir)
    if jsonl is not None:
      jsonl.truncate_after(start)
    if start == 0:
      writer.write_hparams({k: v for k, v in config_lib.flatten_dict(cfg).items()
                           if v is not None})

    # ------------------------------------------------------------------- loop
    train_iter = data.train_iterator(
        builder, split=ds.train_split, pp=config.pp_train,
        global_batch_size=config.batch_size, seed=config.seed, start_step=start,
        shuffle_buffer=ds.shuffle_buffer, cache=ds.cache,
        value_range_on_device=config.value_range_on_device,
        sampling=ds.get('sampling', 'uniform'))
    class_counts = None
    if needs_class_counts(config):  # counted once, kept in WORKDIR/class_counts.json
      from imgcls.data import label_counts  # pylint: disable=g-import-not-at-top
      class_counts = label_counts.cached_label_counts(
          builder, ds.train_split, workdir if jax.process_index() == 0 else None)
      logging.info('class counts of %s: %s', ds.train_split, class_counts.tolist())
      meta['class_counts'] = class_counts.tolist()  # with each checkpoint: imgcls.load's prior
    train_fn = make_train_fn(config, model, tx, mesh, value_range=train_iter.value_range,
                             class_counts=class_counts)
    progress = periodic_actions.ReportProgress(num_train_steps=num_steps, every_secs=30)
    pending: list[dict[str, Any]] = []  # metrics since the last log
    unchecked: list[Any] = []  # finite flags not yet read on the host (no sync per step)
    last_eval: dict[str, Any] | None = None
    t0, steps_timed = time.perf_counter(), 0
    # With several processes JAX's preemption service catches SIGTERM and Orbax's
    # reached_preemption names one step for all; a single process catches the signals itself.
    stop = preemption.StopSignals(enabled=jax.process_count() == 1)
    profiler = StepProfiler(workdir, profile_window(start, num_steps, config.profile_steps))
    with stop:
      try:
        for step in range(start, num_steps):
          profiler.before(step, state)
          batch = parallel.shard_batch(next(train_iter), mesh)
          first = step == start  # its compile (and run) time goes to the log
          t0 = time.perf_counter()
          with (parallel.CacheProbe() if first else contextlib.nullcontext()) as probe, \
               jax.profiler.StepTraceAnnotation('train', step_num=step):
            state, m = train_fn(state, batch)
          if first:
            jax.block_until_ready(m)
            logging.info('first step compiled and run in %.1f s (compilation cache: %s, %s)',
                         time.perf_counter() - t0, parallel.cache_state(), probe.result)
          profiler.after(step, (state, m))
          pending.append(m)
          unchecked.append(m['finite'])
          steps_timed += 1
          done = step + 1
          progress(done)
          is_log = done % config.log_every_steps == 0 or done == num_steps
          is_eval = done % eval_every == 0 or done == num_steps
          is_save = bool(config.checkpoint_every_steps) and (
              done % config.checkpoint_every_steps == 0)
          preempted = stop.requested or ckpt.manager.reached_preemption(done)
          if is_log or is_eval or is_save or preempted:  # never log, score or save a NaN state
            _check_finite(unchecked, done, ckpt)
            unchecked = []

          if is_log:
            summary = _train_summary(pending)
            dt = time.perf_counter() - t0
            rate = steps_timed / dt if dt > 0 else float('nan')
            summary.update(learning_rate=float(schedule(done - 1)), steps_per_sec=rate,
                           eta_min=(num_steps - done) / rate / 60 if rate else float('nan'))
            writer.write_scalars(done, summary)
            pending = []

          if is_eval:
            last_eval = evaluators.run(evals, state)
            evaluators.write(evals, workdir, done, writer)
            writer.write_scalars(done, last_eval)
            ckpt.save(done, state, meta, metrics=last_eval)
            t0, steps_timed = time.perf_counter(), 0
          elif is_save or preempted:
            ckpt.save(done, state, meta)
          if preempted:
            ckpt.wait()  # the asynchronous save is complete on disk
            writer.flush()
            logging.warning('%s: saved the checkpoint of step %d of %d%s; rerun the same command '
                            'to resume from it.', stop.signal_name or 'preempted', done,
                            num_steps, stop.since())
            return {'preempted': True, 'step': done}
      finally:
        profiler.stop()  # a run stopped inside the window keeps the trace of its steps
        ckpt.close()  # a diverged or crashed run still finishes the saves it started

    if last_eval is None:  # the run had already finished: score it again
      last_eval = evaluators.run(evals, state)
    writer.flush()
    result = evaluators.as_result(last_eval)
    logging.info('final eval at step %d: %s', num_steps, result)
    # pylint: disable-next=g-import-not-at-top
    from imgcls.evaluators import checkpoint as eval_checkpoint
    eval_checkpoint.calibrate_after_training(config, workdir)  # on val_split, never train data
    if jax.process_index() == 0:
      print(_final_line(config, result, num_steps), flush=True)
    return result


class DivergedError(UserError, FloatingPointError):
  """The loss or gradient became NaN/inf; nothing of that state was saved."""


def _check_finite(flags: list[Any], done: int, ckpt: checkpoints.Checkpointer) -> None:
  """DivergedError naming the first non-finite step of the last len(flags) and the last good
  checkpoint (the latest on disk: no non-finite state is ever saved)."""
  host = [bool(f) for f in parallel.to_host(flags)]
  if all(host):
    return
  bad = done - len(host) + host.index(False) + 1
  ckpt.wait()
  last = ckpt.latest_step()
  kept = (f'the last good checkpoint is step {last} (latest and best on disk: no non-finite '
          'state was saved); rerunning resumes from it' if last else
          'no checkpoint had been saved yet')
  raise DivergedError(
      f'the loss or gradient became NaN/inf at step {bad}: training stopped; {kept}. Lower '
      'lr.base, raise lr.warmup_steps or set grad_clip_norm (--allow_config_change to '
      'resume with them), or set skip_nonfinite_steps=N to skip up to N bad updates.')


def _final_line(config: ml_collections.ConfigDict, result: dict[str, Any], step: int) -> str:
  """'Final fashion_mnist test top-1: 0.9143 (...)' for the default evaluator, else each
  evaluator's top-1."""
  ds = config.dataset
  if 'top1' in result:
    return (f'Final {ds.name} {ds.eval_split} top-1: {result["top1"]:.4f} '
            f'(top-5 {result["top5"]:.4f}, loss {result["loss"]:.4f}, '
            f'{result["examples"]} examples) at step {step}')
  tops = ', '.join(f'{k} {v:.4f}' for k, v in result.items() if k.endswith('_top1'))
  return f'Final {ds.name} at step {step}: {tops}'


def _train_summary(pending: list[dict[str, Any]]) -> dict[str, float]:
  """Averages the metrics of the steps since the last log (already checked finite)."""
  host = [parallel.to_host(m) for m in pending]
  total = metrics_lib.TrainMetrics.from_step(host[0])
  for m in host[1:]:
    total = total.merge(metrics_lib.TrainMetrics.from_step(m))
  out = {f'train_{k}': float(v) for k, v in total.compute().items()}
  out['train_grad_norm'] = float(np.mean([m['grad_norm'] for m in host]))
  if 'skipped' in host[0]:  # skip_nonfinite_steps: updates skipped since the last log
    out['train_skipped_steps'] = int(sum(int(m['skipped']) for m in host))
  return out

