"""Stopping a run cleanly on SIGTERM (how TPU VMs, spot VMs, Kubernetes and SLURM announce
preemption) or SIGINT (Ctrl-C): the loop finishes the step it is in, saves it, and exits 0.

Single process: these handlers set a flag that the loop reads after every step. Several
processes (jax.distributed): JAX's own preemption service catches SIGTERM on any process
and Orbax's `CheckpointManager.reached_preemption(step)` turns true on every process at the
same step, so all save one consistent checkpoint; installing a Python handler there would
replace JAX's, so none is installed.
"""

from __future__ import annotations

import signal
import threading
import time

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """`with StopSignals():` catches SIGTERM/SIGINT into `requested`; the old handlers come
  back on exit. A second signal while stopping is logged and ignored: it must not cut the
  save short (Orbax writes to a temporary folder and renames it only when complete)."""

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.signal_name: str | None = None
    self.received_at: float | None = None
    self._old = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def since(self) -> str:
    """', 1.2 s after SIGTERM' once a signal came (for the log line), else ''."""
    if self.received_at is None:
      return ''
    return f', {time.monotonic() - self.received_at:.1f} s after {self.signal_name}'

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      logging.warning('%s again: already stopping, the checkpoint is being saved.', name)
      return
    self.signal_name, self.received_at = name, time.monotonic()
    logging.warning('%s: finishing this step, then saving a checkpoint and exiting.', name)

  def __enter__(self) -> 'StopSignals':
    if self.enabled and threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._old.items():
      signal.signal(s, handler)
    self._old = {}
