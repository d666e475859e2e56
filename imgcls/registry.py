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
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar('T')


class UnknownName(ValueError):
  """A name that is not registered; the message lists close matches and the known names."""


class Registry(Generic[T]):
  """Names -> objects (classes, factories), with optional per-name info flags.

  Entries can be known before their module is imported, so a run imports only what it uses:
  - `declare(name, module, **info)`: the name and its info are known at once; the first
    `get(name)` imports `module`, which registers the real entry (with the same info).
  - `Registry(kind, modules=(...))`: modules that register names here, imported in turn when
    a lookup misses (a listing imports them all), for families with many names.
  """

  def __init__(self, kind: str, plural: str | None = None, modules: tuple[str, ...] = ()):
    self.kind = kind  # in messages: "unknown {kind} 'x'. ... Known {plural}: ..."
    self.plural = plural or f'{kind}s'
    self._items: dict[str, T] = {}
    self._info: dict[str, dict[str, Any]] = {}
    self._declared: dict[str, str] = {}  # name -> the module that registers it
    self._pending = list(modules)  # modules not imported yet that register names here

  def register(self, name: str, obj: T | None = None, **info: Any) -> Any:
    """`register(name, obj)` or, as a decorator, `@register(name)`; returns obj."""
    def add(item: T) -> T:
      if name in self._items:
        raise ValueError(f'{self.kind} {name!r} is already registered.')
      if name in self._declared:
        if info != self._info[name]:
          raise ValueError(f'{self.kind} {name!r} registers {info}, but was declared with '
                           f'{self._info[name]}: fix its declaration.')
        del self._declared[name]
      self._items[name] = item
      self._info[name] = dict(info)
      return item
    return add if obj is None else add(obj)

  def declare(self, name: str, module: str, **info: Any) -> None:
    """Makes `name` (with its info) known; `module` is imported when `get` first needs it."""
    if name not in self._items:  # else the module is already imported
      self._declared[name] = module
      self._info[name] = dict(info)

  def _load(self, name: Any = None) -> None:
    """Imports pending modules until `name` is known (all of them for None)."""
    while self._pending and (name is None or name not in self._info):
      module = self._pending.pop(0)  # first: the module may read this registry as it loads
      try:
        importlib.import_module(module)
      except BaseException:
        self._pending.insert(0, module)
        raise

  def names(self, **where: Any) -> list[str]:
    """Known names, sorted; with keyword filters, those whose info matches."""
    self._load()
    return sorted(n for n in self._info
                  if all(self._info[n].get(k) == v for k, v in where.items()))

  def __contains__(self, name: object) -> bool:
    self._load(name)
    return name in self._info

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self.names())

  def unknown(self, name: Any) -> str:
    """The message for an unknown name: close matches first, then every known name."""
    known = self.names()
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    return f'unknown {self.kind} {name!r}.{hint} Known {self.plural}: {", ".join(known)}.'

  def get(self, name: str) -> T:
    if name not in self:
      raise UnknownName(self.unknown(name))
    if name in self._declared:
      module = self._declared[name]
      importlib.import_module(module)  # registers the real entry, replacing the declaration
      if name in self._declared:
        raise ValueError(f'{module} does not register the {self.kind} {name!r}.')
    return self._items[name]

  def info(self, name: str) -> dict[str, Any]:
    """The entry's info flags; for a declared name, without importing its module."""
    if name not in self:
      raise UnknownName(self.unknown(name))
    return dict(self._info[name])

  def items(self) -> list[tuple[str, T]]:
    """(name, entry) for every name: imports every declared module."""
    return [(n, self.get(n)) for n in self.names()]


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
