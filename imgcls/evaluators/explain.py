"""Saliency maps: which pixels a prediction rests on, for a loaded classifier.

  gradcam               Selvaraju et al. 2017, on the last stage's output (ResNet, BiT, ConvNeXt)
  attention_rollout     Abnar & Zuidema 2020, ViT: head-averaged attention plus the residual,
                        multiplied through the blocks; it has no target class
  grad_attention        Chefer et al. 2021 ("Generic attention-model explainability"), ViT:
                        rollout of E_heads[(dS/dA * A)+], class-specific
  integrated_gradients  Sundararajan et al. 2017, any model: path integral of the gradient
                        from a baseline (black, or the pp's zero) to the image

Every method explains a class's logit S (pre-softmax / pre-sigmoid). Activations are read
without touching the models: flax's `nn.intercept_methods` wraps the chosen submodules' calls
and adds a zero `delta` to their output (or input), whose gradient is dS/d(activation).
Maps come back at each image's own height and width (bilinear upsampling), float32, higher =
more important for the class.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imgcls.errors import UserError

METHODS = ('gradcam', 'attention_rollout', 'grad_attention', 'integrated_gradients')
CNN_FAMILIES = ('resnet', 'bit', 'convnext')
BASELINES = ('black', 'zero')
_STAGE = re.compile(r'stage(\d+)_(?:block|unit)(\d+)$')  # the CNNs' residual blocks
_ATTENTION = 'MultiHeadDotProductAttention'


# ------------------------------------------------------------ intercepting

def _path(context) -> tuple[str, ...]:
  return tuple(context.module.path)


def _apply(model, variables, x, *, out_deltas=None, in_deltas=None, capture=()):
  """Logits, with each delta added to the output (`out_deltas`) or first input (`in_deltas`)
  of the submodule at that path, and the outputs of the paths in `capture` recorded."""
  out_deltas, in_deltas, captured = out_deltas or {}, in_deltas or {}, {}

  def hook(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = _path(context)
    if path in in_deltas:
      args = (args[0] + in_deltas[path].astype(args[0].dtype), *args[1:])
    out = next_fun(*args, **kwargs)
    if path in capture or path in out_deltas:
      captured[path] = out
    if path in out_deltas:
      out = out + out_deltas[path].astype(out.dtype)
    return out

  with nn.intercept_methods(hook):
    logits = model.apply(variables, x, train=False)
  return logits.astype(jnp.float32), captured


def _shapes(model, variables, x, select: Callable[[tuple[str, ...]], bool], inputs=False):
  """{path: shape} of the outputs (inputs) of the submodules `select` picks, in call order."""
  shapes = {}

  def hook(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = _path(context)
    if context.method_name == '__call__' and select(path):
      shapes[path] = (args[0] if inputs else out).shape
    return out

  def run(x):
    with nn.intercept_methods(hook):
      return model.apply(variables, x, train=False)
  jax.eval_shape(run, jax.ShapeDtypeStruct(x.shape, jnp.float32))
  return shapes


def _picked(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Sum over images of each image's target logit: one backward pass gives every image's
  gradient, as images do not interact at eval (BatchNorm uses its running statistics)."""
  return jnp.sum(jnp.take_along_axis(logits, targets[:, None], axis=1))


# ---------------------------------------------------------------- Grad-CAM

def last_stage(model, variables, x) -> tuple[str, ...]:
  """The path of the CNN's last residual block (stage{i}_block{j} / stage{i}_unit{j})."""
  blocks = [p for p in _shapes(model, variables, x, lambda p: len(p) == 1 and bool(
      _STAGE.match(p[0])))]
  if not blocks:
    raise UserError(f'{type(model).__name__} has no stage{{i}}_block{{j}} submodules to run '
                    "Grad-CAM on: use method='integrated_gradients'.")
  return max(blocks, key=lambda p: tuple(map(int, _STAGE.match(p[0]).groups())))


