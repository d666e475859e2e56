"""imgcls models equal timm's: logits from timm's weights, and weights back to timm's layouts.

The committed fixtures (tests/fixtures/timm/*.npz, written by scripts/timm_fixtures.py) hold a
small timm model's random weights in timm's naming, an input batch and timm's logits, so these
tests need no torch. With IMGCLS_TIMM_PYTHON pointing at a Python that has timm (see the
script's docstring), the live tests regenerate the fixtures from the installed timm and have
timm load the official-format .npz files that imgcls writes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from imgcls import models
from imgcls.models import bit, resnet, weights

FIXTURES = pathlib.Path(__file__).parents[1] / 'fixtures' / 'timm'
SCRIPT = pathlib.Path(__file__).parents[2] / 'scripts' / 'timm_fixtures.py'
TIMM_PYTHON = os.environ.get('IMGCLS_TIMM_PYTHON')
# float32 agreement is ~1e-6; 2e-5 still catches a tanh-vs-erf GELU (1e-4 to 3e-4 here).
ATOL = 2e-5

VIT = dict(num_classes=7, width=48, depth=2, mlp_dim=192, num_heads=3, patch_size=8,
           approximate_gelu=False)
CASES = {
    # fixture: (imgcls model, format of the fixture's state dict, official .npz format)
    'vit_tok': (lambda: models.get_model('vit', pool='tok', **VIT), 'timm_vit', 'vit_npz'),
    'vit_gap': (lambda: models.get_model('vit', pool='gap', **VIT), 'timm_vit', 'vit_npz'),
    'resnet_bottleneck': (lambda: resnet.ResNet(stage_sizes=(2, 1, 1, 1), block=resnet.Bottleneck,
                                                num_classes=7, width=16), 'timm_resnet', None),
    'bit': (lambda: bit.ResNetV2(stage_sizes=(1, 1, 1, 1), width=16, num_groups=8,
                                 num_classes=7), 'timm_bit', 'bit_npz'),
}


def _fixture(name: str, directory: pathlib.Path = FIXTURES):
  with np.load(directory / f'{name}.npz') as f:
    sd = {k.removeprefix('sd/'): f[k] for k in f.files if k.startswith('sd/')}
    return sd, f['input'], f['logits'], json.loads(str(f['config']))


def _from_timm(name: str, directory: pathlib.Path = FIXTURES):
  make, fmt, _ = CASES[name]
  sd, x, expected, _ = _fixture(name, directory)
  model = make()
  template = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  variables, report = weights.load_pretrained(sd, template, fmt=fmt)
  return model, variables, report, sd, x, expected


@pytest.mark.parametrize('name', sorted(CASES))
def test_timm_weights_give_timm_logits(name):
  model, variables, report, _, x, expected = _from_timm(name)
  assert report.ok() and not report.reinitialised and not report.resized
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  assert np.max(np.abs(logits - expected)) <= ATOL, np.max(np.abs(logits - expected))
  assert np.std(expected) > 0.1  # the fixture is not degenerate


@pytest.mark.parametrize('name', sorted(CASES))
def test_export_to_timm_gives_back_the_same_state_dict(name):
  _, variables, _, sd, _, _ = _from_timm(name)
  out = weights.from_imgcls(variables, CASES[name][1])
  assert set(out) == set(sd)
  for key, value in sd.items():
    np.testing.assert_allclose(out[key], value, rtol=0, atol=0, err_msg=key)


@pytest.mark.parametrize('name', [n for n, c in CASES.items() if c[2]])
def test_official_npz_round_trip(tmp_path, name):
  model, variables, _, _, x, expected = _from_timm(name)
  path = tmp_path / f'{name}.npz'
  weights.export(variables, path, CASES[name][2])
  again, report = weights.load_pretrained(path, variables)
  assert report.ok() and report.fmt == CASES[name][2]
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(again, x), apply(variables, x))
  np.testing.assert_allclose(apply(again, x), expected, atol=ATOL)


live = pytest.mark.skipif(
    not TIMM_PYTHON,
    reason='LIVE TIMM CHECK NOT RUN: set IMGCLS_TIMM_PYTHON to a Python with timm installed '
           '(setup in scripts/timm_fixtures.py); the committed fixtures are checked regardless.')


@live
def test_live_fixtures_from_installed_timm(tmp_path):
  subprocess.run([TIMM_PYTHON, str(SCRIPT), 'generate', f'--out_dir={tmp_path}'], check=True)
  for name in CASES:
    model, variables, report, _, x, expected = _from_timm(name, tmp_path)
    assert report.ok()
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, atol=ATOL, err_msg=name)


@live
@pytest.mark.parametrize('name', [n for n, c in CASES.items() if c[2]])
def test_live_timm_loads_the_npz_imgcls_writes(tmp_path, name):
  model, variables, _, _, x, _ = _from_timm(name)
  path = tmp_path / f'{name}.npz'
  weights.export(variables, path, CASES[name][2])
  np.save(tmp_path / 'logits.npy', np.asarray(jax.jit(model.apply)(variables, x)))
  mode = 'check-bit-npz' if name == 'bit' else 'check-vit-npz'
  result = subprocess.run([TIMM_PYTHON, str(SCRIPT), mode, str(path),
                           str(tmp_path / 'logits.npy'), f'--fixture={name}', f'--atol={ATOL}'],
                          capture_output=True, text=True, check=False)
  sys.stdout.write(result.stdout + result.stderr)
  assert result.returncode == 0
