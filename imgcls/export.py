"""`imgcls export`: a checkpoint as a self-contained classifier, uint8 images -> probabilities.

  export(workdir, 'onnx' | 'stablehlo', out)  -> the metadata written to OUT.json

The exported function takes uint8 images [B, H, W, C] of the model's input size (any batch
size B) and returns probabilities [B, num_classes] (softmax; sigmoid for a multi-label run)
of the calibrated logits when the checkpoint has a calibration (`imgcls calibrate`: logits / T,
or per-class Platt, inside the graph).
Baked into the graph: the value ops of pp_eval (value_range, normalize, normalize_preset)
and the model with the weights `imgcls.load` serves (inference.weights_used). Left to the
caller, because they depend on the file and are done on uint8 pixels before the model: the
decode (imgcls.data.decode's rules: EXIF rotation, RGB) and pp_eval's geometric ops (resize,
resize_small, central_crop), named in the JSON as `caller_preprocessing`.

The model is traced with its default lowering (imgcls.models.PLAIN: lax convs, a max-pool made
of strided slices), whatever machine exports it, so the graph is portable.

- onnx: jax2onnx, checked with onnxruntime (CPU). One jax2onnx graph pass that breaks ResNets
  is skipped (_without_transpose_pair_removal).
- stablehlo: jax.export with a symbolic batch; `jax.export.deserialize(bytes).call(x)`
  runs it with JAX alone, no imgcls.
- savedmodel: not offered: jax2tf with this JAX writes StableHLO that TensorFlow 2.21 cannot
  load under a polymorphic batch (see docs/deploy.md).

Each export verifies itself against `imgcls.load(...).probabilities` on batches of 1 and 7
images and records the largest difference in the JSON.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from imgcls import inference, models, step as step_lib
from imgcls.evaluators import calibrated
from imgcls.data import preprocess
from imgcls.data.ops_image import NORMALIZE_PRESETS
from imgcls.errors import UserError

FORMATS = ('onnx', 'stablehlo', 'savedmodel')
CALLER_OPS = ('decode', 'resize', 'resize_small', 'central_crop', 'to_rgb', 'grayscale_to_rgb')
GRAPH_OPS = ('value_range', 'normalize', 'normalize_preset')
MAX_DIFF = 1e-4  # a larger difference from imgcls.load means a broken export: refuse it


class ExportError(UserError):
  """A checkpoint or format that cannot be exported; the message says why."""


# ------------------------------------------------------------ preprocessing

def split_pp(pp: str) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
  """pp_eval (image ops) -> (the caller's ops as a pp string, the graph's value ops with their
  arguments bound to the op's defaults). ExportError for an op with no place in either."""
  caller, graph = [], []
  for text in filter(str.strip, pp.split('|')):
    name, args, kwargs = preprocess._parse_op(text)  # pylint: disable=protected-access
    bound = inspect.signature(preprocess.OPS.get(name)).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if arguments.pop('key', 'image') != 'image':
      raise ExportError(f'pp op {text.strip()!r} works on another feature than the image.')
    if name in CALLER_OPS and not graph:
      caller.append(text.strip())
    elif name in GRAPH_OPS:
      graph.append((name, arguments))
    else:
      raise ExportError(
          f'pp_eval op {text.strip()!r} cannot be exported: the graph takes uint8 images of the '
          f'model\'s size and runs only {", ".join(GRAPH_OPS)}; {", ".join(CALLER_OPS)} must '
          'come first (the caller does them).')
  return '|'.join(caller), graph


def affine(graph_ops: list[tuple[str, dict[str, Any]]], channels: int
           ) -> tuple[list[float], list[float], bool]:
  """The graph's value ops as one per-channel (x - mean) / std in 0..255 units, and whether
  a value_range clips (then the affine form holds only inside its range)."""
  scale, shift, clips = np.ones(channels), np.zeros(channels), False
  for name, a in graph_ops:
    if name == 'value_range':
      s = (a['vmax'] - a['vmin']) / (a['in_max'] - a['in_min'])
      scale, shift = scale * s, (shift - a['in_min']) * s + a['vmin']
      clips = clips or a['clip_values']
    else:
      mean, std = ((np.multiply(255, NORMALIZE_PRESETS[a['name']][0]),
                    np.multiply(255, NORMALIZE_PRESETS[a['name']][1]))
                   if name == 'normalize_preset' else (a['mean'], a['std']))
      scale, shift = scale / np.asarray(std), (shift - np.asarray(mean)) / np.asarray(std)
  return (np.round(-shift / scale, 6).tolist(), np.round(1 / scale, 6).tolist(), clips)


def _apply_value_op(x: jax.Array, name: str, a: dict[str, Any]) -> jax.Array:
  """One value op in JAX, written as its TF op in imgcls.data.ops_image computes it."""
  if name == 'value_range':
    x = (x - a['in_min']) / (a['in_max'] - a['in_min'])
    x = a['vmin'] + x * (a['vmax'] - a['vmin'])
    return jnp.clip(x, a['vmin'], a['vmax']) if a['clip_values'] else x
  if name == 'normalize_preset':
    mean, std = NORMALIZE_PRESETS[a['name']]
    a = {'mean': [255 * m for m in mean], 'std': [255 * s for s in std]}
  return (x - jnp.asarray(a['mean'], jnp.float32)) / jnp.asarray(a['std'], jnp.float32)


def serving_fn(clf: inference.Classifier) -> Callable[[jax.Array], jax.Array]:
  """uint8 [B, *image_shape] -> probabilities [B, num_classes], weights closed over."""
  _, graph_ops = split_pp(clf.pp)
  variables = jax.device_get(clf.variables)
  model, loss = clf.model, clf.loss
  if hasattr(model, 'lowering'):  # the default, whatever kernels this machine's runs use
    model = model.clone(lowering=models.PLAIN)

  def fn(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    for name, arguments in graph_ops:
      x = _apply_value_op(x, name, arguments)
    logits = clf.adjusted_logits(model.apply(variables, x, train=False).astype(jnp.float32))
    # The checkpoint's calibration (temperature / Platt), as imgcls.load applies it.
    return step_lib.probabilities(calibrated.calibrated_logits(logits, clf.calibration), loss)
  return fn


# --------------------------------------------------------------------- ONNX

def _jax2onnx_compat() -> None:
  """jax2onnx 0.17 lowers nested jits (jnp.var, jnp.pad) through jax._src.core.ClosedJaxpr,
  which JAX 0.12 keeps only in jax.extend.core."""
  import jax._src.core as core  # pylint: disable=g-import-not-at-top
  import jax.extend.core as extend_core  # pylint: disable=g-import-not-at-top
  if not hasattr(core, 'ClosedJaxpr'):
    core.ClosedJaxpr = extend_core.ClosedJaxpr


@contextlib.contextmanager
def _without_transpose_pair_removal():
  """jax2onnx 0.17's remove_redundant_transpose_pairs pass drops a NHWC<->NCHW transpose pair
  whose middle value has another consumer (a ResNet block's input feeds the next conv and the
  residual add), leaving an Add of NCHW and NHWC tensors that onnxruntime refuses to load
  (the quickstart ResNet-18). Skip that pass; the graph keeps a few more Transpose nodes."""
  from jax2onnx.converter import ir_optimizations  # pylint: disable=g-import-not-at-top
  passes = ir_optimizations._OPTIMIZER_PASSES  # pylint: disable=protected-access
  ir_optimizations._OPTIMIZER_PASSES = tuple(  # pylint: disable=protected-access
      p for p in passes if getattr(p, 'name', '') != 'remove_redundant_transpose_pairs')
  try:
    yield
  finally:
    ir_optimizations._OPTIMIZER_PASSES = passes  # pylint: disable=protected-access


def _export_onnx(fn, image_shape, out: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
  import jax2onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  _jax2onnx_compat()
  with _without_transpose_pair_removal():
    model = jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct(('batch', *image_shape), jnp.uint8)],
                             model_name='imgcls', input_names=['images'],
                             output_names=['probabilities'])
  with open(out, 'wb') as f:
    f.write(model.SerializeToString())
  options = ort.SessionOptions()
  options.log_severity_level = 3  # onnxruntime's warnings about unused initializers
  session = ort.InferenceSession(out, options, providers=['CPUExecutionProvider'])
  return (lambda x: session.run(None, {'images': x})[0],
          f'onnxruntime {ort.__version__} (CPUExecutionProvider)')


def _export_stablehlo(fn, image_shape, out: str) -> tuple[Callable, str]:
  shape = jax.export.symbolic_shape('batch') + tuple(image_shape)
  exported = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct(shape, jnp.uint8))
  with open(out, 'wb') as f:
    f.write(exported.serialize())
  with open(out, 'rb') as f:
    reloaded = jax.export.deserialize(bytearray(f.read()))
  return (lambda x: np.asarray(reloaded.call(x)),
          f'jax.export.deserialize(...).call, JAX {jax.__version__}, {jax.default_backend()}')