@functools.partial(jax.jit, static_argnames=('model', 'layer'))
def gradcam(model, variables, x, targets, layer: tuple[str, ...]) -> jax.Array:
  """[N, h, w] Grad-CAM on the output of `layer` ([N, h, w, C]): ReLU(sum_c alpha_c A_c),
  alpha_c the spatial mean of dS/dA_c."""
  shape = _shapes(model, variables, x, lambda p: p == layer)[layer]

  def score(delta):
    logits, acts = _apply(model, variables, x, out_deltas={layer: delta})
    return _picked(logits, targets), acts[layer]
  grads, acts = jax.grad(score, has_aux=True)(jnp.zeros(shape, jnp.float32))
  alpha = jnp.mean(grads, axis=(1, 2), keepdims=True)
  return jax.nn.relu(jnp.sum(alpha * acts.astype(jnp.float32), axis=-1))


# -------------------------------------------------------------------- ViT

def _attention_paths(model, variables, x) -> list[tuple[str, ...]]:
  """The ViT's attention modules in call order (encoder blocks, then a MAP head's if any)."""
  return list(_shapes(model, variables, x, lambda p: bool(p) and p[-1].startswith(_ATTENTION)))


def _attention_maps(model, variables, x, targets):
  """Per attention module: (A [N, H, T, T'], dS/dA), from the query/key/value projections and a
  delta on the input of the output projection (the heads' A @ V)."""
  paths = _attention_paths(model, variables, x)
  outs = _shapes(model, variables, x, lambda p: p[:-1] in paths and p[-1] == 'out', inputs=True)
  capture = [p + (n,) for p in paths for n in ('query', 'key', 'value')]

  def score(deltas):
    logits, acts = _apply(model, variables, x, in_deltas=deltas, capture=capture)
    return _picked(logits, targets), acts
  zeros = {p: jnp.zeros(s, jnp.float32) for p, s in outs.items()}
  g_out, acts = jax.grad(score, has_aux=True)(zeros)
  maps = []
  for p in paths:
    q, k, v = (acts[p + (n,)].astype(jnp.float32) for n in ('query', 'key', 'value'))
    a = jax.nn.softmax(jnp.einsum('nqhd,nkhd->nhqk', q / jnp.sqrt(q.shape[-1]), k), axis=-1)
    # out_h = A_h @ V_h, so dS/dA_h[q, k] = sum_d dS/dout_h[q, d] V_h[k, d].
    grad = jnp.einsum('nqhd,nkhd->nhqk', g_out[p + ('out',)], v)
    maps.append((a, grad))
  return maps


def _vit_layout(model, x) -> tuple[int, int, int]:
  """(patch grid height, width, index of the first patch token)."""
  p = model.dims()['patch_size']
  return x.shape[1] // p, x.shape[2] // p, model.num_prefix_tokens()


def _rollout(model, x, mixes: list[jax.Array]) -> jax.Array:
  """[N, gh, gw]: the encoder's token mixes (each [N, T, T], acting as R <- mix @ R) multiplied
  through, read out as the pool reads the tokens (class token, mean, or the MAP probe's mix)."""
  gh, gw, first = _vit_layout(model, x)
  encoder = mixes[:-1] if model.pool == 'map' else mixes
  n, t = encoder[0].shape[:2]
  r = jnp.broadcast_to(jnp.eye(t), (n, t, t))
  for mix in encoder:
    r = jnp.einsum('nij,njk->nik', mix, r)
  if model.pool == 'tok':
    row = r[:, 0]
  elif model.pool == 'gap':
    row = jnp.mean(r[:, first:], axis=1)  # the pool averages the patch tokens only
  else:
    row = jnp.einsum('nj,njk->nk', mixes[-1][:, 0], r)
  return row[:, first:].reshape(n, gh, gw)


