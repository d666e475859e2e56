"""Ablation: augmentation on the quickstart ResNet (configs/default.py), one epoch each.

  imgcls sweep --config=configs/fashion_mnist_sweep.py --workdir=workdirs/aug_sweep

Three variants (no augmentation, flips, padded crops + flips), each trained in
workdirs/aug_sweep/NAME, then compared (compare.md/.csv, curves.png). One epoch each, about
1.5 min per variant on a 2-core Intel Xeon CPU. Longer: --config=configs/fashion_mnist_sweep.py:epochs=4
"""

import os

from imgcls import sweep
from imgcls.config import parse_arg

_PP_END = 'value_range(-1, 1)|onehot(10)'


def _default_config(arg: str):
  here = os.path.dirname(os.path.abspath(__file__))
  return sweep.config_from_file(f'{os.path.join(here, "default.py")}:{arg}')


def get_config(arg=None):
  arg = parse_arg(arg, epochs=1.0, width=16)
  c = _default_config(f'epochs={arg.epochs},width={arg.width}')
  c.lr.warmup_steps = 100
  return c


def get_sweep(arg=None):
  del arg  # the variants are the same at any length
  return [
      {'name': 'aug_none', 'pp_train': f'decode|{_PP_END}'},
      {'name': 'aug_flip', 'pp_train': f'decode|flip_lr|{_PP_END}'},
      {'name': 'aug_crop_flip', 'pp_train': f'decode|random_crop(28, pad=2)|flip_lr|{_PP_END}'},
  ]
