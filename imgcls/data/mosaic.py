"""The dataset source 'fashion_mnist_mosaic': 2x2 Fashion-MNIST mosaics labelled with the set
of classes they show, built offline from the prepared fashion_mnist (see mosaic_builder.py for
the dataset itself; its labels become a vector with the `multihot` pp op).

This module stays light (no TensorFlow) so that registering the source costs nothing; the
TFDS builder is imported when the dataset is found or prepared.
"""

from __future__ import annotations

from typing import Any

from imgcls.data import tfds_source
from imgcls.data.base import register_source
from imgcls.registry import lazy_import

mosaic_builder = lazy_import('imgcls.data.mosaic_builder')

NAME = 'fashion_mnist_mosaic'


def prepare(data_dir: str | None = None, manual_dir: str | None = None,
            config: Any = 'default'):
  """Prepares fashion_mnist (offline if need be, from manual_dir if given), then the mosaics
  of `config` (a name or a mosaic_builder.MosaicConfig); returns the prepared builder."""
  return mosaic_builder.prepare(data_dir, manual_dir=manual_dir, config=config)


class MosaicSource(tfds_source.TfdsSource):
  """fashion_mnist_mosaic[/config]: TFDS's builder from mosaic_builder, prepared offline."""

  names = (NAME,)
  fallback = False

  def find(self, name: str, data_dir: str):
    mosaic_builder.FashionMnistMosaic  # pylint: disable=pointless-statement  # registers it in TFDS
    return super().find(name, data_dir)

  def prepare_files(self, builder, name: str, data_dir: str,
                    manual_dir: str | None = None) -> None:
    del name
    prepare(data_dir, manual_dir=manual_dir, config=builder.builder_config)


register_source(NAME, MosaicSource())
