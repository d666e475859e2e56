"""train_and_evaluate(config, workdir): the whole training run, top to bottom.

Sections: config, mesh, input, model and optimizer, steps, checkpoint, loop. All
checks that can fail on bad input run before anything is written to the workdir.
"""

from __future__ import annotations

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

from imgcls import augment, checkpoints, config as config_lib, data, evaluate, fewshot, models
from imgcls import optim
from imgcls import parallel, reports, step as step_lib, writers
from imgcls.models import weights


def build_model(config: ml_collections.ConfigDict, **overrides: Any):
  """The model the config names, with num_classes from the dataset."""
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  kwargs.update(overrides)
  return models.get_model(config.model.name, num_classes=config.dataset.num_classes,
                          **kwargs)


def make_eval_fn(model, mesh, loss: str = 'softmax_xent'):
  """The data-parallel eval step: (global sums, batch-sharded per-example outputs)."""
  return parallel.data_parallel(
      functools.partial(step_lib.eval_step, model=model, loss=loss, axis_name=parallel.AXIS),
      mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P(parallel.AXIS)))


def init_state(model, tx, seed: int, image_shape: tuple[int, ...], mesh, ema: bool = False):
  """The initial train state (with an EMA copy of the weights if asked), replicated."""
  create = functools.partial(step_lib.create_train_state, model, tx,
                             input_shape=tuple(image_shape), ema=ema)
  return jax.jit(create, out_shardings=parallel.replicated(mesh))(
      jax.random.PRNGKey(seed))


def load_model_init(config: ml_collections.ConfigDict, state, mesh):
  """The state with params (and BatchNorm statistics) from config.model_init, and the report.

  The head keeps its zero init when the class count differs and the position embedding is
  resized to the model's patch grid (imgcls.models.weights). Nothing is written here.
  """
  load = config.model_load
  template = {'params': state.params}
  if state.batch_stats:
    template['batch_stats'] = state.batch_stats
  try:
    variables, report = weights.load_pretrained(
        config.model_init, parallel.to_host(template), fmt=load.format or None,
        strict=load.strict, ignore=[p for p in load.ignore.split(',') if p],
        posemb_resize=load.posemb_resize)
  except weights.WeightsError as e:
    raise checkpoints.CheckpointError(
        f'model_init {config.model_init}: {e}\nSet model_load.ignore / model_load.strict in '
        'the config to adapt.') from e
  logging.info('model_init: %s', report)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  return state.replace(params=variables['params'],
                       batch_stats=variables.get('batch_stats', state.batch_stats)), report


def eval_input(config: ml_collections.ConfigDict, split: str, data_dir: str | None = None):
  """The dataset's builder, its exact eval pipeline on `split`, and the image shape."""
  ds = config.dataset
  builder = data.get_builder(ds.name, data_dir or ds.data_dir, prepare=ds.prepare,
                             num_classes=ds.num_classes, skip_corrupt=ds.skip_corrupt,
                             folder_split=ds.folder_split, folder_seed=ds.folder_seed)
  eval_ds = data.eval_data(builder, split=split, pp=config.pp_eval,
                           global_batch_size=config.eval_batch_size)
  return builder, eval_ds, next(iter(eval_ds))['image'].shape[1:]


