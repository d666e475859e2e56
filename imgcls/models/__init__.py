"""Models by name: configs name a model and set its constructor arguments.

  registry.py    MODELS, filled by each family in its own module (info: family=, generic=)
  resnet.py, vit.py, bit.py        the families; layers.py what they share, and the
                                   hardware lowering each takes as its `lowering` field
  cpu_kernels.py the CPU lowering, which from_config passes on CPUs (imgcls.hardware decides)
  *_weights.py   each family's checkpoint converters, registered in convert.CONVERTERS
  weights.py     files, format detection, merge, export (imgcls.models.weights)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from absl import logging
import flax.linen as nn

from imgcls import hardware
from imgcls.models import bit, resnet, vit  # noqa: F401  (each registers its models)
from imgcls.models import convnext  # noqa: F401  (registers convnext_*, convnextv2_*)
from imgcls.models import cpu_kernels
from imgcls.models.layers import PLAIN, Lowering  # noqa: F401  (models.PLAIN, models.Lowering)
from imgcls.models.registry import MODELS

# Module fields no config sets: `lowering` is the caller's (from_config's) choice.
_NOT_CONFIGURABLE = frozenset({'parent', 'name', 'lowering'})


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


def _takes_lowering(name: str) -> bool:
  return 'lowering' in inspect.signature(MODELS.get(name)).parameters


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the registered model `name` (plain Flax/lax lowering unless `lowering=` is given);
  unknown names or arguments raise ValueError."""
  valid = model_kwargs(name)
  for key in kwargs:
    if key not in valid and not (key == 'lowering' and _takes_lowering(name)):
      raise ValueError(f'Model {name!r} has no argument {key!r}; '
                       f'valid: {", ".join(sorted(valid))}.')
  return MODELS.get(name)(**kwargs)


def from_config(config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The model a config names, with num_classes from its dataset: the one way to build it.

  `config` is an ml_collections.ConfigDict or a plain dict as read back from a checkpoint's
  JSON metadata, where tuples became lists (they are turned back into tuples here).
  `overrides` replace model arguments (e.g. dtype for inference). dtype='auto' becomes the
  dtype this machine computes fastest (`auto_dtype`) here, and only here: the config (and so
  config.json and the checkpoints' metadata) keeps 'auto', and the parameters stay in
  param_dtype, so a run resumes and its checkpoints load on any kind of machine. On a CPU
  (hardware.use_cpu_kernels) the model gets cpu_kernels.CPU as its lowering unless `overrides`
  name one: the same values, computed the way XLA:CPU runs fastest.
  """
  model = config['model']
  model = model.to_dict() if hasattr(model, 'to_dict') else dict(model)
  kwargs = {'num_classes': config['dataset']['num_classes'],
            **{k: v for k, v in model.items() if k != 'name'}, **overrides}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if kwargs.get('dtype') == 'auto':
    kwargs['dtype'] = auto_dtype()
  if 'lowering' not in kwargs and _takes_lowering(model['name']) and hardware.use_cpu_kernels():
    kwargs['lowering'] = cpu_kernels.CPU
  return get_model(model['name'], **kwargs)


_LOGGED_AUTO: set[str] = set()


def auto_dtype() -> str:
  """model.dtype='auto' on this machine (imgcls.hardware.auto_dtype): 'bfloat16' on GPUs, TPUs
  and CPUs with native bf16, 'float32' elsewhere. Logs its choice and why, once."""
  dtype, why = hardware.auto_dtype_and_why()
  message = f"model.dtype='auto' -> {dtype} ({why})"
  if message not in _LOGGED_AUTO:
    _LOGGED_AUTO.add(message)
    logging.info(message)
  return dtype

