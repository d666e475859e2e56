"""Every config file in configs/ loads, validates and builds its model at its input size."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from imgcls import config as config_lib, train

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))
IMAGE_SIZE = {'fashion_mnist': (28, 28, 1), 'imagenet2012': (224, 224, 3)}


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_there_are_configs_for_each_anchor():
  names = {p.stem for p in CONFIGS}
  assert {'default', 'imagenet_resnet50', 'imagenet_vit_b16', 'imagenet_bit_r50x1',
          'fashion_mnist_resnet', 'fashion_mnist_vit'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_its_model_builds(path):
  config = _load(path)
  config_lib.validate(config)
  assert path.read_text().lstrip().startswith('"""'), 'each config documents its recipe'
  shape = IMAGE_SIZE[config.dataset.name]
  model = train.build_model(config)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (2, config.dataset.num_classes)
