"""The preprocessing comes with the model name: the pp placeholders '{resolution}' and
'{normalize}' are filled from model.name's registry info when the config is validated, after
every --config override, and the run's config.json (what imgcls.load replays) has them filled."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

import imgcls
from imgcls import config as config_lib, models, train
from imgcls.data import preprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = {'convnext': ROOT / 'configs' / 'finetune_convnext.py',
           'vit': ROOT / 'configs' / 'finetune_vit_backbones.py'}


def _recipe(family: str, arg: str):
  spec = importlib.util.spec_from_file_location(f'recipe_{family}', RECIPES[family])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _from_command_line(*argv: str):
  """The config as `imgcls train ARGV` builds it: ml_collections' --config flag with its
  --config.KEY=VALUE overrides applied (in its own FlagValues; it reads them from sys.argv)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True)
  saved, sys.argv = sys.argv, ['imgcls', *argv]
  try:
    values(sys.argv)
  finally:
    sys.argv = saved
  return values.config


def test_fill_placeholders():
  values = {'resolution': 224, 'normalize': 'clip'}
  fill = lambda s: preprocess.fill_placeholders(s, values, 'model m')  # noqa: E731
  assert fill('resize_small({resolution/0.875})|central_crop({resolution})|'
              'normalize_preset("{normalize}")') == (
                  'resize_small(256)|central_crop(224)|normalize_preset("clip")')
  assert fill('decode|value_range(-1, 1)') == 'decode|value_range(-1, 1)'
  with pytest.raises(preprocess.DataError, match=r'unknown placeholder \{size\}'):
    fill('resize({size})')
  with pytest.raises(preprocess.DataError, match='has no default resolution'):
    preprocess.fill_placeholders('resize({resolution})', models.pp_values('resnet18'),
                                 "model 'resnet18'")
  with pytest.raises(preprocess.DataError, match='still has model placeholders'):
    preprocess.get_pp_fn('decode|resize({resolution})')


@pytest.mark.parametrize('name,size,preset', [
    ('vit_small_patch14_dinov2', 518, 'imagenet'), ('vit_base_patch14_reg4_dinov2', 518, 'imagenet'),
    ('vit_base_patch16_siglip_224', 224, 'siglip'), ('vit_base_patch16_siglip_gap_224', 224, 'siglip'),
    ('vit_base_patch16_clip_224', 224, 'clip'), ('vit_base_patch16_clip_quickgelu_224', 224, 'clip'),
    ('vit_large_patch14_clip_336', 336, 'clip'),
    ('convnext_tiny', 224, 'imagenet'), ('convnextv2_tiny', 224, 'imagenet')])
def test_recipes_take_normalisation_and_resolution_from_the_name(name, size, preset):
  """The strings equal those the recipes wrote before the placeholders (the name's own values
  typed in), for the recipe's `model=` and for --config.model.name on another default."""
  family = 'convnext' if name.startswith('convnext') else 'vit'
  norm = f'normalize_preset("{preset}")|onehot(5)'
  resize = round(size / 0.875) if family == 'convnext' else size  # timm's crop_pct
  want = (f'decode(3)|inception_crop({size})|flip_lr|{norm}',
          f'decode(3)|resize_small({resize}, method="bicubic", antialias=True)|'
          f'central_crop({size})|{norm}')
  c = config_lib.validate(_recipe(family, f'model={name},classes=5'))
  assert (c.pp_train, c.pp_eval) == want
  c = _from_command_line(f'--config={RECIPES[family]}:classes=5', f'--config.model.name={name}')
  assert '{resolution}' in c.pp_train  # filled at validation, after the overrides
  config_lib.validate(c)
  assert (c.model.name, c.pp_train, c.pp_eval) == (name, *want)
  assert preprocess.PLACEHOLDER.search(json.dumps(c.to_dict())) is None


def test_size_argument_and_evaluator_pp_and_errors():
  c = config_lib.validate(_recipe('convnext', 'classes=5,size=160'))
  assert 'inception_crop(160)' in c.pp_train and 'resize_small(183,' in c.pp_eval
  c = _recipe('vit', 'model=vit_base_patch16_clip_224,classes=5')
  c.evals.fewshot = dict(type='fewshot', shots=(1,), pp='decode(3)|resize({resolution})|'
                                                       'normalize_preset("{normalize}")')
  config_lib.validate(c)
  assert c.evals.fewshot.pp == 'decode(3)|resize(224)|normalize_preset("clip")'
  c = _recipe('vit', 'classes=5')
  c.model.name = 'resnet18'  # no resolution in its registry info: say so, in one line
  with pytest.raises(config_lib.ConfigError, match="model 'resnet18' has no default resolution"):
    config_lib.validate(c)
  c = _recipe('vit', 'classes=5')
  c.model.name = 'vit_small_patch14_dinov'
  with pytest.raises(config_lib.ConfigError, match='unknown model.name.*Did you mean'):
    config_lib.validate(c)


def test_finetune_with_another_name_replays_its_pp_in_load(data_dir, tmp_path):
  """configs/finetune_vit_backbones.py (SigLIP by default) with --config.model.name=
  vit_small_patch14_dinov2 (tiny sizes, patch 37: a 14x14 grid at DINOv2's 518 px) trains with
  DINOv2's pp, and imgcls.load, replaying the run's eval pp, scores the test split with the
  eval's loss."""
  assert jax.device_count() == 8
  c = _from_command_line(
      f'--config={RECIPES["vit"]}:dataset=synthetic_shapes,classes=4,batch=16,warmup=0',
      '--config.model.name=vit_small_patch14_dinov2', f'--config.dataset.data_dir={data_dir}',
      '--config.total_steps=2', '--config.eval_every_steps=2', '--config.log_every_steps=1',
      '--config.eval_batch_size=16', '--config.async_checkpoints=False',
      '--config.lr.base=0.05')  # big steps: logits far from the zero head's uniform ones
  with c.unlocked():
    c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=37)
  workdir = tmp_path / 'w'
  result = train.train_and_evaluate(c, str(workdir))
  saved = json.loads((workdir / 'config.json').read_text())
  saved = saved.get('config', saved)
  assert 'inception_crop(518)' in saved['pp_train']
  assert 'central_crop(518)|normalize_preset("imagenet")' in saved['pp_eval']

  ds = tfds.builder('synthetic_shapes', data_dir=data_dir).as_dataset(split='test',
                                                                      shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  images = np.stack([e['image'] for e in examples])
  labels = np.array([e['label'] for e in examples])
  probs = imgcls.load(workdir).probabilities(images)
  loss = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
  assert abs(loss - np.log(4)) > 1e-2 and probs.std(axis=0).max() > 1e-3  # the pp matters
  np.testing.assert_allclose(loss, result['eval_loss'], rtol=1e-4)
