"""Models by name: configs name a model and set its constructor arguments.

  registry.py    MODELS, filled by each family in its own module (info: family=, generic=)
  resnet.py, vit.py, bit.py        the families; layers.py what they share
  *_weights.py   each family's checkpoint converters, registered in convert.CONVERTERS
  weights.py     files, format detection, merge, export (imgcls.models.weights)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from imgcls.models import bit, resnet, vit  # noqa: F401  (each registers its models)
from imgcls.models.registry import MODELS

_NOT_CONFIGURABLE = frozenset({'parent', 'name'})


def list_models() -> list[str]:
  """Registered model names, sorted."""
  return MODELS.names()


def model_kwargs(name: str) -> set[str]:
  """Constructor arguments a config may set for `name` (those a partial fixes are excluded)."""
  factory = MODELS.get(name)
  fixed = set(factory.keywords) if isinstance(factory, functools.partial) else set()
  params = inspect.signature(factory).parameters.values()
  return {p.name for p in params
          if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
          and p.name not in fixed | _NOT_CONFIGURABLE}


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the registered model `name`; unknown names or arguments raise ValueError."""
  valid = model_kwargs(name)
  for key in kwargs:
    if key not in valid:
      raise ValueError(f'Model {name!r} has no argument {key!r}; valid: {", ".join(sorted(valid))}.')
  return MODELS.get(name)(**kwargs)


def from_config(config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The model a config names, with num_classes from its dataset: the one way to build it.

  `config` is an ml_collections.ConfigDict or a plain dict as read back from a checkpoint's
  JSON metadata, where tuples became lists (they are turned back into tuples here).
  `overrides` replace model arguments (e.g. dtype for inference).
  """
  model = config['model']
  model = model.to_dict() if hasattr(model, 'to_dict') else dict(model)
  kwargs = {'num_classes': config['dataset']['num_classes'],
            **{k: v for k, v in model.items() if k != 'name'}, **overrides}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return get_model(model['name'], **kwargs)

