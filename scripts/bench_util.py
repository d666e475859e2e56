"""Helpers the benchmark scripts share (stdlib only: loads neither JAX nor TensorFlow)."""

from __future__ import annotations

import contextlib
import functools
import os


@functools.cache
def cpu_model_name() -> str:
  """The CPU's model name from /proc/cpuinfo, to print beside every speed figure."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown CPU'


@contextlib.contextmanager
def env_var(name: str, value: str):
  """Sets environment variable `name` inside the block and restores it after."""
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = old
