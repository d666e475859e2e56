"""model.dtype='auto': validated as a name, resolved by imgcls.models.from_config alone (bfloat16
where this machine computes it natively, else float32); the config keeps 'auto', so a run
resumes and its checkpoints load on another kind of machine."""

import numpy as np
import pytest

import imgcls
from imgcls import checkpoints, config as config_lib, hardware, models, train


def _auto(config):
  with config.unlocked(), config.model.ignore_type():
    config.model.dtype = 'auto'
  return config


@pytest.fixture
def native(monkeypatch):
  """native(True | False): the CPU does (not) compute bfloat16 itself, as auto_dtype sees it."""
  return lambda on: monkeypatch.setattr(hardware, 'native_bf16', lambda: on)


def test_validation_accepts_auto_and_still_refuses_a_bad_dtype(data_dir, tiny_config):
  config_lib.validate(_auto(tiny_config(data_dir)))
  bad = tiny_config(data_dir)
  with bad.unlocked(), bad.model.ignore_type():
    bad.model.dtype = 'bfloat17'
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.dtype must be a dtype name such as 'float32' or 'bfloat16', "
                           r"or 'auto' .*got 'bfloat17'"):
    config_lib.validate(bad)
  vit = tiny_config(data_dir)
  with vit.unlocked(), vit.model.ignore_type():
    vit.model = {'name': 'vit', 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32,
                 'patch_size': 4, 'param_dtype': 'auto'}
  with pytest.raises(config_lib.ConfigError, match=r"model.param_dtype must be .*'auto' is for "
                                                   r"model.dtype only"):
    config_lib.validate(vit)


def test_from_config_resolves_auto_by_the_cpu(data_dir, tiny_config, native, caplog,
                                               monkeypatch):
  config = _auto(tiny_config(data_dir))
  native(False)
  # auto_dtype logs each choice once per process: on a CPU without native bf16 an earlier
  # test in this worker may have logged this very message (seen in CI on AMD EPYC).
  monkeypatch.setattr(models, '_LOGGED_AUTO', set())
  with caplog.at_level('INFO'):
    assert models.from_config(config).dtype == 'float32'
  assert "model.dtype='auto' -> float32 (CPU without native bf16" in caplog.text
  native(True)
  assert models.from_config(config).dtype == 'bfloat16'
  assert models.from_config(config, dtype='float32').dtype == 'float32'  # an override wins
  assert hardware.auto_dtype('gpu') == hardware.auto_dtype('tpu') == 'bfloat16'
  assert config.model.dtype == 'auto'  # resolved in the model only


def test_an_auto_run_resumes_and_loads_on_another_kind_of_machine(data_dir, tiny_config,
                                                                  native, tmp_path):
  """Trained where auto means float32; its checkpoint keeps 'auto' and loads, predicts and
  resumes (not refused as a config change) where auto means bfloat16."""
  workdir = str(tmp_path / 'run')
  config = _auto(tiny_config(data_dir, total_steps=4, eval_every_steps=0))
  native(False)
  train.train_and_evaluate(config, workdir)
  ckpt = checkpoints.find(workdir, 'best')
  assert ckpt.step == 4 and ckpt.config['model']['dtype'] == 'auto'

  native(True)
  clf = imgcls.load(workdir)
  assert clf.model.dtype == 'bfloat16' and clf.step == 4
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
  probs = clf.probabilities(images)
  assert probs.shape == (3, 4) and np.allclose(probs.sum(-1), 1, atol=1e-2)
  again = train.train_and_evaluate(config, workdir)  # the finished run, scored again in bf16
  assert 0.0 <= again['top1'] <= 1.0 and checkpoints.find(workdir, 'latest').step == 4
  assert not (tmp_path / 'run' / 'config_changes.jsonl').exists()  # no change to record
