"""The README's commands, paths and links are real: every `uv run imgcls ...` names a command
and flags that command takes, its config loads and validates (no training), every script,
config, doc and image it names exists, and the code map matches the tree."""

import importlib
import pathlib
import re
import shlex
import sys
import tomllib

from absl import flags
from ml_collections import config_flags
import pytest

from imgcls import config as config_lib
from imgcls import main

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / 'README.md').read_text()
DOCS = sorted((ROOT / 'docs').glob('*.md'))
EXTRAS = set(tomllib.loads((ROOT / 'pyproject.toml').read_text())
             ['project']['optional-dependencies'])
ABSL_FLAGS = {'verbosity', 'v', 'help', 'helpshort', 'helpfull', 'logtostderr'}
UV_OPTIONS_WITH_VALUE = {'--extra', '--with', '--group', '--python'}
OTHER_PROGRAMS = {'pytest', 'tensorboard'}  # installed by `uv sync`; nothing to check


def _blocks(text: str, lang: str) -> list[str]:
  return re.findall(rf'```{lang}\n(.*?)```', text, re.S)


def _commands(text: str) -> list[list[str]]:
  """Every command of the bash blocks: continuation lines joined, comments dropped, `&&`
  chains split, leading `VAR=value` assignments and `srun` dropped."""
  out = []
  for block in _blocks(text, 'bash'):
    for line in block.replace('\\\n', ' ').splitlines():
      words = shlex.split(line, comments=True)
      while words:
        cut = words.index('&&') if '&&' in words else len(words)
        cmd, words = words[:cut], words[cut + 1:]
        while cmd and (re.match(r'^[A-Z_]+=', cmd[0]) or cmd[0] in ('srun', 'sudo')):
          cmd = cmd[1:]
        if cmd:
          out.append(cmd)
  return out


def _uv_run(cmd: list[str]) -> list[str] | None:
  """The program and arguments of `uv run [uv options] PROGRAM ...`, or None."""
  if cmd[:2] != ['uv', 'run']:
    return None
  rest = cmd[2:]
  while rest and rest[0].startswith('--'):
    rest = rest[2:] if rest[0] in UV_OPTIONS_WITH_VALUE else rest[1:]
  return rest


COMMANDS = _commands(README)
IMGCLS = [r[1:] for r in map(_uv_run, COMMANDS) if r and r[0] == 'imgcls']


def _flag_name(arg: str) -> str:
  name = arg[2:].split('=', 1)[0]
  return 'config' if name.startswith('config.') else name


