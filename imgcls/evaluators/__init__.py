"""Evaluation, in one package: what an eval measures, as a list built from the config
(big_vision's `config.evals`). The training loop and `imgcls eval` run the same list.

  base.py            the protocol (`Evaluator`), the registry, the run's shared `Context`
  classification.py  loss, top-1/top-5 of a split (raw and EMA weights), with its reports
  reports.py         confusion matrix, per-class numbers, calibration, mistakes; PNG + JSON
  figures.py         the reports' figures (matplotlib Agg renders)
  metrics.py         scoring a whole split exactly once into clu metrics; train metrics
  fewshot.py         the few-shot evaluator on frozen features; ridge.py: its ridge math
  checkpoint.py      `evaluate_checkpoint` (imgcls eval), `fewshot_checkpoint` (imgcls fewshot)
  calibration.py, conformal.py, selective.py, imbalance.py, explain.py: the math of the
                     reliability evaluators (pure numpy)

The protocol, kept small:

  evaluator = EVALUATORS.get(type)(name, context, **options)   # checks everything up front
  metrics = evaluator(state)            # {'top1': ..., ...} without prefix; state: TrainState
  evaluator.write(workdir, step, writer)   # optional: files and images of the last call

A new kind is a module here whose class subclasses `Evaluator`, is registered with
`@EVALUATORS.register(type)` and is declared below (`EVALUATORS.declare(type, module)`). Metrics are written as `{prefix}_{key}`
(prefix: the option `prefix`, default the name). `config.defaults()` declares the default
list (`evals.eval`, a classification of dataset.eval_split); a config adds to it
(`c.evals.val = dict(type='classification', split='validation')`) or replaces it
(`c.evals = ml_collections.ConfigDict({...})`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from imgcls import data
from imgcls.evaluators.base import EVALUATORS, Context, Evaluator

# Each type's module registers its class where it is defined; it is imported when a config
# first uses the type (EVALUATORS.get), so a run without few-shot never loads its code.
EVALUATORS.declare('classification', 'imgcls.evaluators.classification')
EVALUATORS.declare('fewshot', 'imgcls.evaluators.fewshot')

__all__ = ['EVALUATORS', 'Context', 'Evaluator', 'as_result', 'build', 'check', 'eval_tta',
           'eval_value_range', 'from_config', 'run', 'specs', 'write']

GENERIC_OPTIONS = ('type', 'prefix')


def specs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{name: options (with 'type' and 'prefix')} of the config's evaluators."""
  out = {}
  for name, spec in config.evals.items():
    spec = dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec)
    spec.setdefault('prefix', name)
    out[name] = spec
  return out


def eval_tta(config: ml_collections.ConfigDict) -> str:
  """The test-time augmentation of the run's `eval` evaluator ('' if none): what its
  eval_* metrics were scored with, so `imgcls eval --split` and the benchmark's config mode
  score and time the same eval step."""
  return specs(config).get('eval', {}).get('tta', '')


def eval_value_range(config: ml_collections.ConfigDict) -> dict[str, float] | None:
  """The value_range the run's `eval` evaluator's step applies on the device (its input's
  `EvalData.value_range`), for the benchmark's fake batches; None: float batches."""
  from imgcls.data import preprocess  # pylint: disable=g-import-not-at-top
  pp = specs(config).get('eval', {}).get('pp') or config.pp_eval
  return preprocess.split_value_range(pp, config.value_range_on_device)[1]


def check(config: ml_collections.ConfigDict) -> list[str]:
  """Problems with the evaluator list (types, options, best_metric), for config.validate."""
  errors = []
  all_specs = specs(config)
  for name, spec in all_specs.items():
    kind = spec.get('type')
    if kind not in EVALUATORS:
      errors.append(f"evals.{name}.type: {EVALUATORS.unknown(kind)}")
      continue
    allowed = set(EVALUATORS.get(kind).OPTIONS) | set(GENERIC_OPTIONS)
    for key in spec:
      if key not in allowed:
        errors.append(f"unknown option 'evals.{name}.{key}' for a {kind} evaluator. Valid: "
                      f"{', '.join(sorted(allowed))}.")
    errors += [f'evals.{name}: {e}' for e in EVALUATORS.get(kind).check(spec, config)]
  if not all_specs:
    return errors + ["evals is empty: keep the default `eval` evaluator (config.defaults()) or "
                     "add one, e.g. c.evals.eval = dict(type='classification')."]
  prefixes = sorted({spec['prefix'] for spec in all_specs.values()})
  best = config.get('best_metric') or ''
  if best and not any(best.startswith(p + '_') for p in prefixes):
    errors.append(f"best_metric {best!r} is not written by any evaluator (their metrics start "
                  f"with {', '.join(p + '_' for p in prefixes)}): set e.g. --config.best_metric="
                  f"{prefixes[0]}_top1.")
  return errors


def build(config: ml_collections.ConfigDict, context: Context) -> list[Evaluator]:
  """The config's evaluators, constructed (bad splits or too-small classes fail here)."""
  out = []
  for name, spec in specs(config).items():
    options = {k: v for k, v in spec.items() if k not in GENERIC_OPTIONS}
    evaluator = EVALUATORS.get(spec['type'])(name, context, **options)
    evaluator.prefix = spec['prefix']
    out.append(evaluator)
  return out


def from_config(config: ml_collections.ConfigDict, model, mesh, builder
                ) -> tuple[Context, list[Evaluator]]:
  """The evaluators' shared context and the config's evaluators (bad splits and too-small
  few-shot pools fail here, before anything is written)."""
  context = Context(config, model, mesh, builder, data.label_names(builder))
  return context, build(config, context)


def run(evaluators: list[Evaluator], state: Any) -> dict[str, Any]:
  """Runs every evaluator on the state; returns {prefix_key: value}."""
  out: dict[str, Any] = {}
  for evaluator in evaluators:
    out.update({f'{evaluator.prefix}_{k}': v for k, v in evaluator(state).items()})
  return out


def write(evaluators: list[Evaluator], workdir: str, step: int, writer: Any) -> None:
  """Lets each evaluator write the files of its last call (reports), where it has any."""
  for evaluator in evaluators:
    evaluator.write(workdir, step, writer)


def as_result(metrics: dict[str, Any]) -> dict[str, Any]:
  """The metrics under their written names, and the default `eval_` ones also without it."""
  return {**metrics, **{k[len('eval_'):]: v for k, v in metrics.items()
                        if k.startswith('eval_')}}
