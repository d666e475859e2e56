"""Ablation of augmentation and regularisation on the quickstart ResNet (configs/default.py).

One variant:   imgcls train --config=configs/fashion_mnist_ablation.py:aug=mixup --workdir=...
All of them:   imgcls sweep --config=configs/fashion_mnist_ablation.py --workdir=workdirs/ablation

aug = none | flip | crop_flip | randaug | erasing | mixup | cutmix | ema
  randaug: RandAugment(2, 9) before the value range; erasing: random erasing p=0.5 after it;
  mixup: mixup alpha 0.2; cutmix: CutMix alpha 1.0 (both on device, batch level);
  ema: flips plus an EMA of the weights (decay 0.998), evaluated beside the raw ones.
Two epochs each by default (a few minutes a variant on a 2-core CPU); short schedules
favour weak augmentation, so compare at :epochs=10 or more before drawing conclusions.
"""

import os

from imgcls import sweep
from imgcls.config import parse_arg

_END = 'value_range(-1, 1)|onehot(10)'
VARIANTS = {
    'none': {'pp_train': f'decode|{_END}'},
    'flip': {'pp_train': f'decode|flip_lr|{_END}'},
    'crop_flip': {'pp_train': f'decode|random_crop(28, pad=2)|flip_lr|{_END}'},
    'randaug': {'pp_train': f'decode|flip_lr|randaugment(2, 9)|{_END}'},
    'erasing': {'pp_train': 'decode|flip_lr|value_range(-1, 1)|random_erasing(0.5)|onehot(10)'},
    'mixup': {'pp_train': f'decode|flip_lr|{_END}', 'mixup.mixup_alpha': 0.2},
    'cutmix': {'pp_train': f'decode|flip_lr|{_END}', 'mixup.cutmix_alpha': 1.0},
    'ema': {'pp_train': f'decode|flip_lr|{_END}', 'ema_decay': 0.998},
}


def _default_config(arg: str):
  here = os.path.dirname(os.path.abspath(__file__))
  return sweep.config_from_file(f'{os.path.join(here, "default.py")}:{arg}')


def get_config(arg=None):
  arg = parse_arg(arg, aug='flip', epochs=2.0, width=16)
  if arg.aug not in VARIANTS:
    raise ValueError(f'aug must be one of {", ".join(VARIANTS)}, got {arg.aug!r}')
  c = _default_config(f'epochs={arg.epochs},width={arg.width}')
  c.lr.warmup_steps = 100
  return sweep.apply_overrides(c, VARIANTS[arg.aug])


def get_sweep(arg=None):
  del arg
  return [{'name': f'aug_{name}', **overrides} for name, overrides in VARIANTS.items()]
