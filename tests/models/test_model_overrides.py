"""--config.model.ARG=VALUE for any argument of the configured model, in the file or not."""

import os
import subprocess
import sys

import pytest

from imgcls import config as config_lib, models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(ROOT, 'configs', 'default.py')


def _parse(*args):
  argv = ['imgcls', 'train', f'--config={DEFAULT}:epochs=1', '--workdir=/tmp/w', *args]
  rest, extra = config_lib.split_model_overrides(argv)
  config = config_lib._load_config_file(f'{DEFAULT}:epochs=1')  # what absl would load
  config_lib.apply_model_overrides(config, extra)
  return rest, extra, config


def test_arguments_the_file_lacks_are_split_out_and_added():
  rest, extra, config = _parse('--config.model.dtype=bfloat16', '--config.model.width=32',
                               '--config.model.zero_init_residual', 'false',
                               '--config.lr.base=0.2')
  # width is in the file: ml_collections keeps handling it; the others are added here.
  assert extra == {'dtype': 'bfloat16', 'zero_init_residual': 'false'}
  assert '--config.model.width=32' in rest and '--config.lr.base=0.2' in rest
  assert config.model.dtype == 'bfloat16' and config.model.zero_init_residual is False
  config_lib.validate(config)
  assert models.from_config(config).dtype == 'bfloat16'


def test_no_config_or_no_model_override_leaves_argv_alone():
  argv = ['imgcls', 'train', '--config.model.dtype=bfloat16']
  assert config_lib.split_model_overrides(argv) == (argv, {})
  argv = ['imgcls', 'train', f'--config={DEFAULT}', '--config.lr.base=0.2']
  assert config_lib.split_model_overrides(argv) == (argv, {})


@pytest.mark.parametrize('arg,message', [
    ('dtyp=bfloat16', "unknown key 'model.dtyp' for model 'resnet18'. Did you mean 'dtype'?"),
    ('dtype=bfloat17', "model.dtype must be a dtype name such as 'float32' or 'bfloat16'"),
])
def test_bad_model_arguments_are_reported(arg, message):
  _, _, config = _parse(f'--config.model.{arg}')
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_cli_reports_a_bad_model_argument(tmp_path):
  bad = subprocess.run(
      [sys.executable, '-m', 'imgcls.main', 'train', f'--config={DEFAULT}',
       f'--workdir={tmp_path}', '--config.model.dtyp=bfloat16'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert "unknown key 'model.dtyp' for model 'resnet18'. Did you mean 'dtype'?" in bad.stderr
  assert 'Valid keys: bn_axis_name, bn_epsilon, bn_momentum, dtype' in bad.stderr
