"""Models by name: configs name a model and set its constructor arguments.

  registry.py    MODELS, filled by each family in its own module (info: family=, generic=),
                 which is imported when a name is first looked up
  resnet.py, bit.py, vit.py, convnext.py   the families; layers.py what they share, and the
                                   hardware lowering each takes as its `lowering` field
  cpu_kernels.py the CPU lowering, which from_config passes on CPUs (imgcls.hardware decides)
  *_weights.py   each family's checkpoint converters, registered in convert.CONVERTERS
  weights.py     files, format detection, merge, export (imgcls.models.weights)
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Mapping
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imgcls import hardware
from imgcls.models import cpu_kernels
from imgcls.models.layers import PLAIN, Lowering  # noqa: F401  (models.PLAIN, models.Lowering)
from imgcls.models.registry import MODELS

# Module fields no config sets: `lowering` is the caller's (from_config's) choice.
_NOT_CONFIGURABLE = frozenset({'parent', 'name', 'lowering'})


def list_models() -> list[str]:
  """Registered model names, sorted."""
  return MODELS.names()


def list_model_info(pattern: str = '*') -> list[dict[str, Any]]:
  """`imgcls models`: for each registered name matching the glob `pattern`, its family,
  parameter count (1000 classes; None for the generic names, which take their sizes from the
  config), default resolution and normalisation (None where the registry has none) and the
  weight formats its family loads (the official one first)."""
  return [describe(name) for name in list_models() if fnmatch.fnmatchcase(name, pattern)]


def describe(name: str) -> dict[str, Any]:
  """One row of `list_model_info`."""
  info = MODELS.info(name)
  return {'name': name, 'family': info.get('family'),
          'params': None if info.get('generic') else param_count(name),
          'resolution': info.get('resolution'), 'normalize': info.get('normalize'),
          'formats': weight_formats(info.get('family'))}


def weight_formats(family: str | None) -> list[str]:
  """The checkpoint formats (imgcls.models.convert.CONVERTERS) that load `family`'s models,
  the one export writes first."""
  from imgcls.models import weights  # noqa: F401  pylint: disable=g-import-not-at-top  (registers them)
  from imgcls.models.convert import CONVERTERS  # pylint: disable=g-import-not-at-top
  names = CONVERTERS.names(family=family)
  return sorted(names, key=lambda n: not CONVERTERS.info(n).get('official'))


def _repeats(model: nn.Module) -> tuple[str, tuple[int, ...]] | None:
  """(field, blocks per stage) of a model's repeated blocks: ViT's depth, ConvNeXt's depths,
  ResNet's and BiT's stage_sizes; None for a model with none of these."""
  from imgcls.models import convnext, vit  # pylint: disable=g-import-not-at-top  (listing only)
  if isinstance(model, vit.ViT):
    return 'depth', (model.dims()['depth'],)
  if isinstance(model, convnext.ConvNeXt):
    return 'depths', tuple(model.sizes()[0])
  if isinstance(getattr(model, 'stage_sizes', None), (tuple, list)):
    return 'stage_sizes', tuple(model.stage_sizes)
  return None


_COUNTS: dict[tuple[str, int], int] = {}  # (repr of a model, size): equal models count once


def _abstract_count(model: nn.Module, size: int) -> int:
  """Parameters of `model` on [1, size, size, 3] images, by jax.eval_shape (nothing allocated)."""
  key = (repr(model), size)
  if key not in _COUNTS:
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    _COUNTS[key] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params']))
  return _COUNTS[key]


@functools.lru_cache(maxsize=None)
def param_count(name: str, num_classes: int = 1000) -> int:
  """Trainable parameters of `name` (the 'params' collection, as timm counts them) at its
  default resolution (224 where the registry has none), from jax.eval_shape of its init.

  A block repeated within a stage adds the same parameters each time, so the count is affine
  in each stage's depth: it is taken from the model with one block per stage and with two in
  one stage at a time, which traces a few blocks instead of up to 48 (a listing of every name
  in seconds, not minutes). Equal to the full eval_shape count (tests/test_models_cli.py).
  """
  model = get_model(name, num_classes=num_classes)
  size = MODELS.info(name).get('resolution') or 224
  repeats = _repeats(model)
  if repeats is None or max(repeats[1]) <= 2:
    return _abstract_count(model, size)
  field, depths = repeats
  as_field = (lambda d: d[0]) if field == 'depth' else tuple
  ones = (1,) * len(depths)
  base = _abstract_count(model.clone(**{field: as_field(ones)}), size)
  total = base
  for i, depth in enumerate(depths):
    if depth > 1:
      two = ones[:i] + (2,) + ones[i + 1:]
      total += (depth - 1) * (_abstract_count(model.clone(**{field: as_field(two)}), size) - base)
  return total


def pp_values(name: str) -> dict[str, Any]:
  """What the pp placeholders '{resolution}' and '{normalize}' (imgcls.data.preprocess) mean for
  model `name`: its default resolution and normalize preset (None where the registry has none).
  The configs write them so an override of model.name brings its own preprocessing."""
  info = MODELS.info(name)
  return {'resolution': info.get('resolution'), 'normalize': info.get('normalize')}


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

