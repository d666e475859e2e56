"""CPU speed levers, all in this one place. Each is off on GPUs and TPUs, and the model files
keep reading as the math: they call `conv2d`, `max_pool`, `relu` and `dot_general` here
instead of lax's convolution, flax's pool and ReLU, and lax.dot_general.

  native_bf16()       does this CPU compute bfloat16 itself (AMX or AVX512-BF16)?
  auto_dtype()        what model.dtype='auto' means: bfloat16 on GPUs, TPUs and native-bf16
                      CPUs, float32 elsewhere (emulated bf16 is no faster than float32 there)
  set_xla_flags()     XLA CPU flags, set before JAX starts its backends (the CLI and the
                      benchmark call it): oneDNN for bf16 convs and matmuls on native-bf16 CPUs
  max_pool()          max-pool with an element-wise gradient on a CPU backend
  relu()              a bf16 ReLU (and its gradient's test) computed in float32: same values
  dot_general()       flax's Dense and attention products and the matmul convs on N-D
                      activations as 2-D matmuls
  conv2d()            convolution lowering on a CPU backend: 1x1 convs, patch embeddings,
                      tiny outputs and 3x3x512x512 kernels as matmuls, other convs with a
                      chunked im2col + matmul kernel gradient (and, in bf16, an input
                      gradient oneDNN runs); elsewhere lax's convolution

Each lever was kept because scripts/benchmark.py measured it winning (README, "Speed").
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any

ONEDNN_FLAG = '--xla_cpu_experimental_onednn_custom_call=true'
OFF_ENV = 'IMGCLS_CPU_LEVERS'  # =0 turns every lever here off (for A/B measurements)
# `_kernel_grad` takes the batch a few images at a time, so that each chunk's im2col copy
# stays in cache: the fastest chunk measured was 5-15 MiB and at most 8 images, at
# ResNet-18 (32 px, batch 128) and ResNet-50 (224 px, batch 8) shapes. In bf16 (oneDNN's
# AMX matmuls want long contractions) up to 32 images: the Fashion-MNIST ResNet's step
# (batch 256) ran 1.03-1.24x as fast, the width-64 one (batch 128) 1.01-1.11x; in float32
# 32 was even with 8 (0.89-1.08x at Fashion-MNIST and 32 px CIFAR shapes), so 8 stays.
KERNEL_GRAD_CHUNK_BYTES = 16 << 20
KERNEL_GRAD_MAX_CHUNK = 8
KERNEL_GRAD_MAX_CHUNK_HALF = 32
# XLA:CPU's conv is slow with large kernels: from this many weights (3x3x512x512 has 2.4M;
# 3x3x256x256, 0.6M, was even), im2col + one matmul while the copy is under 64 MiB.
IM2COL_MIN_WEIGHTS = 1 << 20
IM2COL_MAX_BYTES = 64 << 20


def levers_on() -> bool:
  return os.environ.get(OFF_ENV, '1') != '0'


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


def levers(on: bool):
  """Functions traced inside see the trace-time levers on or off. Off gives plain lax convs:
  for graphs that leave this machine, such as `imgcls export`'s, which may have a symbolic
  batch; scripts/benchmark.py traces both ways for its A/B."""
  return env_var(OFF_ENV, '1' if on else '0')


@functools.cache
def model_name() -> str:
  """The CPU's model name from /proc/cpuinfo, to print beside every speed figure."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown CPU'


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


def _half(x: Any) -> bool:
  """Whether x is a 16-bit float (bf16 or float16): the dtypes the bf16 levers are for."""
  import jax.numpy as jnp  # noqa: PLC0415
  return x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _via_float32(fn: Any, x: Any) -> Any:
  """fn(x), through float32 when x is a 16-bit float (cast back after): for the levers whose
  fn picks one of its inputs (max, ReLU), so the values are the same, and XLA:CPU runs the
  float32 loop with its converts faster than the bf16 one."""
  if _half(x):
    import jax.numpy as jnp  # noqa: PLC0415
    return fn(x.astype(jnp.float32)).astype(x.dtype)
  return fn(x)


