"""Prints the model table of docs/models.md: parameters, forward GMACs and checkpoint formats.

Parameters are counted at 1000 classes by abstract evaluation (nothing is allocated); GMACs are
XLA's cost analysis of the lowered forward pass at 224 px, batch 1, divided by two.

  uv run python scripts/model_table.py [--models=resnet50,vit_b16]
"""

from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp

import imgcls
from imgcls.models import MODELS, weights

_MODELS = flags.DEFINE_list('models', None, 'Registered names (default: all with fixed sizes).')
_SIZE = flags.DEFINE_integer('size', 224, 'Input height and width.')


def formats(family: str) -> str:
  """What load_pretrained / export read and write for a family, from the converter registry."""
  names = weights.CONVERTERS.names(family=family, official=True) + weights.CONVERTERS.names(
      family=family, official=False)
  return '; '.join(weights.CONVERTERS.info(n)['describe'] for n in names)


def measure(name: str, size: int) -> tuple[int, float]:
  model = imgcls.get_model(name)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  params = sum(a.size for a in jax.tree.leaves(variables['params']))
  cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return params, cost['flops'] / 2e9


def main(argv):
  del argv
  names = _MODELS.value or [n for n in MODELS.names() if not MODELS.info(n).get('generic')]
  print(f'| model | params | GMACs ({_SIZE.value} px) | pretrained formats |')
  print('|---|---:|---:|---|')
  for name in names:
    params, gmacs = measure(name, _SIZE.value)
    family = MODELS.info(name)['family']
    print(f'| `{name}` | {params / 1e6:.2f} M | {gmacs:.2f} | {formats(family)} |', flush=True)


if __name__ == '__main__':
  app.run(main)
