"""One small registry class for everything a config names: models, pp ops, dataset
sources and evaluators. Each is registered where it is defined:

  MODELS = Registry('model')

  @MODELS.register('resnet18')
  class ResNet18(nn.Module): ...

  MODELS.register('vit_b16', functools.partial(ViT, variant='B/16'))

`info` keeps per-entry flags (e.g. `label_op=True` on pp ops that work on labels), so
a list such as "the label ops" is derived from the registry, never typed again.
This module imports nothing heavy: config validation reads names through it.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar('T')


class UnknownName(ValueError):
  """A name that is not registered; the message lists close matches and the known names."""


class Registry(Generic[T]):
  """Names -> objects (classes, factories), with optional per-name info flags."""

  def __init__(self, kind: str, plural: str | None = None):
    self.kind = kind  # in messages: "unknown {kind} 'x'. ... Known {plural}: ..."
    self.plural = plural or f'{kind}s'
    self._items: dict[str, T] = {}
    self._info: dict[str, dict[str, Any]] = {}

  def register(self, name: str, obj: T | None = None, **info: Any) -> Any:
    """`register(name, obj)` or, as a decorator, `@register(name)`; returns obj."""
    def add(item: T) -> T:
      if name in self._items:
        raise ValueError(f'{self.kind} {name!r} is already registered.')
      self._items[name] = item
      self._info[name] = dict(info)
      return item
    return add if obj is None else add(obj)

  def names(self, **where: Any) -> list[str]:
    """Registered names, sorted; with keyword filters, those whose info matches."""
    return sorted(n for n in self._items
                  if all(self._info[n].get(k) == v for k, v in where.items()))

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._items)

  def unknown(self, name: Any) -> str:
    """The message for an unknown name: close matches first, then every known name."""
    close = difflib.get_close_matches(str(name), list(self._items), n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    return f'unknown {self.kind} {name!r}.{hint} Known {self.plural}: {", ".join(self.names())}.'

  def get(self, name: str) -> T:
    if name not in self._items:
      raise UnknownName(self.unknown(name))
    return self._items[name]

  def info(self, name: str) -> dict[str, Any]:
    self.get(name)
    return dict(self._info[name])

  def items(self) -> list[tuple[str, T]]:
    return [(n, self._items[n]) for n in self.names()]


def lazy_import(name: str):
  """The module `name`, loaded on first attribute access (importlib's LazyLoader).

  For TensorFlow and TFDS in modules that config validation imports (pp ops, dataset
  sources): registering an op or a source must not cost TensorFlow's slow import, so a
  bad config is reported in seconds. A module already imported is returned as it is.
  """
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec(name)
  if spec is None:
    raise ModuleNotFoundError(f'No module named {name!r}', name=name)
  loader = importlib.util.LazyLoader(spec.loader)
  spec.loader = loader
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  loader.exec_module(module)
  return module


def is_loaded(name: str) -> bool:
  """Whether module `name` has really been executed (a lazy one counts only once used)."""
  module = sys.modules.get(name)
  if module is None:
    return False
  return not isinstance(module, importlib.util._LazyModule)  # pylint: disable=protected-access
