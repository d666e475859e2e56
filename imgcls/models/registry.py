"""The model registry. Each family registers its names in its own module (resnet.py, vit.py,
bit.py), with `family=` in the entry's info; imgcls.models builds them by name."""

from __future__ import annotations

from typing import Any

from imgcls.registry import Registry


class _ModelRegistry(Registry):
  """imgcls.registry.Registry, in the wording users and configs have quoted since v1."""

  def register(self, name: str, obj: Any = None, **info: Any) -> Any:
    if name in self:
      raise ValueError(f'Model {name!r} is already registered.')
    return super().register(name, obj, **info)

  def unknown(self, name: Any) -> str:
    message = super().unknown(name)  # 'unknown model ... Known: ...'
    return 'U' + message[1:].replace(' Known: ', ' Known models: ', 1)


MODELS = _ModelRegistry('model')
