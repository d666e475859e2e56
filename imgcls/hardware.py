"""What this machine computes fastest: CPU features, model.dtype='auto', XLA flags, and whether
models get the CPU kernels (imgcls.models.cpu_kernels). Decided once, when a run starts or a
model is built, never while a model traces.

  native_bf16()       does this CPU compute bfloat16 itself (AMX or AVX512-BF16)?
  auto_dtype()        model.dtype='auto': bfloat16 on GPUs, TPUs and native-bf16 CPUs, float32
                      elsewhere (emulated bf16 is no faster than float32 there)
  set_xla_flags()     XLA CPU flags, set before JAX starts its backends (the CLI and the
                      benchmark call it): oneDNN for bf16 convs and matmuls on native-bf16 CPUs
  use_cpu_kernels()   whether imgcls.models.from_config passes the CPU kernels to the model

IMGCLS_CPU_LEVERS=0 turns the flags and the kernels off (for A/B measurements).
This module imports no JAX until asked: config validation reads it.
"""

from __future__ import annotations

import functools
import os

ONEDNN_FLAG = '--xla_cpu_experimental_onednn_custom_call=true'
OFF_ENV = 'IMGCLS_CPU_LEVERS'  # =0 turns the CPU levers off
BF16_FEATURES = {'amx_bf16': 'AMX-BF16', 'avx512_bf16': 'AVX512-BF16'}  # /proc/cpuinfo names


def levers_on() -> bool:
  """False when IMGCLS_CPU_LEVERS=0: no XLA CPU flags, no CPU kernels."""
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
  return bool(BF16_FEATURES.keys() & cpu_flags())


def set_xla_flags() -> str:
  """Adds the CPU flags to XLA_FLAGS (before JAX initialises its backends); returns them.

  Only on native-bf16 CPUs: without the flag XLA:CPU runs bf16 convs and transposed bf16
  matmuls in float32, with it oneDNN runs them on AMX. It leaves float32 untouched and only
  concerns the CPU backend, so it is harmless beside a GPU.
  """
  current = os.environ.get('XLA_FLAGS', '')
  if levers_on() and native_bf16() and 'onednn_custom_call' not in current:
    os.environ['XLA_FLAGS'] = f'{current} {ONEDNN_FLAG}'.strip()
  return os.environ.get('XLA_FLAGS', '')


def _platform(platform: str | None) -> str:
  if platform is None:
    import jax  # noqa: PLC0415  (only when asked: config validation must not start JAX)
    platform = jax.default_backend()
  return platform


def auto_dtype(platform: str | None = None) -> str:
  """model.dtype='auto': 'bfloat16' on GPU/TPU and on native-bf16 CPUs, else 'float32'."""
  return auto_dtype_and_why(platform)[0]


def auto_dtype_and_why(platform: str | None = None) -> tuple[str, str]:
  """auto_dtype's choice and the reason, for the log (platform: JAX's default backend)."""
  platform = _platform(platform)
  if platform != 'cpu':
    return 'bfloat16', platform.upper()
  if native_bf16():
    features = [name for flag, name in BF16_FEATURES.items() if flag in cpu_flags()]
    return 'bfloat16', f'CPU with {" and ".join(features) or "native bf16"}'
  return 'float32', 'CPU without native bf16: emulated bf16 is no faster than float32'


def use_cpu_kernels(platform: str | None = None) -> bool:
  """True when JAX computes on the CPU and the levers are on: models then get the CPU kernels,
  which compute the same math in the forms XLA:CPU runs fastest."""
  return levers_on() and _platform(platform) == 'cpu'
