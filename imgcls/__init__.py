"""imgcls: image classification in JAX (Flax Linen, optax, TFDS, Orbax, clu).

Public API: `get_model(name, **kwargs)`, `list_models()`, `load_pretrained(file, variables)`
(official ViT/BiT .npz, timm/torchvision state dicts; see imgcls.models.weights); training runs
through `imgcls.train.train_and_evaluate(config, workdir)` or the `imgcls` command; a trained
checkpoint predicts with `imgcls.load(workdir).predict(images)` (imgcls.inference).

Every name is imported on first use: `import imgcls.config` (which every config file does)
must not pay for JAX or TensorFlow, so that a bad config is reported in seconds.
"""

import importlib

__version__ = '0.1.0'

_LAZY = {
    'get_model': 'imgcls.models',
    'list_models': 'imgcls.models',
    'load_pretrained': 'imgcls.models.weights',
    'load': 'imgcls.inference',
}

__all__ = sorted(_LAZY) + ['__version__']


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