def label_names(builder) -> list[str] | None:
  """The class names of the dataset's label (or multi-label 'labels') feature."""
  found = data.sources.class_label(builder)
  return list(found[1].names) or None if found else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains, evaluates and checkpoints; resumes from WORKDIR's latest checkpoint."""
  # ----------------------------------------------------------------- config
  config_lib.validate(config)
  cfg = config.to_dict()

  # ------------------------------------------------------------------- mesh
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh, 'batch_size')
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  logging.info('mesh: %d devices over %d process(es), axis %r', mesh.size,
               jax.process_count(), parallel.AXIS)
  checkpoints.check_compatible(workdir, cfg)

  # ------------------------------------------------------------------ input
  ds = config.dataset
  builder, eval_ds, image_shape = eval_input(config, ds.eval_split)
  n_train = data.num_examples(builder, ds.train_split)
  steps_per_epoch = max(1, n_train // config.batch_size)
  total_steps = config.total_steps or int(round(config.num_epochs * steps_per_epoch))
  eval_every = config.eval_every_steps or steps_per_epoch
  logging.info('data: %s %s (%d examples, %d steps/epoch), eval %s (%d examples), '
               'image %s; %d steps in all', ds.name, ds.train_split, n_train,
               steps_per_epoch, ds.eval_split, eval_ds.num_examples, image_shape,
               total_steps)

  # ---------------------------------------------------- model and optimizer
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config, total_steps)
  state = init_state(model, tx, config.seed, image_shape, mesh, ema=config.ema_decay > 0)
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
  parameter_overview.log_parameter_overview(state.params)

  # ------------------------------------------------------------------ steps
  train_fn = parallel.data_parallel(
      functools.partial(step_lib.train_step, model=model, tx=tx,
                        label_smoothing=config.label_smoothing, loss=config.loss,
                        mix=augment.MixConfig(**config.mixup.to_dict()),
                        ema_decay=config.ema_decay, axis_name=parallel.AXIS),
      mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()), donate_argnums=(0,))
  eval_fn = make_eval_fn(model, mesh, config.loss)
  fewshot_eval = None
  if config.fewshot.shots:  # reads the labels now: a class too small fails before any write
    fs = config.fewshot
    fewshot_eval = fewshot.FewShotEvaluator(
        builder, fs.train_split or ds.train_split, fs.test_split or ds.eval_split,
        config.pp_eval, ds.num_classes, shots=fs.shots, seeds=fs.seeds,
        batch_size=config.eval_batch_size, max_test_examples=fs.max_test_examples or None)
    features_fn = fewshot.make_features_fn(model, mesh)
  val_ds = None
  if ds.val_split:  # multi-label: where the reports choose the F1 threshold
    val_ds = data.eval_data(builder, split=ds.val_split, pp=config.pp_eval,
                            global_batch_size=config.eval_batch_size)

  # ------------------------------------------------------------- checkpoint
  ckpt = checkpoints.Checkpointer(workdir, asynchronous=config.async_checkpoints)
  if jax.process_index() == 0:
    (checkpoints.absolute(workdir) / 'config.json').write_text(json.dumps(cfg, indent=2))
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, state)
    logging.info('resumed from the checkpoint at step %d', start)
  elif init_report is not None and jax.process_index() == 0:
    (checkpoints.absolute(workdir) / 'model_init_report.json').write_text(
        json.dumps(init_report.to_dict(), indent=2))
  meta = {'config': cfg, 'image_shape': list(image_shape), 'label_names': label_names(builder)}
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
      shuffle_buffer=ds.shuffle_buffer, cache=ds.cache)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, every_secs=30)
  pending: list[dict[str, Any]] = []
  last_eval: dict[str, float] | None = None
  t0, steps_timed = time.perf_counter(), 0
  for step in range(start, total_steps):
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, m = train_fn(state, parallel.shard_batch(next(train_iter), mesh))
    pending.append(m)
    steps_timed += 1
    done = step + 1
    progress(done)

    if done % config.log_every_steps == 0 or done == total_steps:
      summary = _train_summary(pending, done)
      dt = time.perf_counter() - t0
      rate = steps_timed / dt if dt > 0 else float('nan')
      summary.update(learning_rate=float(schedule(done - 1)), steps_per_sec=rate,
                     eta_min=(total_steps - done) / rate / 60 if rate else float('nan'))
      writer.write_scalars(done, summary)
      pending = []

    if done % eval_every == 0 or done == total_steps:
      last_eval = run_eval(config, eval_fn, state, eval_ds, mesh, workdir, done, writer,
                           label_names(builder), val_ds)
      if fewshot_eval is not None:
        last_eval.update(fewshot_eval(functools.partial(
            features_fn, {'params': state.params, 'batch_stats': state.batch_stats})))
      writer.write_scalars(done, {f'eval_{k}': v for k, v in last_eval.items()})
      ckpt.save(done, state, meta, metrics=last_eval)
      t0, steps_timed = time.perf_counter(), 0
    elif config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0:
      ckpt.save(done, state, meta)
    if ckpt.manager.reached_preemption(done):
      if ckpt.latest_step() != done:  # not saved by the eval above
        ckpt.save(done, state, meta)
      ckpt.close()
      logging.warning('preempted: saved step %d; rerun the same command to resume.', done)
      return {}

  if last_eval is None:  # the run had already finished: score it again
    last_eval, _ = _score(eval_fn, state, eval_ds, mesh)
  writer.flush()
  ckpt.close()
  logging.info('final eval on %s at step %d: %s', ds.eval_split, total_steps, last_eval)
  if jax.process_index() == 0:
    print(f'Final {ds.name} {ds.eval_split} top-1: {last_eval["top1"]:.4f} '
          f'(top-5 {last_eval["top5"]:.4f}, loss {last_eval["loss"]:.4f}, '
          f'{last_eval["examples"]} examples) at step {total_steps}', flush=True)
  return last_eval


