"""The model registry. Each family registers its names in its own module (resnet.py, vit.py,
bit.py), with `family=` in the entry's info; imgcls.models builds them by name."""

from __future__ import annotations

from imgcls.registry import Registry

MODELS = Registry('model')