def conv2d(x: Any, kernel: Any, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> Any:
  """NHWC x HWIO convolution, zero padding `padding` ((top, bottom), (left, right)).

  On a CPU backend the same math, lowered the way XLA:CPU runs fastest (each measured with
  scripts/benchmark.py; the README's "Speed" section has the figures):
  - unpadded 1x1 convs: (strided) slice, then one matmul; autodiff's gradients are matmuls
    too; likewise unpadded convs whose stride is their size (a ViT's patch embedding, which
    XLA's conv ran at 25 GFLOP/s);
  - convs with at most 2x2 output pixels (the last stage of a small-image net): im2col and a
    matmul (XLA:CPU runs such a conv as a naive loop fusion, 30x slower); likewise convs
    with a large kernel (3x3x512x512) while their im2col copy is small, 2-2.5x faster
    forward and backward than XLA's conv at ResNet-18/50's last stage;
  - other k x k convs: XLA's forward conv and XLA's input gradient (both run near matmul
    speed; in bf16 a stride-1 conv's input gradient is written as a forward conv, which
    XLA gives to oneDNN), with the kernel gradient computed by `_kernel_grad` (XLA's own
    runs at a quarter of matmul speed).
  Elsewhere (GPU, TPU, levers off) lax's convolution and its autodiff.
  """
  kh, kw = kernel.shape[:2]
  (sh, sw) = strides
  if on_cpu() and all(isinstance(d, int) for d in x.shape):  # (not a symbolic batch)
    out_h = (x.shape[1] + sum(padding[0]) - kh) // sh + 1
    out_w = (x.shape[2] + sum(padding[1]) - kw) // sw + 1
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
      return _matmul(x[:, ::sh, ::sw], kernel.reshape(kernel.shape[2:]))
    if (sh, sw) == (kh, kw) and padding == ((0, 0), (0, 0)):  # patches: a ViT's embedding
      b, c = x.shape[0], x.shape[3]
      x = x[:, :out_h * kh, :out_w * kw].reshape(b, out_h, kh, out_w, kw, c)
      patches = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, out_h, out_w, kh * kw * c)
      return _matmul(patches, kernel.reshape(-1, kernel.shape[-1]))
    cols_bytes = x.shape[0] * out_h * out_w * kh * kw * x.shape[3] * x.dtype.itemsize
    if max(out_h, out_w) <= 2 or (kernel.size >= IM2COL_MIN_WEIGHTS
                                  and cols_bytes <= IM2COL_MAX_BYTES):
      return _matmul(_im2col(x, kh, kw, strides, padding, out_h, out_w),
                     kernel.reshape(-1, kernel.shape[-1]))
    return _conv_fast_kernel_grad(x, kernel, tuple(strides), tuple(map(tuple, padding)))
  return _lax_conv(x, kernel, strides, padding)


def relu(x: Any) -> Any:
  """max(x, 0). On a CPU backend a 16-bit x takes the max in float32 (the same values: a max
  picks one of its inputs), and so does its gradient's x > 0 test: XLA:CPU's bf16 maximum
  and compare loops run 2-3x slower than float32 ones with the converts around them. The
  bf16 Fashion-MNIST ResNet step (batch 256) ran 0.96-1.16x as fast with it, median 1.09x
  over five rounds; ResNet-50 at 224 px, batch 8, was even (0.97-1.08x)."""
  import jax  # noqa: PLC0415
  return _via_float32(jax.nn.relu, x) if on_cpu() else jax.nn.relu(x)


def max_pool(x: Any, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> Any:
  """NHWC max-pool, padded with -inf: nn.max_pool's math. On a CPU backend the max of the
  window's strided slices (max_pool_slices), whose gradient is element-wise selects; XLA:CPU's
  gradient of lax's reduce_window tracks argmax indices in unfused loops (ResNet-50's stem
  pool: about 160 ms of op time in a 2.6 s step at 224 px, batch 8). Where inputs tie
  exactly, the slices' gradient is shared among them and reduce_window's goes to one: both
  are valid subgradients with the same total. A 16-bit input is pooled in float32 (the
  same values: a max picks one of its inputs), because XLA:CPU runs bf16 element-wise
  loops 6-10x slower than float32 ones (ResNet-50's stem pool, batch 8, forward and
  gradient: 332 ms in bf16, 43 ms through float32)."""
  if on_cpu():
    return _via_float32(lambda v: max_pool_slices(v, window, strides, padding), x)
  import flax.linen as nn  # noqa: PLC0415  (looked up here: `imgcls export` swaps it for ONNX)
  return nn.max_pool(x, window, strides=strides, padding=padding)


def max_pool_slices(inputs: Any, window_shape, strides=None, padding='VALID') -> Any:
  """flax.linen.max_pool (channels last, -inf padding) as the max of the window's strided
  slices: exactly equal, element-wise ops only (also what `imgcls export` gives ONNX)."""
  import itertools  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  nd = len(window_shape)
  strides = tuple(strides or (1,) * nd)
  lead = inputs.ndim - nd - 1
  spatial = inputs.shape[lead:lead + nd]
  pads = (jax.lax.padtype_to_pads(spatial, window_shape, strides, padding)
          if isinstance(padding, str) else [tuple(p) for p in padding])
  x = jnp.pad(inputs, [(0, 0)] * lead + list(pads) + [(0, 0)], constant_values=-jnp.inf)
  sizes = [(x.shape[lead + d] - window_shape[d]) // strides[d] + 1 for d in range(nd)]
  out = None
  for offsets in itertools.product(*(range(k) for k in window_shape)):
    index = ((slice(None),) * lead +
             tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offsets, strides, sizes)))
    out = x[index] if out is None else jnp.maximum(out, x[index])
  return out


