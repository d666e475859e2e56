"""CPU speed levers, all in this one place. Each is off on GPUs and TPUs, and the model files
keep reading as the math: they call `conv2d` here instead of `lax.conv_general_dilated`.

  native_bf16()       does this CPU compute bfloat16 itself (AMX or AVX512-BF16)?
  auto_dtype()        what model.dtype='auto' means: bfloat16 on GPUs, TPUs and native-bf16
                      CPUs, float32 elsewhere (emulated bf16 is no faster than float32 there)
  set_xla_flags()     XLA CPU flags, set before JAX starts its backends (the CLI and the
                      benchmark call it): oneDNN for bf16 convs and matmuls on native-bf16 CPUs
  conv2d()            convolution lowering: on a CPU backend, 1x1 and stride-1 convs become
                      matmuls (im2col) with their own gradient; elsewhere lax's convolution

Each lever was kept because scripts/benchmark.py measured it winning (README, "Speed").
"""

from __future__ import annotations

import functools
import os
from typing import Any

ONEDNN_FLAG = '--xla_cpu_experimental_onednn_custom_call=true'
OFF_ENV = 'IMGCLS_CPU_LEVERS'  # =0 turns every lever here off (for A/B measurements)


def levers_on() -> bool:
  return os.environ.get(OFF_ENV, '1') != '0'


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    pass
  return frozenset()


def native_bf16() -> bool:
  """True on CPUs with AMX-BF16 or AVX512-BF16 (bf16 matmuls in hardware)."""
  return bool({'amx_bf16', 'avx512_bf16'} & cpu_flags())


def set_xla_flags() -> str:
  """Adds the CPU flags to XLA_FLAGS (before JAX initialises its backends); returns them.

  Only on native-bf16 CPUs: without the flag XLA:CPU runs bf16 convs and transposed bf16
  matmuls in float32, with it oneDNN runs them on AMX (2x a ResNet-18 step). It leaves
  float32 untouched and only concerns the CPU backend, so it is harmless beside a GPU.
  """
  current = os.environ.get('XLA_FLAGS', '')
  if levers_on() and native_bf16() and 'onednn_custom_call' not in current:
    os.environ['XLA_FLAGS'] = f'{current} {ONEDNN_FLAG}'.strip()
  return os.environ.get('XLA_FLAGS', '')


def auto_dtype(platform: str | None = None) -> str:
  """model.dtype='auto': 'bfloat16' on GPU/TPU and on native-bf16 CPUs, else 'float32'."""
  if platform is None:
    import jax  # noqa: PLC0415  (only when asked: config validation must not start JAX)
    platform = jax.default_backend()
  if platform != 'cpu' or native_bf16():
    return 'bfloat16'
  return 'float32'


def on_cpu() -> bool:
  import jax  # noqa: PLC0415
  return levers_on() and jax.default_backend() == 'cpu'


def conv2d(x: Any, kernel: Any, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> Any:
  """NHWC x HWIO convolution; on a CPU backend, the shapes XLA:CPU is slow at as matmuls."""
  import jax  # noqa: PLC0415
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
