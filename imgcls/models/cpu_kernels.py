"""The CPU lowering (`CPU`): the models' convs, ReLU, max-pool and matmuls in the forms XLA:CPU
runs fastest, with the same values as layers.PLAIN. `models.from_config` passes it when
imgcls.hardware.use_cpu_kernels() (the run computes on a CPU, levers on).

  conv2d()       1x1 convs, patch embeddings, tiny outputs and large kernels as matmuls; other
                 convs keep XLA's forward conv, with a chunked im2col + matmul kernel gradient
                 (and, in bf16, an input gradient written as a forward conv, which oneDNN runs)
  relu()         a 16-bit ReLU (and its gradient's test) computed in float32
  max_pool()     the strided-slices max-pool (element-wise gradient), 16-bit through float32
  dot_general()  products over trailing/leading axes as 2-D matmuls, so the kernel gradient
                 reads the output gradient in place

Each was kept because scripts/benchmark.py measured it faster (docs/speed.md has the figures).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from imgcls.models import layers

# `_kernel_grad` takes the batch a few images at a time so that each chunk's im2col copy stays
# in cache; 16-bit inputs take longer chunks, as oneDNN's AMX matmuls want long contractions.
KERNEL_GRAD_CHUNK_BYTES = 16 << 20
KERNEL_GRAD_MAX_CHUNK = 8
KERNEL_GRAD_MAX_CHUNK_HALF = 32
# XLA:CPU's conv is slow with large kernels: from this many weights (3x3x512x512 has 2.4M),
# im2col + one matmul while the im2col copy stays under IM2COL_MAX_BYTES.
IM2COL_MIN_WEIGHTS = 1 << 20
IM2COL_MAX_BYTES = 64 << 20


def _half(x: Any) -> bool:
  """Whether x is a 16-bit float (bf16 or float16): the dtypes the bf16 forms are for."""
  return x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _via_float32(fn: Any, x: Any) -> Any:
  """fn(x), through float32 when x is a 16-bit float (cast back after): for ops that pick one
  of their inputs (max, ReLU), so the values are the same, and XLA:CPU runs float32 element-wise
  loops faster than bf16 ones."""
  return fn(x.astype(jnp.float32)).astype(x.dtype) if _half(x) else fn(x)


def _static(*shapes: tuple[Any, ...]) -> bool:
  """Whether every dimension is a plain int (not a symbolic batch, as jax.export traces)."""
  return all(isinstance(d, int) for shape in shapes for d in shape)


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: layers.Padding) -> jax.Array:
  """layers.conv2d's math (NHWC x HWIO, zero padding ((top, bottom), (left, right))):
  - unpadded 1x1 convs: (strided) slice, then one matmul; likewise unpadded convs whose stride
    is their size (a ViT's patch embedding);
  - convs with at most 2x2 output pixels, and large kernels while their im2col copy is small:
    im2col and one matmul (XLA:CPU runs the former as a naive loop);
  - other convs: XLA's forward conv and input gradient, with the kernel gradient computed by
    `_kernel_grad` as chunked matmuls.
  """
  kh, kw = kernel.shape[:2]
  (sh, sw) = strides
  if not _static(x.shape):
    return layers.conv2d(x, kernel, strides, padding)
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


def relu(x: jax.Array) -> jax.Array:
  """max(x, 0); a 16-bit x takes the max (and its gradient the x > 0 test) in float32, the
  same values: XLA:CPU's bf16 maximum and compare loops are slower than float32 ones."""
  return _via_float32(jax.nn.relu, x)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: layers.Padding) -> jax.Array:
  """layers.max_pool (whose gradient is element-wise selects, where XLA:CPU's reduce_window
  gradient tracks argmax indices in unfused loops), a 16-bit input pooled in float32."""
  return _via_float32(lambda v: layers.max_pool(v, window, strides, padding), x)