def _matmul(x: Any, w: Any) -> Any:
  """x [..., k] @ w [k, n] (same dtypes), through `dot_general`'s 2-D product."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def dot_general(lhs: Any, rhs: Any, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> Any:
  """lax.dot_general, for flax's Dense and attention layers (their `dot_general` field) and
  the matmul convs (`_matmul`). On a CPU backend a product that contracts lhs's trailing
  axes with rhs's leading ones (a 1x1 conv or im2col on [B, H, W, C], a Dense on [batch,
  tokens, width], attention's qkv and output projections) runs as one 2-D matmul, reshaped
  back. Autodiff's kernel gradient is then lhs2d^T @ dy2d, which oneDNN reads in place; from
  the N-D product XLA:CPU copied the output gradient dy into a transposed [n, B*H*W] array
  first (ResNet-50, batch 8: about 500 ms of copies per step, 0.5-0.9 GB/s each)."""
  import jax  # noqa: PLC0415
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(lc), tuple(rc)
  k = len(lc)
  if (on_cpu() and not lb and not rb and k and not kwargs  # (an out_sharding is N-D)
      and (lhs.ndim, rhs.ndim, k) != (2, 2, 1)
      and lc == tuple(range(lhs.ndim - k, lhs.ndim)) and rc == tuple(range(k))
      and all(isinstance(d, int) for d in (*lhs.shape, *rhs.shape))):
    lead, contract, rest = lhs.shape[:lhs.ndim - k], lhs.shape[lhs.ndim - k:], rhs.shape[k:]
    size = math.prod(contract)
    out = jax.lax.dot_general(
        lhs.reshape(math.prod(lead), size), rhs.reshape(size, math.prod(rest)),
        (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
    return out.reshape(*lead, *rest)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def _lax_conv(x: Any, kernel: Any, strides, padding) -> Any:
  import jax  # noqa: PLC0415
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


def chunk_images(batch: int, cols_bytes_per_image: int, half: bool = False) -> int:
  """Images per chunk of `_kernel_grad`: the largest divisor of the batch, at most
  KERNEL_GRAD_MAX_CHUNK (KERNEL_GRAD_MAX_CHUNK_HALF for 16-bit `half` inputs), whose im2col
  copy fits KERNEL_GRAD_CHUNK_BYTES (at least 1)."""
  most = KERNEL_GRAD_MAX_CHUNK_HALF if half else KERNEL_GRAD_MAX_CHUNK
  fits = [n for n in range(1, min(batch, most) + 1)
          if batch % n == 0 and n * cols_bytes_per_image <= KERNEL_GRAD_CHUNK_BYTES]
  return max(fits, default=1)


def _kernel_grad(x: Any, dy: Any, kernel_shape: tuple[int, ...], strides, padding) -> Any:
  """d(loss)/d(kernel) = sum over pixels of im2col(x)^T dy, one chunk of images at a time.

  All of a batch's im2col copy at once is k*k / stride^2 times the input (302 MiB for
  ResNet-18's first stage at 32 px, batch 128) and costs more memory traffic than the matmul
  saves; a scan over chunks of a few images keeps each copy in cache. 2-3.5x faster than
  XLA:CPU's kernel gradient at ResNet shapes (scripts/benchmark.py, README "Speed").
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  kh, kw, cin, cout = kernel_shape
  b, out_h, out_w = dy.shape[:3]
  n = chunk_images(b, out_h * out_w * kh * kw * cin * x.dtype.itemsize, _half(x))
  xs = x.reshape(b // n, n, *x.shape[1:])
  dys = dy.reshape(b // n, n, *dy.shape[1:])

  # The chunks' sum is float32 (or wider). A bf16 chunk's matmul keeps its dtype, which
  # oneDNN runs on AMX (accumulating in float32 inside) 1.3-3.7x faster than a matmul asked
  # for a float32 result; only each chunk's partial sum is rounded to bf16. (XLA:CPU's own
  # bf16 kernel gradient can be far off: in a standalone jit of it at 8x56x56x64 and
  # 8x40x40x8, its largest error was over 100% of the largest entry, against 0.3% here.)
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

  def body(acc, chunk):
    xc, dyc = chunk
    cols = _im2col(xc, kh, kw, strides, padding, out_h, out_w).reshape(-1, kh * kw * cin)
    partial = jnp.matmul(cols.T, dyc.reshape(-1, cout),
                         preferred_element_type=None if _half(x) else acc_dtype)
    return acc + partial.astype(acc_dtype), None

  acc = jnp.zeros((kh * kw * cin, cout), acc_dtype)
  axes = tuple(_varying(x) | _varying(dy))
  if axes:  # under shard_map the carry varies over the batch axis as each chunk's sum does
    acc = jax.lax.pcast(acc, axes, to='varying')
  acc, _ = jax.lax.scan(body, acc, (xs, dys))
  return acc.reshape(kernel_shape)


def _input_grad_as_conv_applies(x: Any, kernel: Any, strides, padding) -> bool:
  """Whether `_input_grad_as_conv` serves: 16-bit dtypes (in float32 XLA's own input
  gradient is as fast or faster), stride 1, padding within 0..k-1 on each side."""
  kh, kw = kernel.shape[:2]
  return (_half(x) and tuple(strides) == (1, 1) and
          all(0 <= p <= kh - 1 for p in padding[0]) and
          all(0 <= p <= kw - 1 for p in padding[1]))


def _input_grad_as_conv(dy: Any, kernel: Any, padding) -> Any:
  """The input gradient of a stride-1 conv written as a forward conv: dy convolved with the
  kernel rotated by 180 degrees, its in/out channels swapped, padded by k-1-p.

  The same sums as autodiff's transposed conv, but XLA:CPU gives a plain forward conv to
  oneDNN (AMX) in bfloat16, while the transposed one goes to a generic kernel 4-8x slower
  (ResNet-18 at 14x14x32, batch 256: 11.7 vs 1.4 ms; scripts/benchmark.py --ops).
  """
  import jax.numpy as jnp  # noqa: PLC0415
  kh, kw = kernel.shape[:2]
  rotated = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  (top, bottom), (left, right) = padding
  pads = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
  return _lax_conv(dy, rotated, (1, 1), pads)


@functools.cache
def _conv_fast_kernel_grad_fn():
  import jax  # noqa: PLC0415

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def conv(x, kernel, strides, padding):
    return _lax_conv(x, kernel, strides, padding)

  def fwd(x, kernel, strides, padding):
    return _lax_conv(x, kernel, strides, padding), (x, kernel)

  def bwd(strides, padding, res, dy):
    x, kernel = res
    if _input_grad_as_conv_applies(x, kernel, strides, padding):
      dx = _input_grad_as_conv(dy, kernel, padding)
    else:
      _, input_grad = jax.vjp(lambda x: _lax_conv(x, kernel, strides, padding), x)
      dx, = input_grad(dy)
    dkernel = _kernel_grad(x, dy, kernel.shape, strides, padding)
    return dx, dkernel.astype(kernel.dtype)

  conv.defvjp(fwd, bwd)
  return conv


def _varying(a: Any) -> frozenset[str]:
  """The mesh axes `a` varies over inside shard_map (none outside it)."""
  import jax  # noqa: PLC0415
  aval = jax.typeof(a)
  axes = getattr(aval, 'manual_axis_type', None)  # JAX 0.12; older JAX named it `vma`
  return frozenset(axes.varying) if axes is not None else frozenset(getattr(aval, 'vma', ()))


def _conv_fast_kernel_grad(x: Any, kernel: Any, strides, padding) -> Any:
  import jax  # noqa: PLC0415
  # Under shard_map a replicated kernel meets a batch-sharded x. Autodiff would insert the
  # cast to 'varying' itself (and psum the kernel's gradient, its transpose); a custom_vjp
  # must return a gradient typed like its input, so the cast happens here, outside it.
  missing = tuple(_varying(x) - _varying(kernel))
  if missing:
    kernel = jax.lax.pcast(kernel, missing, to='varying')
  return _conv_fast_kernel_grad_fn()(x, kernel, strides, padding)