def _script_flags(path: pathlib.Path) -> set[str]:
  """The flags a script defines (absl, ml_collections' config flag, or argparse), read from
  its source without running it."""
  text = path.read_text()
  return set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", text)) | \
      set(re.findall(r"add_argument\(\s*'--(\w+)'", text)) | {'help'}


def test_readme_is_short():
  n = len(README.splitlines())
  assert n <= 400, f'README.md has {n} lines; move detail to docs/ (at most 400)'


def test_the_two_commands_are_kept():
  assert 'pip install uv && uv run imgcls train --config=configs/default.py ' \
         '--workdir=workdirs/default' in README
  assert 'pip install uv && uv run pytest' in README
  # CI runs the README's test command, word for word.
  ci = [l for l in (ROOT / '.ci' / 'run').read_text().splitlines() if 'uv run pytest' in l]
  assert len(ci) == 1 and f'```bash\n{ci[0]}\n```' in README, ci


def test_every_command_is_one_we_check():
  assert len(IMGCLS) >= 20, IMGCLS
  for cmd in COMMANDS:
    if cmd[:2] == ['uv', 'sync']:
      extras = [cmd[i + 1] for i, a in enumerate(cmd) if a == '--extra']
      assert set(extras) <= EXTRAS, cmd
      continue
    for i, arg in enumerate(cmd):  # `uv run --extra X` names a declared extra
      if arg == '--extra' and cmd[0] == 'uv':
        assert cmd[i + 1] in EXTRAS, cmd
    run = _uv_run(cmd)
    if run is None:  # installing uv itself: pip, python3 -m venv, export PATH, pipx
      assert cmd[0] in ('pip', 'pipx', 'python3', 'export', 'apt-get') \
          or cmd[0].endswith('/pip'), f'a README command nothing checks: {shlex.join(cmd)}'
    elif run[0] == 'python':
      if run[1] != '-c':
        assert (ROOT / run[1]).is_file(), f'README runs a missing script: {shlex.join(cmd)}'
        takes = _script_flags(ROOT / run[1])
        for arg in run[2:]:
          if arg.startswith('--'):
            assert _flag_name(arg) in takes, f'{run[1]} takes no {arg.split("=")[0]}'
    elif run[0] == 'jupyter':
      assert (ROOT / run[-1]).is_file(), cmd
    else:
      assert run[0] in OTHER_PROGRAMS | {'imgcls'}, f'unchecked command: {shlex.join(cmd)}'


def _command_flags() -> dict[str, frozenset[str]]:
  if not isinstance(main.COMMANDS, dict):
    pytest.skip('imgcls.main.COMMANDS is not yet the {name: Command} of the per-command CLI')
  return {name: frozenset(c.flags) for name, c in main.COMMANDS.items()}


@pytest.mark.parametrize('cmd', IMGCLS, ids=lambda c: shlex.join(c)[:60])
def test_imgcls_command_and_flags_exist(cmd):
  names = list(main.COMMANDS)
  assert cmd and cmd[0] in names, f'`imgcls {cmd[:1]}`: not one of {names}'
  takes = _command_flags()[cmd[0]]
  for arg in cmd[1:]:
    if arg.startswith('--'):
      name = _flag_name(arg)
      assert name in takes | ABSL_FLAGS, \
          f'`imgcls {cmd[0]}` takes no --{name} (it takes {sorted(takes)})'


def _load_config(args: list[str]):
  """The config `imgcls` would run with, loaded and validated as main.py does it:
  ml_collections' --config flag with its overrides, then the open model arguments."""
  argv = ['imgcls'] + [a for a in args if a.startswith('--config')]
  argv, model_args = config_lib.split_model_overrides(argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv,
                                  lock_config=True)
  values(argv)
  config = values.config
  config_lib.apply_model_overrides(config, model_args)
  return config_lib.validate(config)


WITH_CONFIG = [c for c in IMGCLS if any(a.startswith('--config=') for a in c)]


@pytest.mark.parametrize('cmd', WITH_CONFIG, ids=lambda c: shlex.join(c)[:80])
def test_config_and_overrides_load_and_validate(cmd, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['imgcls'])
  config = _load_config(cmd[1:])
  assert config.dataset.name


def _paths(text: str) -> set[str]:
  """Repository paths a text names: links, images and `configs/...`, `docs/...`,
  `scripts/...`, `notebooks/...` mentions (config arguments after ':' dropped)."""
  found = set(re.findall(r'\]\(([^)\s#]+)', text))
  found = {p for p in found if '://' not in p}
  found |= set(re.findall(r'\b((?:configs|docs|scripts|notebooks)/[\w./-]+\.(?:py|md|png|ipynb))',
                          text))
  return {p for p in found if not re.search(r'/[A-Z]+\.', p)}  # configs/NAME.py: a pattern


def test_paths_and_links_in_the_readme_exist():
  missing = sorted(p for p in _paths(README) if not (ROOT / p).exists())
  assert not missing, f'README names missing files: {missing}'
  assert {'docs/results.md', 'docs/speed.md', 'docs/reliability.md', 'docs/deploy.md'} \
      <= _paths(README)


def _anchor(heading: str) -> str:
  """GitHub's anchor for a heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_links_to_doc_sections_exist():
  for page, anchor in re.findall(r'\]\((docs/[\w.]+\.md)#([\w-]+)\)', README):
    headings = re.findall(r'^#+ (.*)$', (ROOT / page).read_text(), re.M)
    assert anchor in {_anchor(h) for h in headings}, f'{page} has no section #{anchor}'


@pytest.mark.parametrize('page', DOCS, ids=lambda p: p.name)
def test_docs_pages_link_to_files_that_exist(page):
  text = page.read_text()
  links = {p for p in re.findall(r'\]\(([^)\s#]+)', text) if '://' not in p}
  missing = sorted(p for p in links if not (page.parent / p).exists())
  assert not missing, f'{page.name} links to missing files: {missing}'
  assert text.count('```') % 2 == 0, f'{page.name}: a code block is not closed'


def test_every_png_in_docs_is_referenced():
  text = README + ''.join(p.read_text() for p in DOCS)
  unused = [p.name for p in (ROOT / 'docs').glob('*.png') if p.name not in text]
  assert not unused, f'docs/ images nothing shows: {unused}'


def test_python_names_in_the_readme_exist():
  for dotted in sorted(set(re.findall(r'\bimgcls\.([a-z_][\w.]*)\(', README))):
    obj, parts = importlib.import_module('imgcls'), dotted.split('.')
    for i, part in enumerate(parts):
      if not hasattr(obj, part):
        obj = importlib.import_module('imgcls.' + '.'.join(parts[:i + 1]))
      else:
        obj = getattr(obj, part)
    assert callable(obj), dotted


def _code_map() -> list[str]:
  """Every path the code map names: its first column, and each file a folder's row names."""
  block = README.split('## Code map', 1)[1]
  block = _blocks(block, '')[0]
  paths, folder = [], None
  for line in block.splitlines():
    if not line.strip():
      continue
    if not line.startswith(' '):
      first, _, line = line.partition(' ')
      paths.append(first)
      folder = first if first.endswith('/') else None
    if folder:
      for name in re.findall(r'(?<![\w/.])([\w*]+\.(?:py|ipynb))\b', line):
        paths.append(folder + name)
  return paths


def test_code_map_matches_the_tree():
  paths = _code_map()
  assert 'imgcls/train.py' in paths and 'imgcls/models/resnet.py' in paths, paths
  missing = [p for p in paths if not list(ROOT.glob(p))]
  assert not missing, f'the README code map names paths the tree lacks: {missing}'
  listed = {p for p in paths if p.startswith('imgcls/') and p.count('/') == 1}
  unlisted = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'imgcls').glob('*.py')
                    if p.name != '__init__.py' and str(p.relative_to(ROOT)) not in listed)
  assert not unlisted, f'modules missing from the README code map: {unlisted}'