def _score(eval_fn, state, eval_ds, mesh, **collect):
  """evaluate.evaluate of the raw weights, plus the EMA weights' numbers as ema_* when the
  state keeps an EMA."""
  result, outputs = evaluate.evaluate(eval_fn, state, eval_ds, mesh, **collect)
  if state.ema_params is not None:
    ema_eval, _ = evaluate.evaluate(eval_fn, state.ema(), eval_ds, mesh)
    result.update({f'ema_{k}': v for k, v in ema_eval.items() if k != 'examples'})
  return result, outputs


def run_eval(config, eval_fn, state, eval_ds, mesh, workdir: str, step: int, writer,
             names: list[str] | None, val_ds=None) -> dict[str, float]:
  """Scores the raw weights (and the EMA ones, as ema_*) on every eval example and, with
  config.eval_reports, adds the report's numbers and writes its figures (imgcls.reports):
  to WORKDIR/reports/ as PNG + JSON and to TensorBoard as images."""
  result, outputs = _score(eval_fn, state, eval_ds, mesh, collect=config.eval_reports,
                           keep_images=16)
  if outputs is None:
    return result
  if config.loss == 'sigmoid_xent':
    val = evaluate.evaluate(eval_fn, state, val_ds, mesh, collect=True)[1] if val_ds else None
    report = reports.multi_label_report(
        outputs.probs, outputs.labels, names,
        val_scores=None if val is None else val.probs,
        val_targets=None if val is None else val.labels)
  else:
    report = reports.single_label_report(
        outputs.probs, np.argmax(outputs.labels, -1), names,
        images={index: image for _, index, image in outputs.mistakes})
  result.update({k: v for k, v in report.scalars.items() if k not in result})
  if jax.process_index() == 0:
    reports.write_report(report, checkpoints.absolute(workdir) / 'reports', step)
    writer.write_images(step, {f'eval_{k}': v[None] for k, v in report.images.items()})
  return result


def _train_summary(pending: list[dict[str, Any]], step: int) -> dict[str, float]:
  """Averages the metrics of the steps since the last log; fails on NaN/inf."""
  host = [parallel.to_host(m) for m in pending]
  if not all(bool(m['finite']) for m in host):
    raise FloatingPointError(
        f'the loss or gradient became NaN/inf before step {step}. Lower lr.base, raise '
        'lr.warmup_steps or set grad_clip_norm; rerunning resumes from the last good '
        'checkpoint.')
  total = evaluate.TrainMetrics.from_step(host[0])
  for m in host[1:]:
    total = total.merge(evaluate.TrainMetrics.from_step(m))
  out = {f'train_{k}': float(v) for k, v in total.compute().items()}
  out['train_grad_norm'] = float(np.mean([m['grad_norm'] for m in host]))
  return out


def evaluate_checkpoint(workdir: str, which: str = 'best', split: str | None = None,
                        data_dir: str | None = None) -> dict[str, Any]:
  """Scores a saved checkpoint ('best', 'latest' or a step) on a split; writes JSON."""
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  step = ckpt.resolve(which)
  config = ml_collections.ConfigDict(ckpt.restore_meta(step)['config'])
  ds = config.dataset
  split = split or ds.eval_split
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  _, eval_ds, image_shape = eval_input(config, split, data_dir)
  model = build_model(config)
  tx, _ = optim.make_optimizer(config, max(1, config.total_steps or 1))
  state = ckpt.restore(step, init_state(model, tx, config.seed, image_shape, mesh,
                                        ema=config.get('ema_decay', 0.0) > 0))
  result, _ = evaluate.evaluate(make_eval_fn(model, mesh, config.get('loss', 'softmax_xent')),
                                state, eval_ds, mesh)
  result.update(step=step, split=split, dataset=ds.name)
  if jax.process_index() == 0:
    out = checkpoints.absolute(workdir) / f'eval_{split}_step{step}.json'
    out.write_text(json.dumps(result, indent=2))
    result['written_to'] = str(out)
  ckpt.close()
  return result
