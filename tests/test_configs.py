"""Every config file in configs/ loads, validates and builds its model at its input size."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from imgcls import config as config_lib, models

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))
IMAGE_SIZE = {'fashion_mnist': (28, 28, 1), 'imagenet2012': (224, 224, 3),
              'cifar10': (384, 384, 3)}


ARGS = {'image_folder': 'root=/data/images,classes=3'}  # configs that need an argument


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(ARGS.get(path.stem))


def test_there_are_configs_for_each_anchor():
  names = {p.stem for p in CONFIGS}
  assert {'default', 'imagenet_resnet50', 'imagenet_vit_b16', 'imagenet_bit_r50x1',
          'fashion_mnist_resnet', 'fashion_mnist_vit'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_its_model_builds(path):
  config = _load(path)
  config_lib.validate(config)
  assert path.read_text().lstrip().startswith('"""'), 'each config documents its recipe'
  shape = IMAGE_SIZE.get(config.dataset.name, (128, 128, 3))  # folder:...: 128 px RGB
  model = models.from_config(config)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (2, config.dataset.num_classes)


def test_image_folder_config_needs_root_and_classes():
  spec = importlib.util.spec_from_file_location('f', CONFIGS[0].parent / 'image_folder.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(config_lib.ConfigError, match='root=.*classes='):
    module.get_config(None)


@pytest.mark.parametrize('arg,steps,lr,mixup', [
    ('model=vit_b16,dataset=cifar10', 10_000, 0.03, 0.0),
    ('model=vit_b16,dataset=oxford_flowers102', 500, 0.03, 0.0),
    ('model=bit_r50x1,dataset=cifar100', 10_000, 0.003, 0.1),  # HyperRule: MixUp above 20k
    ('model=bit_r50x1,dataset=oxford_iiit_pet', 500, 0.003, 0.0),
    ('model=bit_r50x1,dataset=imagenet2012', 20_000, 0.003, 0.1),
])
def test_transfer_recipes(arg, steps, lr, mixup):
  spec = importlib.util.spec_from_file_location('t', CONFIGS[0].parent / 'transfer.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = config_lib.validate(module.get_config(arg))
  assert config.total_steps == steps and config.lr.base == lr and config.weight_decay == 0.0
  assert config.batch_size == 512 and config.grad_clip_norm == 1.0
  assert config.mixup.mixup_alpha == mixup
  with pytest.raises(config_lib.ConfigError, match='mnist'):
    module.get_config('dataset=mnist')
