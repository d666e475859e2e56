"""config.profile_steps: a jax.profiler trace of a few train steps after warm-up, in
WORKDIR/profile where TensorBoard's Profile tab finds it (`tensorboard --logdir WORKDIR`)."""

import gzip
import json
import pathlib

import pytest

from imgcls import config as config_lib, run_config, train


def _traces(workdir) -> list[pathlib.Path]:
  return sorted(pathlib.Path(workdir).glob('profile/plugins/profile/*/*.xplane.pb'))


@pytest.mark.parametrize('start,num_steps,steps,window', [
    (0, 100, 0, []),          # off
    (0, 100, 3, [5, 6, 7]),   # after 5 warm-up steps
    (40, 100, 2, [45, 46]),   # a resumed run warms up again
    (0, 4, 2, [2, 3]),        # a short run: fewer warm-up steps, the whole window
    (0, 2, 3, [0, 1]),        # shorter than the window: every step
    (100, 100, 3, []),        # already finished
])
def test_profile_window(start, num_steps, steps, window):
  assert list(train.profile_window(start, num_steps, steps)) == window


def test_profile_steps_is_checked_and_may_change_on_resume(data_dir, tiny_config):
  assert config_lib.defaults().profile_steps == 0
  with pytest.raises(config_lib.ConfigError, match="'profile_steps' must be >= 0, got -1"):
    config_lib.validate(tiny_config(data_dir, profile_steps=-1))
  old = tiny_config(data_dir).to_dict()
  new = tiny_config(data_dir, profile_steps=3).to_dict()
  assert run_config.config_changes(old, new) == []  # it does not change the run's math


def test_profile_traces_the_window_and_nothing_when_off(data_dir, tiny_config, tmp_path):
  """Steps 2 and 3 of a 4-step run are traced (steps 0-1 compile and warm up); the trace is
  complete when written. profile_steps=0 writes no profile folder."""
  workdir = tmp_path / 'profiled'
  config = tiny_config(data_dir, total_steps=4, eval_every_steps=0, profile_steps=2)
  train.train_and_evaluate(config, str(workdir))
  traces = _traces(workdir)
  assert len(traces) == 1 and traces[0].stat().st_size > 0, list(workdir.rglob('*'))
  chrome = list(traces[0].parent.glob('*.trace.json.gz'))  # JAX writes this beside it too
  if chrome:
    events = json.loads(gzip.decompress(chrome[0].read_bytes()))['traceEvents']
    steps = {int(e['args']['step_num']) for e in events
             if e.get('name') == 'train' and 'step_num' in e.get('args', {})}
    assert steps == {2, 3}

  plain = tmp_path / 'plain'
  train.train_and_evaluate(tiny_config(data_dir, total_steps=4, eval_every_steps=0), str(plain))
  assert not (plain / 'profile').exists()