def dot_general(lhs: Any, rhs: Any, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> Any:
  """lax.dot_general; a product that contracts lhs's trailing axes with rhs's leading ones (a
  1x1 conv or im2col on [B, H, W, C], a Dense on [batch, tokens, width], attention's qkv and
  output projections) runs as one 2-D matmul, reshaped back. Autodiff's kernel gradient is then
  lhs2d^T @ dy2d, which oneDNN reads in place; from the N-D product XLA:CPU first copies dy into
  a transposed array."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(lc), tuple(rc)
  k = len(lc)
  if (not lb and not rb and k and not kwargs  # (an out_sharding is N-D)
      and (lhs.ndim, rhs.ndim, k) != (2, 2, 1)
      and lc == tuple(range(lhs.ndim - k, lhs.ndim)) and rc == tuple(range(k))
      and _static(lhs.shape, rhs.shape)):
    lead, contract, rest = lhs.shape[:lhs.ndim - k], lhs.shape[lhs.ndim - k:], rhs.shape[k:]
    size = math.prod(contract)
    out = jax.lax.dot_general(
        lhs.reshape(math.prod(lead), size), rhs.reshape(size, math.prod(rest)),
        (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
    return out.reshape(*lead, *rest)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


CPU = layers.Lowering(conv=conv2d, relu=relu, max_pool=max_pool, dot_general=dot_general)


def _matmul(x: Any, w: Any) -> Any:
  """x [..., k] @ w [k, n] (same dtypes), through `dot_general`'s 2-D product."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _im2col(x: Any, kh: int, kw: int, strides: tuple[int, int], padding: layers.Padding,
            out_h: int, out_w: int) -> Any:
  """[B, H, W, C] -> [B, out_h, out_w, kh * kw * C], channels ordered (i, j, c) as an HWIO
  kernel reshaped to [kh * kw * C, O]."""
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
  """d(loss)/d(kernel) = sum over pixels of im2col(x)^T dy, one chunk of images at a time: a
  whole batch's im2col copy costs more memory traffic than the matmul saves, a chunk's stays
  in cache."""
  kh, kw, cin, cout = kernel_shape
  b, out_h, out_w = dy.shape[:3]
  n = chunk_images(b, out_h * out_w * kh * kw * cin * x.dtype.itemsize, _half(x))
  xs = x.reshape(b // n, n, *x.shape[1:])
  dys = dy.reshape(b // n, n, *dy.shape[1:])
  # The chunks' sum is float32 (or wider). A bf16 chunk's matmul keeps its dtype, which oneDNN
  # runs on AMX (accumulating in float32 inside); only each chunk's partial sum is rounded.
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
  """Whether `_input_grad_as_conv` serves: 16-bit dtypes (in float32 XLA's own input gradient
  is as fast), stride 1, padding within 0..k-1 on each side."""
  kh, kw = kernel.shape[:2]
  return (_half(x) and tuple(strides) == (1, 1) and
          all(0 <= p <= kh - 1 for p in padding[0]) and
          all(0 <= p <= kw - 1 for p in padding[1]))


def _input_grad_as_conv(dy: Any, kernel: Any, padding) -> Any:
  """The input gradient of a stride-1 conv written as a forward conv: dy convolved with the
  kernel rotated by 180 degrees, its in/out channels swapped, padded by k-1-p. The same sums
  as autodiff's transposed conv, but XLA:CPU gives a bf16 forward conv to oneDNN and the
  transposed one to a slower generic kernel."""
  kh, kw = kernel.shape[:2]
  rotated = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  (top, bottom), (left, right) = padding
  pads = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
  return layers.conv2d(dy, rotated, (1, 1), pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_custom_grad(x, kernel, strides, padding):
  return layers.conv2d(x, kernel, strides, padding)


def _conv_custom_grad_fwd(x, kernel, strides, padding):
  return layers.conv2d(x, kernel, strides, padding), (x, kernel)


def _conv_custom_grad_bwd(strides, padding, res, dy):
  x, kernel = res
  if _input_grad_as_conv_applies(x, kernel, strides, padding):
    dx = _input_grad_as_conv(dy, kernel, padding)
  else:
    _, input_grad = jax.vjp(lambda x: layers.conv2d(x, kernel, strides, padding), x)
    dx, = input_grad(dy)
  dkernel = _kernel_grad(x, dy, kernel.shape, strides, padding)
  return dx, dkernel.astype(kernel.dtype)


_conv_custom_grad.defvjp(_conv_custom_grad_fwd, _conv_custom_grad_bwd)


def _varying(a: Any) -> frozenset[str]:
  """The mesh axes `a` varies over inside shard_map (none outside it)."""
  aval = jax.typeof(a)
  axes = getattr(aval, 'manual_axis_type', None)  # JAX 0.12; older JAX named it `vma`
  return frozenset(axes.varying) if axes is not None else frozenset(getattr(aval, 'vma', ()))


def _conv_fast_kernel_grad(x: Any, kernel: Any, strides, padding) -> Any:
  # Under shard_map a replicated kernel meets a batch-sharded x. Autodiff would insert the cast
  # to 'varying' itself (and psum the kernel's gradient, its transpose); a custom_vjp must
  # return a gradient typed like its input, so the cast happens here, outside it.
  missing = tuple(_varying(x) - _varying(kernel))
  if missing:
    kernel = jax.lax.pcast(kernel, missing, to='varying')
  return _conv_custom_grad(x, kernel, strides, padding)
