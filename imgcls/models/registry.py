"""The model registry. Each family registers its names in its own module (resnet.py, bit.py,
vit.py, convnext.py), with `family=` in the entry's info; imgcls.models builds them by name.
The family modules are imported in turn until a looked-up name is found, so a ResNet run
loads no ViT or ConvNeXt code (a listing loads them all)."""

from __future__ import annotations

from imgcls.registry import Registry

MODELS = Registry('model', modules=tuple(
    f'imgcls.models.{family}' for family in ('resnet', 'bit', 'vit', 'convnext')))