# ------------------------------------------------------------------- export

def check_images(image_shape: tuple[int, ...], count: int = 7, seed: int = 0) -> np.ndarray:
  """Random uint8 images for the self-check, with a black and a white one among them."""
  images = np.random.default_rng(seed).integers(0, 256, (count, *image_shape), np.uint8)
  images[0], images[-1] = 0, 255
  return images


def export_classifier(clf: inference.Classifier, fmt: str, out: str | os.PathLike,
                      images: np.ndarray | None = None) -> dict[str, Any]:
  """Writes `clf` in `fmt` to `out` and the metadata to OUT.json; returns the metadata.

  images: uint8 [N, *image_shape] to verify on (default: 7 random ones); the export is also
  run on the first alone. The largest difference from clf.probabilities is recorded, and
  above MAX_DIFF the export is an ExportError.
  """
  if fmt == 'savedmodel':
    raise ExportError(
        'TF SavedModel export is not available: jax2tf with this JAX (0.12) writes StableHLO '
        'that TensorFlow 2.21 cannot load with a free batch dimension. Use --format=onnx '
        '(onnxruntime, TensorRT, OpenVINO) or --format=stablehlo (docs/deploy.md).')
  if fmt not in FORMATS:
    raise ExportError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}.')
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  caller_pp, graph_ops = split_pp(clf.pp)
  fn = serving_fn(clf)
  start = time.perf_counter()
  run, runtime = (_export_onnx if fmt == 'onnx' else _export_stablehlo)(fn, clf.image_shape, out)
  seconds = time.perf_counter() - start
  images = check_images(clf.image_shape) if images is None else np.asarray(images, np.uint8)
  diff = 0.0
  for batch in (images[:1], images):
    expected = clf.probabilities(batch, batch_size=len(batch))
    diff = max(diff, float(np.max(np.abs(run(batch) - expected))))
  mean, std, clips = affine(graph_ops, clf.image_shape[-1])
  meta = {
      'format': fmt, 'file': os.path.basename(out), 'bytes': os.path.getsize(out),
      'export_seconds': round(seconds, 2),
      'input': {'name': 'images', 'dtype': 'uint8', 'layout': 'NHWC',
                'shape': ['batch', *clf.image_shape],
                'channels': {1: 'grayscale', 3: 'RGB'}.get(clf.image_shape[-1], 'as trained')},
      'output': {'name': 'probabilities', 'shape': ['batch', clf.num_classes],
                 'kind': 'sigmoid (multi-label)' if clf.multilabel else 'softmax',
                 'calibration': calibrated.describe(clf.calibration)},
      'labels': list(clf.label_names),
      'caller_preprocessing': caller_pp,
      'in_graph_preprocessing': '|'.join(
          f'{n}({", ".join(f"{k}={v!r}" for k, v in a.items())})' for n, a in graph_ops),
      'normalisation': {'mean': mean, 'std': std, 'units': '0..255', 'clipped': clips,
                        'formula': 'model input = (uint8 pixel - mean) / std, per channel'},
      'pp_eval': clf.pp, 'model': clf.config['model'], 'loss': clf.loss,
      'weights': clf.weights, 'step': clf.step, 'checkpoint': clf.path,
      'verification': {'reference': 'imgcls.load(...).probabilities (TF pp ops + jit)',
                       'runtime': runtime, 'batch_sizes': [1, len(images)],
                       'max_abs_diff': diff},
      'versions': {p: _version(p) for p in ('imgcls', 'jax', 'flax', 'jax2onnx', 'onnx',
                                            'onnxruntime')},
  }
  if clf.multilabel:
    meta['threshold'], meta['threshold_source'] = clf.decision_threshold()
  with open(out + '.json', 'w') as f:
    json.dump(meta, f, indent=2)
  if not diff <= MAX_DIFF:
    raise ExportError(f'the {fmt} export in {out} differs from imgcls.load by {diff:.3g} '
                      f'(more than {MAX_DIFF}): it is not the same model. Please report it.')
  return meta


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def export(workdir: str, fmt: str, out: str, step: str | int = 'best',
           weights: str = 'auto') -> dict[str, Any]:
  """`imgcls export`: loads the checkpoint (imgcls.load's rules) and exports it."""
  if fmt not in FORMATS:
    raise ExportError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}.')
  return export_classifier(inference.load(workdir, step, weights), fmt, out)
