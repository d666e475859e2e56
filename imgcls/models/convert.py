"""What every family's weight converters share: the format registry and the layout helpers.

Each model family defines its converters beside itself (vit_weights.py, bit_weights.py,
resnet_weights.py; timm's `checkpoint_filter_fn`) and registers them in CONVERTERS under the
format name, with info `family=` (the imgcls family whose names it maps to), `official=True`
for the format `weights.export` writes for that family by default, and `describe=` (a few
words for tables such as the README's). `imgcls.models.weights`
reads and writes files, detects formats and merges; it knows no family's names.
The converter modules are imported on the first read of CONVERTERS (reading, exporting or
listing weights), so building and training a model loads none of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping

import numpy as np

from imgcls.registry import Registry
from imgcls.errors import UserError

Flat = dict[str, np.ndarray]


class WeightsError(UserError):
  """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Converter:
  """One checkpoint format of one model family, both ways.

  is_format(keys): whether a checkpoint's keys are in this format (format detection).
  is_family(keys): whether imgcls-named flat keys ('params/...') are this family's model
    (which format to export to); the same test for every format of a family.
  to_imgcls(flat) -> (imgcls-named flat variables, keys no rule knows).
  from_imgcls(flat imgcls variables) -> flat checkpoint in this format.
  """
  is_format: Callable[[Collection[str]], bool]
  is_family: Callable[[Collection[str]], bool]
  to_imgcls: Callable[[Mapping[str, np.ndarray]], tuple[Flat, list[str]]]
  from_imgcls: Callable[[Mapping[str, np.ndarray]], Flat]


# The modules that define and register the converters (imgcls.models.*), imported on the
# first read of CONVERTERS.
CONVERTER_MODULES = ('bit_weights', 'convnext_weights', 'resnet_weights', 'vit_weights')
CONVERTERS: Registry[Converter] = Registry(
    'weights format', modules=tuple(f'imgcls.models.{m}' for m in CONVERTER_MODULES))


# Layout helpers: torch stores convs OIHW and linear layers [out, in]; Flax HWIO and [in, out].
def conv_t2f(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def conv_f2t(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (3, 2, 0, 1))


def linear(w: np.ndarray) -> np.ndarray:  # its own inverse
  return np.transpose(w)


def strip_prefix(flat: Mapping[str, np.ndarray], anchor: str) -> Flat:
  """Drops whatever prefix ('params/', 'opt/target/', 'params/img/', ...) precedes `anchor`."""
  hits = [k[:-len(anchor)] for k in flat if k == anchor or k.endswith('/' + anchor)]
  if not hits:
    return dict(flat)
  prefix = min(hits, key=len)
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
