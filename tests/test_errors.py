"""Bad input: one clear message, a non-zero exit, and the workdir left as it was."""

import os
import subprocess
import sys

import pytest

from imgcls import checkpoints, config as config_lib, data, train


def _listing(path):
  return sorted(os.listdir(path)) if os.path.exists(path) else None


def _fails(config, workdir, error, match):
  before = _listing(workdir)
  with pytest.raises(error, match=match):
    train.train_and_evaluate(config, workdir)
  assert _listing(workdir) == before


def test_misspelled_key_in_config_file(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir)
  c.optimiser = {'name': 'sgd'}
  _fails(c, str(tmp_path / 'w'), config_lib.ConfigError, "unknown key 'optimiser'.*optimizer")


def test_wrong_type_and_bad_value(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir)
  c.lr.schedule = 'cosine_typo'
  _fails(c, str(tmp_path / 'w'), config_lib.ConfigError, 'lr.schedule must be')


def test_unknown_model_and_model_argument(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir)
  c.model.name = 'resnet19'
  _fails(c, str(tmp_path / 'w'), config_lib.ConfigError, "unknown model.name 'resnet19'")
  c = tiny_config(data_dir)
  c.model.widht = 4
  _fails(c, str(tmp_path / 'w'), config_lib.ConfigError, "model.widht.*width")


def test_unknown_dataset(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir)
  c.dataset.name = 'fashon_mnist'
  _fails(c, str(tmp_path / 'w'), data.DataError, 'fashion_mnist')


def test_unprepared_dataset_without_download_fails_fast(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir)
  c.dataset.name = 'mnist'
  c.dataset.data_dir = str(tmp_path / 'empty')
  c.dataset.prepare = False
  _fails(c, str(tmp_path / 'w'), data.DataError, 'not prepared')


def test_batch_not_dividing_over_devices(data_dir, tiny_config, tmp_path):
  c = tiny_config(data_dir)
  c.batch_size = 20
  _fails(c, str(tmp_path / 'w'), config_lib.ConfigError, 'batch_size=20 does not divide')


def test_workdir_of_another_model(data_dir, tiny_config, tmp_path):
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(tiny_config(data_dir, total_steps=2, eval_every_steps=2), workdir)
  c = tiny_config(data_dir, total_steps=2, eval_every_steps=2)
  c.model.width = 16
  _fails(c, workdir, checkpoints.CheckpointError, 'holds checkpoints of model')
  with_ema = tiny_config(data_dir, total_steps=2, eval_every_steps=2, ema_decay=0.99)
  _fails(with_ema, workdir, checkpoints.CheckpointError, 'without an EMA')


def test_cli_reports_bad_override_and_exits_nonzero(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, '-m', 'imgcls.main', 'train', f'--config={root}/configs/default.py',
       f'--workdir={workdir}', '--config.optimizer.nme=adamw'],
      capture_output=True, text=True, timeout=300, cwd=root)
  assert proc.returncode != 0
  assert 'nme' in proc.stderr
  assert not workdir.exists()


def _cli(*args, cwd):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'imgcls.main', *args], capture_output=True,
                        text=True, timeout=300, cwd=cwd, env=env)


def test_cli_prepare_takes_the_training_configs_dataset_overrides(tmp_path):
  """`imgcls prepare --config=...` prepares the dataset a training config names, with the
  same --config.dataset.* overrides as `imgcls train` (here skip_corrupt, which the corrupt
  file's error recommends)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  images = tmp_path / 'images'
  for c in ('cat', 'dog'):
    (images / c).mkdir(parents=True)
    for i in range(10):
      Image.new('RGB', (8, 8), (i * 20, 0, 0)).save(images / c / f'{i}.png')
  (images / 'dog' / 'broken.png').write_bytes(b'not a png')
  config = f'--config={root}/configs/image_folder.py:root={images},classes=2'
  data_dir = f'--data_dir={tmp_path / "tfds"}'
  refused = _cli('prepare', config, data_dir, cwd=root)
  assert refused.returncode != 0
  assert 'broken.png' in refused.stderr and 'skip_corrupt=True' in refused.stderr
  done = _cli('prepare', config, data_dir, '--config.dataset.skip_corrupt=True', cwd=root)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'folder:{images} is prepared in {tmp_path / "tfds"}' in done.stdout
  bad_step = _cli('eval', f'--workdir={tmp_path}', '--step=abc', cwd=root)
  assert bad_step.returncode != 0
  assert "the step must be 'best', 'latest' or a step number, got 'abc'" in bad_step.stderr
  assert 'Traceback' not in bad_step.stderr
