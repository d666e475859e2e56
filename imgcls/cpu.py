"""CPU speed levers, all in this one place. Each is off on GPUs and TPUs, and the model files
keep reading as the math: they call `conv2d` here instead of `lax.conv_general_dilated`.

  native_bf16()       does this CPU compute bfloat16 itself (AMX or AVX512-BF16)?
  auto_dtype()        what model.dtype='auto' means: bfloat16 on GPUs, TPUs and native-bf16
                      CPUs, float32 elsewhere (emulated bf16 is no faster than float32 there)
  set_xla_flags()     XLA CPU flags, set before JAX starts its backends (the CLI and the
                      benchmark call it): oneDNN for bf16 convs and matmuls on native-bf16 CPUs
  conv2d()            convolution lowering on a CPU backend: 1x1 convs as matmuls, stride-1
                      convs with an im2col + matmul gradient; elsewhere lax's convolution

Each lever was kept because scripts/benchmark.py measured it winning (README, "Speed").
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

ONEDNN_FLAG = '--xla_cpu_experimental_onednn_custom_call=true'
OFF_ENV = 'IMGCLS_CPU_LEVERS'  # =0 turns every lever here off (for A/B measurements)
# The im2col gradient of a stride-1 conv pays off while its k*k copy of the input is small:
# ResNet-50 at 224 px, batch 8 (stage 1: 58 MiB) trains 1.37x faster with it, ResNet-18 at
# 32 px, batch 128 (stage 1: 302 MiB) 0.84-0.9x (scripts/benchmark.py --levers=both).
IM2COL_MAX_BYTES = 64 << 20


def levers_on() -> bool:
  return os.environ.get(OFF_ENV, '1') != '0'


@contextlib.contextmanager
def levers(on: bool):
  """Functions traced inside see the trace-time levers on or off. Off gives plain lax convs:
  for graphs that leave this machine, such as `imgcls export`'s, which may have a symbolic
  batch; scripts/benchmark.py traces both ways for its A/B."""
  old = os.environ.get(OFF_ENV)
  os.environ[OFF_ENV] = '1' if on else '0'
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(OFF_ENV, None)
    else:
      os.environ[OFF_ENV] = old


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


BF16_FEATURES = {'amx_bf16': 'AMX-BF16', 'avx512_bf16': 'AVX512-BF16'}  # /proc/cpuinfo names


def native_bf16() -> bool:
  """True on CPUs with AMX-BF16 or AVX512-BF16 (bf16 matmuls in hardware)."""
  return bool(BF16_FEATURES.keys() & cpu_flags())


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
  return auto_dtype_and_why(platform)[0]


def auto_dtype_and_why(platform: str | None = None) -> tuple[str, str]:
  """auto_dtype's choice and the reason, for the log."""
  if platform is None:
    import jax  # noqa: PLC0415  (only when asked: config validation must not start JAX)
    platform = jax.default_backend()
  if platform != 'cpu':
    return 'bfloat16', platform.upper()
  if native_bf16():
    features = [name for flag, name in BF16_FEATURES.items() if flag in cpu_flags()]
    return 'bfloat16', f'CPU with {" and ".join(features) or "native bf16"}'
  return 'float32', 'CPU without native bf16: emulated bf16 is no faster than float32'


def on_cpu() -> bool:
  """True when the levers are on and JAX computes on the CPU (read while tracing)."""
  import jax  # noqa: PLC0415
  return levers_on() and jax.default_backend() == 'cpu'


