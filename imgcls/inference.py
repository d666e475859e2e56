"""Predict with a trained checkpoint: `clf = imgcls.load(workdir); clf.predict(images)`.

Everything comes from the checkpoint itself: the model (config.model and
dataset.num_classes, built through the registry), its weights, the eval preprocessing
(config.pp_eval, image ops only), the label names and the image shape. No config file,
dataset or accelerator is needed. Only the weights are read (params and batch_stats), as
numpy arrays on the host, so a checkpoint written on N devices loads in a process with one.

Which weights: `checkpoints.Checkpoint.weights_used`, the rule `imgcls eval`, `predict` and
every export share (the EMA when the run kept one, else raw, unless asked). Files, bytes and PIL images are decoded by imgcls.data.decode, the
PIL path the image-folder preparation uses (EXIF rotation, CMYK, 16-bit, alpha composited on
white), so a model sees at inference the pixels it was trained on.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from imgcls import checkpoints, models, step as step_lib
from imgcls.evaluators import calibrated
from imgcls.checkpoints import CheckpointError
from imgcls.data import decode, preprocess
from imgcls.models import weights as model_weights
from imgcls.registry import lazy_import

tf = lazy_import('tensorflow')  # the pp ops run in TF; importing imgcls.inference stays cheap

Prediction = list[tuple[str, float]]


# ------------------------------------------------------------- checkpoint

def _check_shapes(model, variables: dict[str, Any], image_shape: tuple[int, ...],
                  where: epath.Path) -> None:
  """The saved weights must have the tree and shapes of the model's own init."""
  expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, *image_shape), jnp.float32))

  def shapes(tree):
    return {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  want = shapes({n: expected[n] for n in ('params', 'batch_stats') if expected.get(n)})
  got = shapes(variables)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:4]
    raise CheckpointError(
        f'the weights in {where} do not fit the model its config names '
        f'({type(model).__name__}): first differences {diff}. The model code changed since '
        'the checkpoint was saved: load it with the imgcls version that trained it.')


def load(path: str | os.PathLike, step: str | int = 'best',
         weights: str = 'auto') -> Classifier:
  """A Classifier for the checkpoint at `path` (workdir, checkpoints folder or step folder).

  step: 'best' (highest eval metric, the default), 'latest' or a step number. weights:
  'auto' (the EMA when the run kept one, else raw: as `imgcls eval` scores), 'raw' or 'ema';
  `Classifier.weights` says which was used. Reads only the checkpoint
  (imgcls.checkpoints.find): no config file, no dataset. Raises CheckpointError naming the
  problem.
  """
  _keep_tf_off_accelerators()
  ckpt = checkpoints.find(path, step)
  used = ckpt.weights_used(weights)
  variables = ckpt.weights(used)
  model = models.from_config(ckpt.config)
  _check_shapes(model, variables, ckpt.image_shape, ckpt.path)
  calibration = ckpt.calibration
  if calibration is not None and calibration.get('weights', used) != used:
    calibration = None  # fitted on the other weights (raw vs EMA): it does not apply
  return Classifier(model, variables, config=ckpt.config, image_shape=ckpt.image_shape,
                    label_names=ckpt.label_names, step=ckpt.step, path=str(ckpt.path),
                    weights=used, metrics=ckpt.meta.get('metrics') or {},
                    calibration=calibration, logit_offset=_posthoc_offset(ckpt))


def _posthoc_offset(ckpt: checkpoints.Checkpoint) -> np.ndarray | None:
  """-tau * log(prior) when the run asks for post-hoc logit adjustment
  (config.imbalance.posthoc_tau, prior from the class counts saved in the meta), else None."""
  tau = float((ckpt.config.get('imbalance') or {}).get('posthoc_tau') or 0.0)
  counts = ckpt.meta.get('class_counts')
  if not tau:
    return None
  if not counts:
    raise checkpoints.CheckpointError(
        f'{ckpt.path}: the run asks for post-hoc logit adjustment (imbalance.posthoc_tau='
        f'{tau}) but its checkpoint holds no class_counts; evaluate it with a checkpoint '
        'saved by this version, or retrain.')
  from imgcls.evaluators import imbalance  # pylint: disable=g-import-not-at-top
  return -tau * imbalance.log_prior(counts)


