"""imgcls: image classification in JAX (Flax Linen, optax, TFDS, Orbax, clu).

Public API: `get_model(name, **kwargs)`, `list_models()`, `load_pretrained(file, variables)`
(official ViT/BiT .npz, timm/torchvision state dicts; see imgcls.models.weights); training runs through
`imgcls.train.train_and_evaluate(config, workdir)` or the `imgcls` command; a trained
checkpoint predicts with `imgcls.load(workdir).predict(images)` (imgcls.inference).
"""

from imgcls.models import get_model, list_models
from imgcls.models.weights import load_pretrained

__version__ = '0.1.0'

__all__ = ['get_model', 'list_models', 'load', 'load_pretrained', '__version__']


def __getattr__(name: str):
  # Lazy: imgcls.inference imports TensorFlow (for the pp ops), which `import imgcls` should not.
  if name == 'load':
    from imgcls.inference import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