def conv2d(x: Any, kernel: Any, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> Any:
  """NHWC x HWIO convolution, zero padding `padding` ((top, bottom), (left, right)).

  On a CPU backend, where XLA's convolutions (their backward above all) are slow, the same
  math as matmuls, which XLA:CPU runs at near its matmul peak (FACTS, scripts/benchmark.py):
  - 1x1 convs: (strided) slice, then one matmul; autodiff's gradients are matmuls too;
  - stride-1 k x k convs padded k // 2 each side: XLA's forward conv (im2col measured 2x
    slower forward at 32 px, batch 128), with a custom gradient of im2col + matmuls (the
    input gradient is the same conv of the output gradient with the kernel flipped and
    transposed; the kernel gradient one matmul), in place of XLA's slow backward convs,
    while the k*k copy of the input stays under IM2COL_MAX_BYTES;
  - convs with at most 2x2 output pixels (the last stage of a small-image net): im2col.
  Elsewhere, and for strided k x k convs (im2col measured slower there), lax's convolution.
  """
  import jax  # noqa: PLC0415
  kh, kw = kernel.shape[:2]
  (sh, sw) = strides
  if on_cpu():
    out_h = (x.shape[1] + sum(padding[0]) - kh) // sh + 1
    out_w = (x.shape[2] + sum(padding[1]) - kw) // sw + 1
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
      return x[:, ::sh, ::sw] @ kernel.reshape(kernel.shape[2:])
    cols_bytes = x.size * kh * kw * x.dtype.itemsize
    if ((sh, sw) == (1, 1) and kh == kw and kh % 2 and padding == ((kh // 2,) * 2,) * 2
        and cols_bytes <= IM2COL_MAX_BYTES):
      return _same_conv(x, kernel)
    if max(out_h, out_w) <= 2:
      return _im2col(x, kh, kw, strides, padding, out_h, out_w) @ kernel.reshape(
          -1, kernel.shape[-1])
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _im2col(x: Any, kh: int, kw: int, strides: tuple[int, int],
            padding: tuple[tuple[int, int], tuple[int, int]], out_h: int, out_w: int) -> Any:
  """[B, H, W, C] -> [B, out_h, out_w, kh * kw * C], channels ordered (i, j, c) as an HWIO
  kernel reshaped to [kh * kw * C, O]."""
  import jax.numpy as jnp  # noqa: PLC0415
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  return jnp.concatenate([x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _same_cols(x: Any, k: int) -> Any:
  return _im2col(x, k, k, (1, 1), ((k // 2,) * 2,) * 2, x.shape[1], x.shape[2])


@functools.cache
def _same_conv_fn():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  def fwd_math(x, kernel):  # XLA:CPU's forward conv is fast; its backward is what is slow
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((k // 2,) * 2,) * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  @jax.custom_vjp
  def same_conv(x, kernel):
    return fwd_math(x, kernel)

  def fwd(x, kernel):
    return fwd_math(x, kernel), (x, kernel)

  def bwd(res, dy):
    x, kernel = res
    k = kernel.shape[0]
    cols = _same_cols(x, k)  # recomputed: cheaper than keeping k*k copies of x alive
    dkernel = jnp.einsum('bhwk,bhwo->ko', cols, dy).reshape(kernel.shape)
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # [k, k, O, I]
    dx = _same_cols(dy, k) @ flipped.reshape(-1, kernel.shape[2])
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)

  same_conv.defvjp(fwd, bwd)
  return same_conv


def _varying(a: Any) -> frozenset[str]:
  """The mesh axes `a` varies over inside shard_map (none outside it)."""
  import jax  # noqa: PLC0415
  aval = jax.typeof(a)
  axes = getattr(aval, 'manual_axis_type', None)  # JAX 0.12; older JAX named it `vma`
  return frozenset(axes.varying) if axes is not None else frozenset(getattr(aval, 'vma', ()))


def _same_conv(x: Any, kernel: Any) -> Any:
  import jax  # noqa: PLC0415
  # Under shard_map a replicated kernel meets a batch-sharded x. Autodiff would insert the
  # cast to 'varying' itself (and psum the kernel's gradient, its transpose); a custom_vjp
  # must return a gradient typed like its input, so the cast happens here, outside it.
  missing = tuple(_varying(x) - _varying(kernel))
  if missing:
    kernel = jax.lax.pcast(kernel, missing, to='varying')
  return _same_conv_fn()(x, kernel)
