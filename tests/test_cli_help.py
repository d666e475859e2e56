"""The CLI explains itself: `imgcls --help`, bare `imgcls` and `imgcls COMMAND --help` for
every command, and a flag given to the wrong command refused in one line."""

import os
import subprocess
import sys

import pytest

from imgcls import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imgcls(*args):
  return subprocess.run([sys.executable, '-m', 'imgcls.main', *args], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize('args', [(), ('--help',)])
def test_overview_lists_every_command(args):
  proc = _imgcls(*args)
  assert proc.returncode == 0, proc.stderr
  for name, command in main.COMMANDS.items():
    assert f'  {name}' in proc.stdout and command.summary in proc.stdout


@pytest.mark.parametrize('name', sorted(main.COMMANDS))
def test_command_help_shows_its_own_flags_and_an_example(name):
  proc = _imgcls(name, '--help')
  assert proc.returncode == 0, proc.stderr
  shown = {l.split(':')[0].strip()[2:] for l in proc.stdout.splitlines()
           if l.startswith('  --')}
  own = set(main.COMMANDS[name].flags)
  assert own <= shown and not shown - own - {'config.KEY=VALUE'}, (shown, own)
  assert main.COMMANDS[name].example in proc.stdout


def test_command_table_examples_use_only_their_flags():
  for name, command in main.COMMANDS.items():
    assert command.example.split()[:2] == ['imgcls', name]
    given = {a[2:].split('=')[0].split('.')[0] for a in command.example.split()
             if a.startswith('--')}
    assert given <= command.flags, (name, given - command.flags)


def test_a_flag_of_another_command_is_refused_in_one_line():
  proc = _imgcls('train', '--config=configs/default.py', '--workdir=/nonexistent/w',
                 '--out=x.csv')
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
      'imgcls: error: --out is a flag of `imgcls compare`, `imgcls predict`, `imgcls explain`, '
      '`imgcls export`, not of `imgcls train`. See `imgcls train --help`.')
  proc = _imgcls('compare', '/tmp', '--step=best')
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
  assert '--step is a flag of `imgcls eval`' in proc.stderr
  assert 'not of `imgcls compare`' in proc.stderr


def test_helpfull_still_lists_every_flag():
  proc = _imgcls('--helpfull')
  assert proc.returncode in (0, 1)
  for flag in ('--top_k', '--[no]allow_config_change', '--format', '--shots'):
    assert flag in proc.stdout + proc.stderr
