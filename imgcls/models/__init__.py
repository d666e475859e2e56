"""Model registry: configs name a model and set its constructor arguments."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from imgcls.models import resnet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_NOT_CONFIGURABLE = frozenset({'parent', 'name'})


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Decorator registering a module class (or a functools.partial of one) under `name`."""

  def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
      raise ValueError(f'Model {name!r} is already registered.')
    _REGISTRY[name] = factory
    return factory

  return wrap


def list_models() -> list[str]:
  """Registered model names, sorted."""
  return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., nn.Module]:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model {name!r}.{hint} Known models: {", ".join(list_models())}.')
  return _REGISTRY[name]


def model_kwargs(name: str) -> set[str]:
  """Constructor arguments a config may set for `name` (those a partial fixes are excluded)."""
  factory = _factory(name)
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
  return _factory(name)(**kwargs)


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


register('resnet18')(resnet.ResNet18)
register('resnet34')(resnet.ResNet34)
register('resnet50')(resnet.ResNet50)
register('resnet101')(resnet.ResNet101)
register('resnet152')(resnet.ResNet152)
# One BasicBlock per stage (timm's resnet10t depth): tiny runs, tests, quick ablations.
register('resnet10')(functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1, 1),
                                       block=resnet.BasicBlock))

# Vision Transformers: 'vit' takes the variant ('NAME/PATCH', e.g. 'S/4') from the config.
from imgcls.models import vit  # noqa: E402  pylint: disable=g-import-not-at-top

register('vit')(vit.ViT)
for _name, _variant in (('vit_ti16', 'Ti/16'), ('vit_s16', 'S/16'), ('vit_b16', 'B/16'),
                        ('vit_l16', 'L/16'), ('vit_b32', 'B/32')):
  register(_name)(functools.partial(vit.ViT, variant=_variant))

# BiT ResNet-V2 (GroupNorm + weight standardisation): 'bit' takes stage_sizes (a tuple) and
# width from the config; the released sizes fix both (R50 = (3, 4, 6, 3), width = 64 * factor).
from imgcls.models import bit  # noqa: E402  pylint: disable=g-import-not-at-top

register('bit')(bit.ResNetV2)
for _name, (_depth, _factor) in bit.RELEASED.items():
  register(_name)(functools.partial(bit.ResNetV2, stage_sizes=bit.STAGE_SIZES[_depth],
                                    width=64 * _factor))
