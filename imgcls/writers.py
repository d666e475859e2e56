"""Metric writers: clu's TensorBoard + console writers plus a JSON-lines file.

clu has no JSON-lines writer, so `JsonlWriter` is written here: one record per
logged step in WORKDIR/metrics.jsonl, for scripts that compare runs.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from clu import metric_writers
from etils import epath
import jax
import numpy as np

from imgcls.compare import METRICS_FILE  # the file's one owner (it reads without TF or JAX)


def _plain(v: Any) -> Any:
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": N, name: value, ...} lines; drops lines past a resume step."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / METRICS_FILE
    self._lines: list[str] = (self.path.read_text().splitlines()
                              if self.path.exists() else [])

  def truncate_after(self, step: int) -> None:
    """On resume, forget what was logged after the checkpoint we restart from."""
    self._lines = [l for l in self._lines if l and json.loads(l)['step'] <= step]
    self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self._lines.append(json.dumps(record))
    # Appending is not possible on every file system (gs://), so rewrite; small.
    self.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self) -> None:
    tmp = self.path.parent / (self.path.name + '.tmp')
    tmp.write_text('\n'.join(self._lines) + ('\n' if self._lines else ''))
    tmp.replace(self.path)

  def close(self) -> None:
    self.flush()


def create(workdir: str) -> tuple[metric_writers.MetricWriter, JsonlWriter | None]:
  """TensorBoard + console (+ JSON lines) on process 0; console only elsewhere."""
  tb = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                            asynchronous=True)
  if jax.process_index() > 0:
    return tb, None
  jsonl = JsonlWriter(workdir)
  return metric_writers.MultiWriter([tb, jsonl]), jsonl
