"""Samples for checks and tests: the tiny synthetic training config, the odd image files users
have, and a checkpoint as training writes it from random weights (no training)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

LABELS = ['cat', 'dog', 'owl']

# A run that trains in seconds: a ResNet-10 of width 8 on data.make_synthetic_dataset's images
# (4 classes), as dotted overrides of config.defaults(). Tests, the fault drill and
# import_graph.py all start from it.
TINY = {'dataset.name': 'synthetic_shapes', 'dataset.num_classes': 4,
        'dataset.shuffle_buffer': 1000,
        'pp_train': 'decode|flip_lr|value_range(-1, 1)|onehot(4)',
        'pp_eval': 'decode|value_range(-1, 1)|onehot(4)', 'model.name': 'resnet10',
        'model.width': 8, 'model.stem': 'small', 'batch_size': 16, 'eval_batch_size': 16}


def tiny_config(data_dir: str, overrides: dict | None = None):
  """config.defaults() with TINY, the data_dir and the dotted `overrides` ({'lr.base': 0.1})."""
  from imgcls import config as config_lib, sweep  # pylint: disable=g-import-not-at-top
  return sweep.apply_overrides(config_lib.defaults(), {
      **TINY, 'dataset.data_dir': data_dir, **(overrides or {})})


def gradient(w: int, h: int, channels: int = 3, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, channels), np.uint8)


def odd_images() -> dict[str, tuple[str, bytes]]:
  """{case: (file extension, bytes)}; every case decodes differently with TF alone."""
  out = {}

  def save(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()
  rotated = Image.fromarray(gradient(14, 9))
  exif = rotated.getexif()
  exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
  out['exif'] = ('jpg', save(rotated, 'JPEG', exif=exif, quality=95))
  rgba = gradient(11, 10, 4, seed=1)
  rgba[..., 3] = np.linspace(0, 255, 11, dtype=np.uint8)[None, :]  # 0 to opaque
  out['rgba'] = ('png', save(Image.fromarray(rgba), 'PNG'))
  cmyk = Image.frombytes('CMYK', (10, 12), gradient(10, 12, 4, seed=2).tobytes())
  out['cmyk'] = ('jpg', save(cmyk, 'JPEG'))
  deep = (np.arange(12 * 9, dtype=np.uint16).reshape(9, 12) * 600).astype(np.uint16)
  out['png16'] = ('png', save(Image.fromarray(deep), 'PNG'))
  palette = Image.fromarray(gradient(10, 10, seed=3)).convert('P', palette=Image.ADAPTIVE,
                                                              colors=16)
  out['gif'] = ('gif', save(palette, 'GIF', transparency=0))
  out['gray'] = ('png', save(Image.fromarray(gradient(9, 13, 1, seed=4)[..., 0]), 'PNG'))
  out['jpeg'] = ('jpg', save(Image.fromarray(gradient(12, 12, seed=5)), 'JPEG', quality=90))
  return out


def random_checkpoint(workdir, model_config, image_shape, pp_eval, *, ema=False, seed=0,
                      loss='softmax_xent', metrics=None, label_names=LABELS) -> str:
  """A checkpoint as training writes it, from random weights (no training): params,
  batch_stats and, with ema, a different EMA copy of both. Returns the workdir."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from imgcls import checkpoints, models
  num_classes = len(label_names)
  config = {'model': model_config, 'dataset': {'num_classes': num_classes}, 'pp_eval': pp_eval,
            'loss': loss}
  model = models.from_config(config)
  variables = jax.device_get(model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)),
                                        train=False))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype),
                        variables['params'])  # non-zero heads: distinct probabilities
  state = {'step': np.int32(10), 'params': params,
           'batch_stats': variables.get('batch_stats', {}), 'opt_state': np.zeros(1, np.float32),
           'rng': np.zeros(2, np.uint32)}
  if ema:
    state['ema_params'] = jax.tree.map(lambda p: p + rng.normal(0, 0.2, p.shape).astype(p.dtype),
                                       params)
    state['ema_batch_stats'] = state['batch_stats']
  meta = {'config': config, 'image_shape': list(image_shape), 'label_names': label_names}
  ckpt = checkpoints.Checkpointer(str(workdir), asynchronous=False)
  ckpt.save(10, state, meta, metrics=metrics or {'eval_top1': 0.5})
  ckpt.close()
  return str(workdir)
