"""The evaluator registry, the protocol and what evaluators share (the run's context)."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from imgcls import data, parallel, step as step_lib
from imgcls.registry import Registry

# Evaluator types by name; each module registers its class, declared in evaluators/__init__.
EVALUATORS = Registry('evaluator')


def make_eval_fn(model, loss: str, mesh, tta: str = '',
                 value_range: dict[str, float] | None = None, logit_offset: Any = None):
  """step.eval_step under shard_map over the mesh's batch axis: (global sums, batch-sharded
  per-example outputs). Every evaluator's step; scripts/benchmark.py times this same one.
  value_range: the input's (`EvalData.value_range`), applied on the device. logit_offset:
  [K] subtracted from the logits (post-hoc logit adjustment, `posthoc_logit_offset`)."""
  return parallel.data_parallel(
      functools.partial(step_lib.eval_step, model=model, loss=loss, axis_name=parallel.AXIS,
                        tta=tta, value_range=value_range, logit_offset=logit_offset),
      mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P(parallel.AXIS)))


class Evaluator:
  """Base of the registered evaluators: `OPTIONS` (name -> default) are the options a
  config may set; `check` reports bad ones before anything runs; `__call__(state)` returns
  metrics without prefix; `write(workdir, step, writer)` writes files of the last call."""
  OPTIONS: ClassVar[dict[str, Any]] = {}
  prefix: str = ''

  def __init__(self, name: str, context: 'Context'):
    self.name = name
    self.prefix = name
    self.context = context

  @classmethod
  def check(cls, options: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """Problems with `options` that need no data or model (for config validation)."""
    del options, config
    return []

  def __call__(self, state: Any) -> dict[str, float]:
    raise NotImplementedError

  def write(self, workdir: str, step: int, writer: Any) -> None:
    del workdir, step, writer


def posthoc_logit_offset(config: ml_collections.ConfigDict, builder: Any,
                         counts: Any = None) -> np.ndarray | None:
  """tau * log(prior) of config.imbalance.posthoc_tau (the train split's label frequencies,
  or `counts`), which the eval step subtracts from the logits; None when tau is 0."""
  tau = config.get('imbalance', {}).get('posthoc_tau', 0.0)
  if not tau:
    return None
  from imgcls.data import label_counts  # pylint: disable=g-import-not-at-top  (TensorFlow)
  from imgcls.evaluators import imbalance  # pylint: disable=g-import-not-at-top
  if counts is None:
    counts = label_counts.memo_label_counts(builder, config.dataset.train_split)
  return tau * imbalance.log_prior(counts)


class Context:
  """What a run's evaluators share: the config, the model, the mesh, the dataset's builder
  and class names, and the jitted eval steps (one per test-time augmentation and value_range,
  compiled once for all the evaluators that use it)."""

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: Any, builder: Any,
               label_names: list[str] | None = None):
    self.config = config
    self.model = model
    self.mesh = mesh
    self.builder = builder
    self.label_names = label_names
    self._data: dict[tuple[str, str], data.EvalData] = {}
    self._eval_fns: dict[tuple[str, tuple[tuple[str, float], ...]], Any] = {}

  @property
  def multilabel(self) -> bool:
    return self.config.loss == 'sigmoid_xent'

  def eval_fn_for(self, tta: str = '', value_range: dict[str, float] | None = None):
    """The data-parallel eval step (global sums, batch-sharded per-example outputs) with
    test-time augmentation `tta` (step.TTA: '' none) for the batches of an EvalData with this
    `value_range` (None: float batches), built once per kind."""
    key = (tta, tuple(sorted((value_range or {}).items())))
    if key not in self._eval_fns:
      self._eval_fns[key] = make_eval_fn(self.model, self.config.loss, self.mesh, tta,
                                         value_range, posthoc_logit_offset(self.config,
                                                                           self.builder))
    return self._eval_fns[key]

  def image_shape(self) -> tuple[int, ...]:
    """The shape of one image as the eval pipeline (pp_eval on eval_split) gives it."""
    batch = next(iter(self.eval_data(self.config.dataset.eval_split)))
    return tuple(batch['image'].shape[1:])

  def eval_data(self, split: str, pp: str = '') -> data.EvalData:
    """The exact eval pipeline of a split of the run's dataset (built once per split/pp);
    its `value_range` is what the eval step applies on the device (`eval_fn_for`)."""
    key = (split, pp or self.config.pp_eval)
    if key not in self._data:
      self._data[key] = data.eval_data(
          self.builder, split=split, pp=key[1], global_batch_size=self.config.eval_batch_size,
          value_range_on_device=self.config.value_range_on_device)
    return self._data[key]
