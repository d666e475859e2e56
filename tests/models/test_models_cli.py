"""`imgcls models`: every registered name with its family, parameter count, resolution and
weight formats; the counts are jax.eval_shape's, and each listed name builds by its name."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

import imgcls
from imgcls import cli, main, models
from imgcls.models.registry import MODELS

from helpers import count_params, shapes

# The names issue 28 lists, with (family, resolution, normalize preset, formats).
ISSUE_NAMES = {
    'vit_small_patch14_dinov2': ('vit', 518, 'imagenet'),
    'vit_base_patch14_reg4_dinov2': ('vit', 518, 'imagenet'),
    'vit_giant_patch14_dinov2': ('vit', 518, 'imagenet'),
    'vit_base_patch16_siglip_224': ('vit', 224, 'siglip'),
    'vit_base_patch16_siglip_gap_224': ('vit', 224, 'siglip'),
    'vit_base_patch16_clip_224': ('vit', 224, 'clip'),
    'vit_base_patch16_clip_quickgelu_224': ('vit', 224, 'clip'),
    'convnext_tiny': ('convnext', 224, 'imagenet'),
    'convnextv2_tiny': ('convnext', 224, 'imagenet'),
}
FORMATS = {'vit': ['vit_npz', 'timm_vit'], 'convnext': ['timm_convnext']}


def _listing(capsys, pattern='*', fmt='table') -> str:
  main._list_models(pattern, fmt)  # pylint: disable=protected-access
  return capsys.readouterr().out


@pytest.mark.parametrize('name', sorted(ISSUE_NAMES))
def test_issue_names_are_listed_and_build_by_name(name):
  """Family, resolution, normalisation and formats from the registry; the parameter count the
  listing gives equals a full jax.eval_shape of imgcls.get_model(name, num_classes=N)."""
  family, resolution, normalize = ISSUE_NAMES[name]
  [row] = models.list_model_info(name)
  assert row == {'name': name, 'family': family, 'params': models.param_count(name),
                 'resolution': resolution, 'normalize': normalize, 'formats': FORMATS[family]}
  variables, logits = shapes(imgcls.get_model(name, num_classes=7),
                             (1, resolution, resolution, 3))
  assert logits.shape == (1, 7)
  assert count_params(variables['params']) == models.param_count(name, num_classes=7)
  width = variables['params']['head']['kernel'].shape[0]  # the head: width x classes, + bias
  assert row['params'] == models.param_count(name, num_classes=7) + (1000 - 7) * (width + 1)


@pytest.mark.parametrize('name', ['resnet50', 'bit_r50x1', 'vit_b16', 'convnext_small'])
def test_param_count_from_a_few_blocks_equals_the_full_count(name):
  """param_count traces one or two blocks per stage; the full model gives the same number."""
  variables, _ = shapes(models.get_model(name), (1, 224, 224, 3))
  assert models.param_count(name) == count_params(variables['params'])


def test_every_registered_name_is_listed_and_constructs():
  rows = {r['name']: r for r in models.list_model_info('vit_s*') + models.list_model_info('bit*')}
  assert set(rows) == {n for n in MODELS.names() if n.startswith(('vit_s', 'bit'))}
  assert rows['bit']['params'] is None  # generic: its sizes come from the config
  assert rows['vit_s16']['params'] == 22_050_664  # timm's vit_small_patch16_224
  for name in MODELS.names():  # construction only: the fields say what the model would be
    info = MODELS.info(name)
    if not info.get('generic'):
      assert imgcls.get_model(name, num_classes=3).num_classes == 3, name


def test_table_is_aligned_and_csv_and_json_say_the_same(capsys):
  table = _listing(capsys, '*dinov2*').splitlines()
  header, rows = table[0].split(), [line.split() for line in table[1:]]
  assert header == list(main.MODEL_COLUMNS)
  names = [r[0] for r in rows]
  assert names == sorted(n for n in MODELS.names() if 'dinov2' in n)
  for column in ('family', 'normalize', 'formats'):  # left-aligned: each starts where its name
    start = table[0].index(column)
    assert all(line[start - 1] == ' ' != line[start] for line in table[1:]), column
  params_end = table[0].index('params') + len('params')  # right-aligned
  assert all(line[params_end - 1].isdigit() and line[params_end] == ' ' for line in table[1:])
  small = dict(zip(header, rows[names.index('vit_small_patch14_dinov2')]))
  assert small['params'] == f'{models.param_count("vit_small_patch14_dinov2"):,}'
  assert small['normalize'] == 'imagenet' and small['resolution'] == '518'

  data = json.loads(_listing(capsys, '*dinov2*', 'json'))
  assert [d['name'] for d in data] == names
  assert all(d['formats'] == FORMATS['vit'] and isinstance(d['params'], int) for d in data)
  records = list(csv.DictReader(io.StringIO(_listing(capsys, '*dinov2*', 'csv'))))
  assert [int(r['params']) for r in records] == [d['params'] for d in data]
  assert records[0]['formats'] == 'vit_npz timm_vit'


def test_bad_filter_and_format_are_refused_in_one_line(capsys):
  for pattern, fmt, message in (('nothing*', 'table', 'no model name matches'),
                                ('*', 'xml', 'table, csv or json')):
    with pytest.raises(SystemExit) as e:
      main._list_models(pattern, fmt)  # pylint: disable=protected-access
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_filters_prints_json_and_loads_no_tensorflow():
  """The command as typed: `imgcls models --filter='convnext*tiny' --format=json`; listing
  needs JAX (eval_shape) but not TensorFlow, so it starts fast."""
  code = ('import sys, atexit\n'
          'atexit.register(lambda: print("TF", "tensorflow" in sys.modules, file=sys.stderr))\n'
          'from imgcls import main\n'
          "sys.argv = ['imgcls', 'models', '--filter=convnext*tiny', '--format=json']\n"
          'main.run()\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [d['name'] for d in json.loads(proc.stdout)] == ['convnext_tiny', 'convnextv2_tiny']
  assert 'TF False' in proc.stderr
  assert 'models' in cli.overview() and '--filter' in cli.command_help('models')
