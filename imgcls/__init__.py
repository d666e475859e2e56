"""imgcls: image classification in JAX (Flax Linen, optax, TFDS, Orbax, clu).

Public API: `get_model(name, **kwargs)`, `list_models()`; training runs through
`imgcls.train.train_and_evaluate(config, workdir)` or the `imgcls` command.
"""

from imgcls.models import get_model, list_models

__version__ = '0.1.0'

__all__ = ['get_model', 'list_models', '__version__']