@functools.partial(jax.jit, static_argnames=('model',))
def attention_rollout(model, variables, x) -> jax.Array:
  """[N, gh, gw] attention rollout: per block 0.5 * mean_heads(A) + 0.5 * I (the residual)."""
  targets = jnp.zeros((x.shape[0],), jnp.int32)  # unused: rollout has no target class
  maps = _attention_maps(model, variables, jax.lax.stop_gradient(x), targets)
  mixes = []
  for a, _ in maps:
    mean = jnp.mean(a, axis=1)
    if mean.shape[1] == mean.shape[2]:
      mean = 0.5 * mean + 0.5 * jnp.eye(mean.shape[1])
    mixes.append(mean)
  return _rollout(model, x, mixes)


@functools.partial(jax.jit, static_argnames=('model',))
def grad_attention(model, variables, x, targets) -> jax.Array:
  """[N, gh, gw] Chefer et al. 2021: R <- R + E_heads[(dS/dA * A)+] R, read out at the pool."""
  mixes = []
  for a, grad in _attention_maps(model, variables, x, targets):
    cam = jnp.mean(jax.nn.relu(grad * a), axis=1)
    if cam.shape[1] == cam.shape[2]:
      cam = cam + jnp.eye(cam.shape[1])
    mixes.append(cam)
  return _rollout(model, x, mixes)


# ------------------------------------------------------- integrated gradients

@functools.partial(jax.jit, static_argnames=('model', 'steps'))
def integrated_gradients(model, variables, x, targets, baseline, steps: int = 64) -> jax.Array:
  """[N, H, W, C] attributions (x - x0) * integral_0^1 dS/dx(x0 + a (x - x0)) da, by the
  trapezoidal rule on `steps` intervals; they sum to about S(x) - S(x0) (completeness)."""
  def grad_at(alpha):
    point = baseline + alpha * (x - baseline)
    return jax.grad(lambda p: _picked(_apply(model, variables, p)[0], targets))(point)
  alphas = jnp.linspace(0.0, 1.0, steps + 1)
  weights = jnp.full((steps + 1,), 1.0 / steps).at[jnp.array([0, steps])].set(0.5 / steps)
  total = jax.lax.fori_loop(0, steps + 1, lambda i, acc: acc + weights[i] * grad_at(alphas[i]),
                            jnp.zeros_like(x))
  return (x - baseline) * total


# --------------------------------------------------------------- the API

def family(classifier) -> str:
  """The model family of a loaded classifier (the registry's family= of its model name)."""
  return family_of(classifier.name)


def family_of(model_name: str) -> str:
  """The registry's family= of a model name ('' when it has none)."""
  from imgcls.models.registry import MODELS  # pylint: disable=import-outside-toplevel
  return MODELS.info(model_name).get('family', '')


def method_for(family_name: str, method: str = 'auto') -> str:
  """'auto' -> Grad-CAM for the CNN families, gradient-weighted attention for ViTs,
  integrated gradients otherwise; an explicit method is checked against the family."""
  if method == 'auto':
    return ('gradcam' if family_name in CNN_FAMILIES else
            'grad_attention' if family_name == 'vit' else 'integrated_gradients')
  if method not in METHODS:
    raise UserError(f'unknown explanation method {method!r}: use one of auto, '
                    f'{", ".join(METHODS)}.')
  if method == 'gradcam' and family_name not in CNN_FAMILIES:
    raise UserError(f"gradcam needs a CNN ({', '.join(CNN_FAMILIES)}), not a {family_name!r} "
                    "model: use method='auto' or 'integrated_gradients'.")
  if method in ('attention_rollout', 'grad_attention') and family_name != 'vit':
    raise UserError(f"{method} needs a ViT, not a {family_name!r} model: use method='auto' "
                    "or 'integrated_gradients'.")
  return method


