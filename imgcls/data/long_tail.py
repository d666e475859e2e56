"""The dataset source 'fashion_mnist_lt': Fashion-MNIST with a long-tailed train split
(exponential profile, imbalance ratio `dataset.imbalance_ratio`, 100 by default) and the
balanced test split; see long_tail_builder.py. Light: TensorFlow loads on first use.

Names: 'fashion_mnist_lt' (ratio from the option imbalance_ratio) or 'fashion_mnist_lt/r10'
(the config named in full wins).
"""

from __future__ import annotations

from typing import Any

from imgcls.data.base import register_source, DataError, default_data_dir
from imgcls.registry import lazy_import

long_tail_builder = lazy_import('imgcls.data.long_tail_builder')

NAME = 'fashion_mnist_lt'
DEFAULT_RATIO = 100.0


def _ratio(name: str, options: dict[str, Any]) -> float:
  config = name.split('/')[1] if '/' in name else ''
  if config:
    try:
      return float(config.removeprefix('r'))
    except ValueError:
      raise DataError(f'Bad dataset name {name!r}: the config must be r<ratio>, e.g. '
                      f'{NAME}/r100.') from None
  ratio = options.get('imbalance_ratio') or DEFAULT_RATIO
  if not ratio >= 1:
    raise DataError(f'dataset.imbalance_ratio must be >= 1 (1: balanced), got {ratio}.')
  return float(ratio)


class LongTailSource:
  """fashion_mnist_lt[/rRATIO], prepared offline from fashion_mnist."""

  names = (NAME,)
  prefix = ''
  fallback = False

  def builder(self, name: str, data_dir: str, *, prepare: bool = True, **options: Any):
    b = long_tail_builder.builder(data_dir, _ratio(name, options))
    if b.is_prepared():
      return b
    if not prepare:
      raise DataError(f'Dataset {name!r} is not prepared in {b.data_dir}: run `imgcls prepare '
                      f'{NAME} --data_dir={data_dir}` (needs fashion_mnist, offline is fine).')
    return long_tail_builder.prepare(data_dir, ratio=_ratio(name, options))

  def prepare(self, name: str, data_dir: str, manual_dir: str | None = None, **options: Any):
    return long_tail_builder.prepare(default_data_dir(data_dir), manual_dir,
                                     ratio=_ratio(name, options))


register_source(NAME, LongTailSource())
