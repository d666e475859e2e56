"""Position embeddings: the fixed 2-D sin-cos table, and resizing a learned grid to another
resolution exactly as each source does (timm, torch, vision_transformer / big_vision)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# How a position-embedding grid is resized (resample_posemb): jax.image.resize's 'bilinear' and
# 'bicubic'; torch's F.interpolate bicubic (align_corners=False) with antialias, as timm's
# resample_abs_pos_embed does by default ('bicubic_timm': on load and for dynamic_img_size), or
# without ('bicubic_torch'); scipy.ndimage.zoom(order=1) as vision_transformer and big_vision
# resize on load ('zoom_linear': corners aligned).
POSEMB_RESIZE_METHODS = ('bilinear', 'bicubic', 'bicubic_timm', 'bicubic_torch', 'zoom_linear')



def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: -0.75, PIL and antialias: -0.5)."""
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def resample_weights(old: int, new: int, method: str) -> np.ndarray:
  """[new, old] float64 matrix W of a 1-D resize (out = W @ in) as `method` computes it (one of
  the separable POSEMB_RESIZE_METHODS other than jax's): the same taps, weights and borders."""
  w = np.zeros((new, old))
  scale = old / new
  if method == 'bicubic_torch':  # aten upsample_bicubic2d, align_corners=False
    for i in range(new):
      real = scale * (i + 0.5) - 0.5
      x0 = math.floor(real)
      t = real - x0
      for k, weight in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
        w[i, min(max(x0 + k, 0), old - 1)] += weight
  elif method == 'bicubic_timm':  # aten _upsample_bicubic2d_aa (PIL's filter), align_corners=False
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(new):
      center = scale * (i + 0.5)
      xmin = max(int(center - support + 0.5), 0)
      xmax = min(int(center + support + 0.5), old)
      taps = _cubic((np.arange(xmin, xmax) - center + 0.5) * invscale, -0.5)
      w[i, xmin:xmax] = taps / taps.sum()
  elif method == 'zoom_linear':  # scipy.ndimage.zoom(order=1): corners aligned
    for i in range(new):
      real = i * (old - 1) / (new - 1) if new > 1 else 0.0
      x0 = min(int(math.floor(real)), old - 1)
      t = real - x0
      w[i, x0] += 1 - t
      if t > 0:
        w[i, x0 + 1] += t
  else:
    raise ValueError(f'Unknown separable resize {method!r}.')
  return w


def resample_grid(grid: Any, new_grid: Sequence[int], method: str) -> Any:
  """Resizes an [h, w, D] grid (numpy, or jax inside a model) to new_grid with `method`."""
  if method in ('bilinear', 'bicubic'):
    out = jax.image.resize(jnp.asarray(grid, jnp.float32), (*new_grid, grid.shape[-1]),
                           method=method, antialias=False)
    return np.asarray(out, grid.dtype) if isinstance(grid, np.ndarray) else out.astype(grid.dtype)
  if method not in POSEMB_RESIZE_METHODS:
    raise ValueError(f'Unknown position-embedding resize {method!r}; expected one of '
                     f'{", ".join(POSEMB_RESIZE_METHODS)}.')
  wh, ww = (resample_weights(o, n, method) for o, n in zip(grid.shape[:2], new_grid))
  if isinstance(grid, np.ndarray):
    out = np.einsum('ih,hwc,jw->ijc', wh, grid.astype(np.float64), ww)
    return out.astype(grid.dtype)
  out = jnp.einsum('ih,hwc,jw->ijc', jnp.asarray(wh, jnp.float32), grid.astype(jnp.float32),
                   jnp.asarray(ww, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid.dtype)


def resample_posemb(posemb: Any, num_prefix: int, old_grid: Sequence[int],
                    new_grid: Sequence[int], method: str) -> Any:
  """[1, prefix + h * w, D] -> [1, prefix + h' * w', D]: the grid resized, prefix tokens kept
  (timm's resample_abs_pos_embed with num_prefix_tokens)."""
  xp = np if isinstance(posemb, np.ndarray) else jnp
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  grid = resample_grid(grid.reshape(*old_grid, -1), new_grid, method)
  return xp.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


def posemb_prefix(template: Any, old_len: int, new_len: int,
                  grid: Sequence[int] | None = None) -> int:
  """How many prefix tokens (class, registers) both a checkpoint's position embedding of
  old_len rows and the model's of new_len rows hold, from the model's flat variables
  ('params/cls', 'params/reg'): all of the prefix tokens, or none (no_embed_class), whichever
  leaves both grids whole (square, or new_len's `grid`). timm decides it from the model the
  same way (no_embed_class, num_prefix_tokens)."""
  prefix = int('params/cls' in template)
  if 'params/reg' in template:
    prefix += int(template['params/reg'].shape[1])
  if not prefix:
    return 0

  def whole(n: int, target: Sequence[int] | None = None) -> bool:
    if n <= 0:
      return False
    return n == math.prod(target) if target else math.isqrt(n) ** 2 == n

  fits = [p for p in (prefix, 0) if whole(old_len - p) and whole(new_len - p, grid)]
  if len(fits) != 1:
    raise ValueError(
        f'Cannot tell whether the position embeddings ({old_len} rows in the checkpoint, '
        f'{new_len} in the model) include the {prefix} class/register tokens: pass grid=(rows, '
        'cols) of the model.')
  return fits[0]



def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding [1, h * w, width]: sin x, cos x, sin y, cos y."""
  if width % 4:
    raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {width}.")
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  y, x = np.mgrid[:h, :w]
  ang_y = y.reshape(-1, 1) * omega
  ang_x = x.reshape(-1, 1) * omega
  emb = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
  return emb[None].astype(np.float32)
