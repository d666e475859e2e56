"""Evaluators: what an eval measures, as a list built from the config (big_vision's
`config.evals`). The training loop and `imgcls eval` run the same list.

The protocol, kept small:

  evaluator = EVALUATORS.get(type)(name, context, **options)   # checks everything up front
  metrics = evaluator(state)            # {'top1': ..., ...} without prefix; state: TrainState
  evaluator.write(workdir, step, writer)   # optional: files and images of the last call

Metrics are written as `{prefix}_{key}` (prefix: the option `prefix`, default the name).
A config lists its evaluators under `evals`, one group each with a `type` and options:

  c.evals.val = dict(type='classification', split='validation')
  c.evals.test = dict(type='classification', split='test', reports=False)
  c.evals.fewshot = dict(type='fewshot', shots=(1, 5, 10))

With `evals` empty (the default) the list is built from the older fields, so existing
configs keep their meaning: `eval` (classification on dataset.eval_split, reports per
eval_reports, the multi-label threshold tuned on dataset.val_split) and, when fewshot.shots
is set, a few-shot probe whose metrics are written as eval_fewshot_*.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from imgcls.evaluators.base import EVALUATORS, Context, Evaluator
# Each module registers its evaluator types where they are defined.
from imgcls.evaluators import classification, fewshot  # noqa: F401  pylint: disable=unused-import

__all__ = ['EVALUATORS', 'Context', 'Evaluator', 'build', 'check', 'eval_tta', 'run', 'specs']

GENERIC_OPTIONS = ('type', 'prefix')


def specs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """{name: options (with 'type' and 'prefix')} of the config's evaluators."""
  if config.get('evals'):
    out = {}
    for name, spec in config.evals.items():
      spec = dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec)
      spec.setdefault('prefix', name)
      out[name] = spec
    return out
  ds = config.dataset
  out = {'eval': dict(type='classification', prefix='eval', split=ds.eval_split,
                      reports=config.eval_reports, val_split=ds.val_split)}
  fs = config.fewshot
  if fs.shots:
    out['fewshot'] = dict(type='fewshot', prefix='eval', shots=tuple(fs.shots),
                          seeds=tuple(fs.seeds), train_split=fs.train_split,
                          test_split=fs.test_split, max_test_examples=fs.max_test_examples)
  return out


def eval_tta(config: ml_collections.ConfigDict) -> str:
  """The test-time augmentation of the run's `eval` evaluator ('' if none): what its
  eval_* metrics were scored with, so `imgcls eval --split` and the benchmark's config mode
  score and time the same eval step."""
  return specs(config).get('eval', {}).get('tta', '')


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