def maps(model, variables, x, targets, method: str, *, baseline: str = 'black',
         steps: int = 64) -> np.ndarray:
  """[N, h, w] raw maps for model inputs x [N, H, W, C] (a resolved `method`; targets [N])
  at the method's own resolution (feature grid, patch grid or pixels)."""
  x = jnp.asarray(x, jnp.float32)
  targets = jnp.asarray(targets, jnp.int32)
  if method == 'gradcam':
    out = gradcam(model, variables, x, targets, last_stage(model, variables, x))
  elif method == 'attention_rollout':
    out = attention_rollout(model, variables, x)
  elif method == 'grad_attention':
    out = grad_attention(model, variables, x, targets)
  else:
    base = baseline_for(baseline, x) if isinstance(baseline, str) else jnp.asarray(baseline)
    out = jnp.sum(integrated_gradients(model, variables, x, targets, base, steps), axis=-1)
  return np.asarray(out, np.float32)


def grid_maps(model, model_name: str, variables, x, targets, *, black: Any = None,
              pad_to: int = 0, steps: int = 16) -> list[np.ndarray] | None:
  """[H, W] maps of the family's default method for a few model inputs x [N, H, W, C] (the
  eval report's confident-error grid), padded to `pad_to` images so that every eval reuses one
  compiled function; None where the method cannot run on this model."""
  method = method_for(family_of(model_name))
  n = len(x)
  x = jnp.asarray(x, jnp.float32)
  targets = np.asarray(targets, np.int32)
  if pad_to > n:
    x = jnp.concatenate([x, jnp.zeros((pad_to - n, *x.shape[1:]), x.dtype)])
    targets = np.concatenate([targets, np.zeros(pad_to - n, np.int32)])
  base = baseline_for('black', x, black) if method == 'integrated_gradients' else 'black'
  try:
    raw = maps(model, variables, x, targets, method, baseline=base, steps=steps)[:n]
  except UserError:  # e.g. a CNN family member without stage blocks for Grad-CAM
    return None
  return [upsample(m, *x.shape[1:3]) for m in raw]


def baseline_for(baseline: str, x: jax.Array, black: Any = None) -> jax.Array:
  """'zero': the model input 0 (the pp's zero); 'black': the model input of a black image
  (`black`, as the classifier's preprocessing gives it; x's minimum when not given)."""
  if baseline not in BASELINES:
    raise UserError(f'unknown baseline {baseline!r}: use one of {", ".join(BASELINES)}.')
  if baseline == 'zero':
    return jnp.zeros_like(x)
  black = jnp.min(x) if black is None else jnp.asarray(black, jnp.float32)
  return jnp.broadcast_to(black, x.shape).astype(jnp.float32)