def _keep_tf_off_accelerators() -> None:
  """TF runs only the pp ops here: on the CPU, leaving the GPUs' memory to JAX."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF has already set up its devices in this process: leave them.
    pass


# ----------------------------------------------------------------- inputs

def _decode(source: str | bytes, channels: int | None, what: str) -> np.ndarray:
  """A file or encoded bytes as training saw it: the RGB JPEGs and PNGs an image folder stores
  unchanged are decoded by TF as the pp op `decode` does (TF's JPEG pixels differ from PIL's);
  everything else by imgcls.data.decode, the PIL conversions the folder preparation applies."""
  data = source if isinstance(source, bytes) else epath.Path(source).read_bytes()
  if decode.stored_as_is(data):
    try:
      return tf.io.decode_image(data, channels=channels or 0, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, ValueError) as e:
      raise ValueError(f'{what} is not a readable image (corrupt or truncated: '
                       f'{str(e).splitlines()[0][:120]}).') from None
  try:
    return decode.load(data, channels)
  except decode.DataError as e:
    raise ValueError(str(e).replace('the image bytes', what, 1)) from None


def _from_array(array: np.ndarray, what: str) -> np.ndarray:
  if array.dtype == np.uint8:
    return array
  if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
    if array.size and (array.min() < 0 or array.max() > 255):
      raise ValueError(f'{what} has values in [{array.min()}, {array.max()}]: pass 8-bit '
                       'pixels (0..255).')
    return array.astype(np.uint8)
  raise ValueError(
      f'{what} has dtype {array.dtype}: pass uint8 pixels 0..255 as decoded from an image '
      'file (e.g. np.asarray(PIL.Image.open(f))). predict applies the model\'s own '
      'preprocessing (pp_eval), so do not scale or normalise the images yourself.')


def _images(inputs: Any, channels: int | None = None) -> Iterator[np.ndarray]:
  """Each image of `inputs` as a uint8 HWC (or HW) numpy array; files, bytes and PIL images
  decoded with `channels` (3, 1 or None: as stored) by imgcls.data.decode."""
  items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
  for i, item in enumerate(items):
    what = f'input {i}' if isinstance(inputs, (list, tuple)) else 'the input'
    if isinstance(item, (str, os.PathLike)):
      path = epath.Path(item)
      if not path.is_file():
        raise FileNotFoundError(f'{what}: no image file {item}.')
      yield _decode(os.fspath(item), channels, f'{what} ({item})')
    elif isinstance(item, (bytes, bytearray, memoryview)):
      yield _decode(bytes(item), channels, what)
    elif type(item).__module__.startswith('PIL.'):
      yield decode.from_pil(item, channels)
    elif isinstance(item, (np.ndarray, jax.Array)):
      array = _from_array(np.asarray(item), what)
      if array.ndim == 4:  # a batch
        yield from array
      elif array.ndim in (2, 3):
        yield array
      else:
        raise ValueError(f'{what} has shape {array.shape}: pass an image [H, W, C] or [H, W], '
                         'or a batch [N, H, W, C].')
    else:
      raise TypeError(f'{what} is a {type(item).__name__}: pass numpy or JAX arrays (uint8 '
                      'HWC, or a batch NHWC), PIL images, image file paths or encoded image '
                      'bytes, or a list of them.')


def _batches(images: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
  batch = []
  for image in images:
    batch.append(image)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _decode_channels(pp: str, model_channels: int) -> int | None:
  """Channels to decode files with: the pp string's decode(channels) when it names them, else
  RGB for an RGB model (as an image folder stores every image) and as stored otherwise."""
  for text in filter(str.strip, pp.split('|')):
    name, args, kwargs = preprocess._parse_op(text)  # pylint: disable=protected-access
    if name == 'decode':
      channels = kwargs.get('channels', args[0] if args else None)
      if channels in (1, 3):
        return channels
  return 3 if model_channels == 3 else None


# ------------------------------------------------------------- classifier

class Classifier:
  """A trained model with its eval preprocessing and label names; see `load`.

  Inputs: numpy/JAX arrays (uint8 HWC 0..255 as decoded from files, HW grayscale, or a batch
  NHWC), PIL images, file paths or encoded bytes, alone or in a list. Files, bytes and PIL
  images go through imgcls.data.decode as the image-folder preparation does (EXIF rotation,
  palette, CMYK, 16-bit top 8 bits, transparency composited on white); an RGB model gets
  them as RGB. Arrays: a grayscale image given to an RGB model is repeated to RGB and an
  alpha channel is dropped; colour images given to a grayscale model are refused, as
  converting them is a choice (PIL's convert('L') is the usual one) left to the caller.
  """

  def __init__(self, model, variables: dict[str, Any], *, config: dict[str, Any],
               image_shape: tuple[int, ...], label_names: list[str], step: int,
               path: str = '', weights: str = 'raw', metrics: dict[str, Any] | None = None,
               calibration: dict[str, Any] | None = None,
               logit_offset: np.ndarray | None = None):
    self.model = model
    self.variables = jax.device_put(variables)
    self.config = config
    self.image_shape = tuple(image_shape)
    self.label_names = label_names
    self.step = step
    self.path = path
    self.weights = weights  # 'ema' or 'raw': which weights `variables` are
    self.metrics = dict(metrics or {})  # the checkpoint's eval metrics, as saved
    self.pp = preprocess.image_only(config['pp_eval'])
    self._pp_fn = preprocess.get_pp_fn(self.pp)
    self.decode_channels = _decode_channels(self.pp, self.image_shape[-1])
    self.multilabel = config.get('loss') == 'sigmoid_xent'
    self.loss = loss = config.get('loss', 'softmax_xent')
    # The calibration stored with the checkpoint (evaluators.calibrated; None: raw scores),
    # applied to the logits before softmax/sigmoid by `probabilities`, predict and export.
    self.calibration = calibration
    # Post-hoc logit adjustment (-tau * log prior; None: off), as the run's evals applied it.
    self.logit_offset = logit_offset

    def scores(v, x, calibrate=True):
      logits = self.adjusted_logits(model.apply(v, x, train=False).astype(jnp.float32))
      if calibrate:
        logits = calibrated.calibrated_logits(logits, self.calibration)
      return step_lib.probabilities(logits, loss)
    self._scores = jax.jit(scores)
    self._raw_scores = jax.jit(functools.partial(scores, calibrate=False))
    self._features = jax.jit(functools.partial(model_weights.features, model))

  def adjusted_logits(self, logits: Any) -> Any:
    """The logits with the run's post-hoc logit adjustment added (unchanged when it has none)."""
    return logits if self.logit_offset is None else logits + self.logit_offset

  @property
  def name(self) -> str:
    return self.config['model']['name']

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __repr__(self) -> str:
    labels = self.label_names[:5] + (['...'] if self.num_classes > 5 else [])
    return (f'Classifier(model={self.name!r}, num_classes={self.num_classes}, '
            f'labels={labels}, image_shape={self.image_shape}, '
            f'step={self.step}, weights={self.weights!r}, path={self.path!r})')

  # ------------------------------------------------------------ inference

  def decision_threshold(self) -> tuple[float, str]:
    """(threshold, where it comes from) for a multi-label model's labels: with a stored
    calibration, the threshold tuned on its calibrated held-out scores (the probabilities are
    served calibrated); else the one the eval reports tuned on the run's val_split when the
    checkpoint saved one; else 0.5."""
    summary = (self.calibration or {}).get('summary', {})
    if summary.get('threshold_tuned') is not None:
      return (float(summary['threshold_tuned']),
              f"the calibration's (step {self.step}, split {self.calibration.get('split')})")
    tuned = sorted(k for k in self.metrics if k.endswith('threshold_tuned'))
    if tuned:
      key = 'eval_threshold_tuned' if 'eval_threshold_tuned' in tuned else tuned[0]
      return float(self.metrics[key]), f'{key} saved with step {self.step}'
    return 0.5, ('the default 0.5: the checkpoint saved no tuned threshold (an evaluator '
                 'with val_split and reports tunes one)')

  def preprocess(self, inputs: Any) -> np.ndarray:
    """The model's inputs [N, *image_shape] (float32) after pp_eval's image ops."""
    return self._stack(list(_images(inputs, self.decode_channels)), 0)

  def probabilities(self, inputs: Any, batch_size: int = 64,
                    calibrated: bool = True) -> np.ndarray:
    """[N, num_classes]: softmax (sigmoid for a multi-label, sigmoid_xent model) of the logits
    with the checkpoint's calibration applied (`self.calibration`; calibrated=False: raw)."""
    return self._run(self._scores if calibrated else self._raw_scores, inputs, batch_size)

  def images(self, inputs: Any) -> list[np.ndarray]:
    """The inputs decoded as `predict` decodes them (files, bytes or arrays), before any pp."""
    return list(_images(inputs, self.decode_channels))

  def explain(self, images: Any, method: str = 'auto', target: Any = None, **kwargs) -> Any:
    """Saliency maps for `images` (evaluators.explain.explain: Grad-CAM for CNNs, attention
    for ViTs, integrated gradients for any model; higher = more important for `target`, by
    default the predicted class)."""
    from imgcls.evaluators import explain  # pylint: disable=g-import-not-at-top
    return explain.explain(self, images, method=method, target=target, **kwargs)

  def predict(self, inputs: Any, top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
    """Per image, the top_k (label, probability) pairs, most probable first."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
      raise ValueError(f'top_k must be a positive int, got {top_k!r}.')
    probs = self.probabilities(inputs, batch_size)
    top = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
    return [[(self.label_names[c], float(p[c])) for c in order]
            for p, order in zip(probs, top)]

  def predict_labels(self, inputs: Any, batch_size: int = 64) -> list[str]:
    """The top-1 label of each image."""
    probs = self.probabilities(inputs, batch_size)
    return [self.label_names[c] for c in np.argmax(probs, axis=-1)]

  def features(self, inputs: Any, batch_size: int = 64) -> np.ndarray:
    """[N, D]: the pre-logits embedding (the model's return_features output)."""
    return self._run(self._features, inputs, batch_size)

  def scores(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[N, num_classes] for model inputs x [N, *image_shape] (the output of `preprocess`)."""
    return np.concatenate([self._apply(self._scores, x[i:i + batch_size], batch_size)
                           for i in range(0, len(x), batch_size)])

  def _apply(self, fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    # Pad to a power of two (at most batch_size): few shapes, so few compilations.
    n = len(x)
    padded = min(batch_size, 1 << (n - 1).bit_length())
    x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    return np.asarray(fn(self.variables, x))[:n]

  def _run(self, fn, inputs: Any, batch_size: int) -> np.ndarray:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
    if isinstance(inputs, (list, tuple)) and not inputs:
      raise ValueError('no images: pass an image or a non-empty list of images.')
    outs, start = [], 0
    for batch in _batches(_images(inputs, self.decode_channels), batch_size):
      x = self._stack(batch, start)
      start += len(batch)
      outs.append(self._apply(fn, x, batch_size))
    if not outs:
      raise ValueError('no images: the input batch is empty.')
    return np.concatenate(outs)

  def _stack(self, images: Sequence[np.ndarray], first: int) -> np.ndarray:
    return np.stack([self._preprocess_one(im, first + i) for i, im in enumerate(images)])

  def _preprocess_one(self, image: np.ndarray, index: int) -> np.ndarray:
    image = self._fit_channels(image if image.ndim == 3 else image[..., None], index)
    features = {'image': tf.constant(image),
                preprocess.RNG_KEY: tf.constant([0, 0], tf.int64)}  # for random ops, if any
    out = self._pp_fn(features)['image'].numpy()
    if out.shape != self.image_shape:
      hint = ''
      if out.shape[:2] != self.image_shape[:2]:
        hint = (f' Resize it to {self.image_shape[1]}x{self.image_shape[0]} (W x H) first: '
                'the preprocessing does not resize.')
      raise ValueError(f'image {index} is {out.shape} after the model\'s preprocessing '
                       f'{self.pp!r}, but the model takes {self.image_shape}.{hint}')
    return out.astype(np.float32)

  def _fit_channels(self, image: np.ndarray, index: int) -> np.ndarray:
    want, have = self.image_shape[-1], image.shape[-1]
    if have in (2, 4) and want in (have - 1, 3):  # drop alpha
      image, have = image[..., :have - 1], have - 1
    if have == 1 and want == 3:  # grayscale into an RGB model
      return np.repeat(image, 3, axis=-1)
    if have != want:
      fix = (" Convert it first, e.g. PIL's image.convert('L')." if want == 1 and have <= 4
             else ' A batch of images is [N, H, W, C].' if have > 4 else '')
      raise ValueError(f'image {index} has {image.shape[-1]} channels, but this model takes '
                       f'{want}-channel images {self.image_shape} '
                       f'({"grayscale" if want == 1 else "RGB" if want == 3 else "as trained"}).'
                       f'{fix}')
    return image
