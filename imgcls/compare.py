"""Compare runs: one row per workdir under ROOT, with the config keys that differ.

compare(root) reads each run's config.json and metrics.jsonl and writes compare.md,
compare.csv and curves.png (eval top-1 and train loss against step) into `out`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from imgcls import config as config_lib
from imgcls.errors import UserError

# The metrics file's one owner: plain json, so `imgcls compare` answers without TF or JAX
# (imgcls.writers writes it).
METRICS_FILE = 'metrics.jsonl'

RESULT_COLUMNS = ('final_top1', 'best_top1', 'best_step', 'final_train_loss', 'steps')
# Shown only when some run has them: the EMA weights' top-1 and the calibration error.
OPTIONAL_COLUMNS = {'final_ema_top1': 'eval_ema_top1', 'final_ece': 'eval_ece'}


class CompareError(UserError):
  """Nothing to compare; the message says what was expected."""


def _flat(d: dict[str, Any]) -> dict[str, Any]:
  """Dotted keys; JSON lists back to the tuples the config held."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in config_lib.flatten_dict(d).items()}


def find_runs(root: str) -> list[str]:
  """Workdirs (folders holding config.json) under root, sorted; root itself may be one."""
  runs = []
  for dirpath, dirnames, filenames in os.walk(root):
    if 'config.json' in filenames:
      runs.append(dirpath)
      dirnames[:] = []  # a run's own folders (checkpoints, ...) hold no runs
    dirnames.sort()
  return sorted(runs)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl, one per logged step."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def summarize(workdir: str, metric: str = 'eval_top1') -> dict[str, Any]:
  """final/best value of the run's ranking metric (its best_metric, e.g. eval_top1) and
  its step, final train loss and steps of one run."""
  records = read_metrics(workdir)
  evals = [(r['step'], r[metric]) for r in records if metric in r]
  losses = [r['train_loss'] for r in records if 'train_loss' in r]
  best = max(evals, key=lambda e: (e[1], e[0])) if evals else (None, None)
  out = {'final_top1': evals[-1][1] if evals else None, 'best_top1': best[1],
         'best_step': best[0], 'final_train_loss': losses[-1] if losses else None,
         'steps': max((r['step'] for r in records), default=None)}
  for column, key in OPTIONAL_COLUMNS.items():
    values = [r[key] for r in records if key in r]
    out[column] = values[-1] if values else None
  return out


def table(root: str) -> tuple[list[str], list[dict[str, Any]]]:
  """Column names and rows: run, the differing config keys, then RESULT_COLUMNS."""
  runs = find_runs(root)
  if not runs:
    raise CompareError(f'no runs under {root}: expected workdirs of `imgcls train` or '
                       '`imgcls sweep` (folders with config.json and metrics.jsonl).')
  configs = []
  for r in runs:
    path = os.path.join(r, 'config.json')
    try:
      with open(path) as f:
        configs.append(_flat(json.load(f)))
    except (ValueError, AttributeError) as e:
      raise CompareError(f'{path} is damaged ({type(e).__name__}): rerun `imgcls train` on '
                         'that workdir to recover it from its checkpoints, or move the run '
                         'out of the way.') from None
  keys = sorted({k for c in configs for k in c})
  missing = object()
  differing = [k for k in keys if len({repr(c.get(k, missing)) for c in configs}) > 1]
  rows = []
  for run, config in zip(runs, configs):
    name = os.path.relpath(run, root)
    row = {'run': name if name != '.' else os.path.basename(os.path.abspath(run))}
    row.update({k: config.get(k) for k in differing})
    row.update(summarize(run, config.get('best_metric') or 'eval_top1'))
    rows.append(row)
  optional = [c for c in OPTIONAL_COLUMNS if any(r[c] is not None for r in rows)]
  return ['run', *differing, *RESULT_COLUMNS, *optional], rows


def _cell(v: Any) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4f}' if math.isfinite(v) else str(v)
  return str(v)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
  def line(cells):
    return '| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |'
  out = [line(columns), '|' + '|'.join('---' for _ in columns) + '|']
  out += [line([_cell(r[c]) for c in columns]) for r in rows]
  return '\n'.join(out) + '\n'


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(columns)
  w.writerows([['' if r[c] is None else r[c] for c in columns] for r in rows])
  return buf.getvalue()


def plot(root: str, runs: list[str], path: str) -> None:
  """curves.png: eval top-1 and train loss against step, one line per run."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(11, 4), layout='constrained')
  FigureCanvasAgg(fig)
  ax_top1, ax_loss = fig.subplots(1, 2)
  for run in runs:
    records = read_metrics(os.path.join(root, run))
    for ax, key in ((ax_top1, 'eval_top1'), (ax_loss, 'train_loss')):
      points = [(r['step'], r[key]) for r in records if key in r]
      if points:
        ax.plot(*zip(*points), marker='.', label=run)
  for ax, title in ((ax_top1, 'eval top-1'), (ax_loss, 'train loss')):
    ax.set_xlabel('step')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  ax_top1.legend(fontsize='small')
  fig.savefig(path, dpi=100)


def compare(root: str, out: str | None = None) -> str:
  """Writes compare.md, compare.csv and curves.png into out (default root); returns the md."""
  if not os.path.isdir(root):
    raise CompareError(f'{root} is not a folder: pass the folder holding the runs.')
  columns, rows = table(root)
  out = out or root
  os.makedirs(out, exist_ok=True)
  markdown = to_markdown(columns, rows)
  with open(os.path.join(out, 'compare.md'), 'w') as f:
    f.write(markdown)
  with open(os.path.join(out, 'compare.csv'), 'w') as f:
    f.write(to_csv(columns, rows))
  runs = [os.path.relpath(r, root) for r in find_runs(root)]
  plot(root, runs, os.path.join(out, 'curves.png'))
  return markdown