def upsample(saliency: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [h, w] map bilinearly resized to [height, width], float32."""
  saliency = jnp.asarray(saliency, jnp.float32)
  if saliency.shape == (height, width):
    return np.asarray(saliency)
  return np.asarray(jax.image.resize(saliency, (height, width), 'bilinear'), np.float32)


def _targets(classifier, target, probs: np.ndarray) -> np.ndarray:
  n = len(probs)
  if target is None:
    return np.argmax(probs, axis=-1)
  items = list(target) if isinstance(target, (list, tuple, np.ndarray)) else [target] * n
  if len(items) != n:
    raise UserError(f'target has {len(items)} entries for {n} images: give one class per image, '
                    'one class for all, or None (the predicted class).')
  out = []
  for t in items:
    if isinstance(t, str):
      if t not in classifier.label_names:
        raise UserError(f'target {t!r} is not a label of this model: use one of '
                        f'{classifier.label_names[:10]}.')
      t = classifier.label_names.index(t)
    if not 0 <= int(t) < classifier.num_classes:
      raise UserError(f'target {t} is out of range: use a class id in '
                      f'[0, {classifier.num_classes - 1}] or a label name.')
    out.append(int(t))
  return np.asarray(out)


def explain(classifier, images: Any, method: str = 'auto', target: Any = None, *,
            baseline: str = 'black', steps: int = 64, batch_size: int = 32) -> list[np.ndarray]:
  """One float32 [H, W] map per image (its own size; higher = more important for the class).

  images: whatever `classifier.predict` takes. method: 'auto' (by family: Grad-CAM for CNNs,
  grad_attention for ViTs) or one of METHODS. target: None (each image's predicted class), a
  class id or label name for all images, or one per image. baseline and steps: integrated
  gradients' ('black': a black image through the preprocessing; 'zero': the model input 0).
  """
  method = method_for(family(classifier), method)
  originals = classifier.images(images)
  if not originals:
    raise UserError('no images to explain: pass an image or a non-empty list of images.')
  x = classifier.preprocess(originals)
  targets = _targets(classifier, target, classifier.scores(x))
  black = None
  if method == 'integrated_gradients' and baseline == 'black':
    black = classifier.preprocess(np.zeros_like(originals[0]))[0]
  out = []
  for i in range(0, len(x), batch_size):
    xb = jnp.asarray(x[i:i + batch_size])
    base = baseline_for(baseline, xb, black) if method == 'integrated_gradients' else baseline
    raw = maps(classifier.model, classifier.variables, xb, targets[i:i + batch_size], method,
               baseline=base, steps=steps)
    out += [upsample(m, *im.shape[:2]) for m, im in zip(raw, originals[i:i + batch_size])]
  return out


# ----------------------------------------------------------------- output

def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5,
            cmap: str = 'jet') -> np.ndarray:
  """uint8 RGB [H, W, 3]: the map (scaled to [0, 1]) in `cmap` blended over the image."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] in (2, 4):
    image = image[..., :-1]
  gray = image if image.ndim == 2 else image[..., 0] if image.shape[-1] == 1 else None
  rgb = np.repeat(gray[..., None], 3, -1) if gray is not None else image[..., :3]
  rgb = rgb.astype(np.float32) / (255.0 if image.dtype == np.uint8 else max(rgb.max(), 1e-12))
  s = np.asarray(saliency, np.float32)
  if s.shape != rgb.shape[:2]:
    raise UserError(f'the map is {s.shape} but the image is {rgb.shape[:2]}: pass the map '
                    'explain() returned for this image.')
  lo, hi = float(s.min()), float(s.max())
  s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
  heat = matplotlib.colormaps[cmap](s)[..., :3]
  return np.clip(255 * ((1 - alpha) * rgb + alpha * heat) + 0.5, 0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, saliency: np.ndarray, path: str | os.PathLike) -> str:
  """Writes the overlay PNG at `path` and the raw map beside it (same name, .npy); returns
  the PNG's path."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(overlay(image, saliency)).save(path, format='PNG')
  np.save(os.path.splitext(path)[0] + '.npy', np.asarray(saliency, np.float32))
  return path


def _stems(files: Sequence[str]) -> list[str]:
  """File stems, made unique by a suffix where two files share one."""
  seen: dict[str, int] = {}
  out = []
  for f in files:
    stem = os.path.splitext(os.path.basename(os.fspath(f)))[0]
    seen[stem] = seen.get(stem, 0) + 1
    out.append(stem if seen[stem] == 1 else f'{stem}-{seen[stem] - 1}')
  return out


def explain_files(classifier, out_dir: str, files: Sequence[str], method: str = 'auto'
                  ) -> list[str]:
  """`imgcls explain`: explains each file's predicted class with a loaded classifier
  (imgcls.load), writes out_dir/<stem>.png (overlay) and out_dir/<stem>.npy (the map);
  returns the written paths."""
  files = [os.fspath(f) for f in files]
  if not files:
    raise UserError('no image files given: name one or more files to explain.')
  images = classifier.images(files)
  written = []
  for image, saliency, stem in zip(images, explain(classifier, images, method), _stems(files)):
    png = save_overlay(image, saliency, os.path.join(out_dir, stem + '.png'))
    written += [png, os.path.splitext(png)[0] + '.npy']
  return written
