"""The few-shot (and ridge linear-probe) evaluator reads each backbone's own pooled features:
what `model.apply(..., return_features=True)` returns and the head reads (ConvNeXt's head-norm
output, ViT's class token / average / MAP head after fc_norm), for every family."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from imgcls import models
from imgcls.evaluators import fewshot

TINY_VIT = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
CASES = {  # name: (kwargs, the module whose output the pooled features are, or None)
    'resnet10': (dict(width=8, stem='small'), None),
    'bit': (dict(stage_sizes=(1, 1, 1, 1), width=8, num_groups=4), None),
    'convnext_atto': (TINY_CONVNEXT, 'head_norm'),
    'convnextv2_atto': (TINY_CONVNEXT, 'head_norm'),
    'vit_small_patch14_dinov2': (TINY_VIT, 'token'),  # class token, LayerScale
    'vit_base_patch14_reg4_dinov2': (TINY_VIT, 'token'),  # class token before the registers
    'vit_base_patch16_clip_224': (TINY_VIT, 'token'),  # pre-norm
    'vit_base_patch16_siglip_224': (TINY_VIT, 'MAPHead_0'),  # attention pooling
    'vit_base_patch16_siglip_gap_224': (TINY_VIT, 'gap'),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_fewshot_features_are_the_backbones_pooled_features(name):
  kwargs, source = CASES[name]
  model = models.get_model(name, num_classes=5, **kwargs)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  variables = {**variables, 'params': jax.tree.map(  # heads are zero-initialised: give weights
      lambda a: np.random.default_rng(1).normal(0, 0.1, a.shape).astype(a.dtype),
      variables['params'])}

  feats = fewshot.make_features_fn(model)(variables, x)
  (logits, expected), state = model.apply(
      variables, x, train=False, return_features=True, mutable=['intermediates'],
      capture_intermediates=lambda m, _: m.name in ('head_norm', 'MAPHead_0', 'Transformer'))
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
  head = variables['params']['head']
  np.testing.assert_allclose(feats @ head['kernel'] + head['bias'], logits, rtol=1e-4,
                             atol=1e-4)  # what the head reads
  captured = state.get('intermediates', {})
  if source in ('head_norm', 'MAPHead_0'):
    np.testing.assert_allclose(feats, captured[source]['__call__'][0], rtol=1e-5, atol=1e-5)
  elif source in ('token', 'gap'):
    tokens = np.asarray(captured['Transformer']['__call__'][0])
    prefix = model.num_prefix_tokens()
    pooled = tokens[:, 0] if source == 'token' else tokens[:, prefix:].mean(axis=1)
    if model.fc_norm:  # then the norm comes after pooling: compare through it
      pytest.skip('fc_norm variant: covered by the head check')
    np.testing.assert_allclose(feats, pooled, rtol=1e-4, atol=1e-4)
