"""uv.lock resolves every extra (cuda12, cuda13, tpu, export) for Linux x86-64 at the pinned
JAX, offline: the README's `uv sync --extra ...` commands cannot rot unnoticed."""

import os
import pathlib
import shutil
import subprocess
import tomllib

from packaging.markers import Marker
from packaging.utils import parse_wheel_filename
import pytest

ROOT = pathlib.Path(__file__).parents[1]
LOCK = tomllib.loads((ROOT / 'uv.lock').read_text())
PROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
PACKAGES: dict[str, list[dict]] = {}
for _p in LOCK['package']:
  PACKAGES.setdefault(_p['name'], []).append(_p)


def _env(python: str) -> dict[str, str]:
  return {'sys_platform': 'linux', 'platform_system': 'Linux', 'os_name': 'posix',
          'platform_machine': 'x86_64', 'python_version': python,
          'python_full_version': f'{python}.0', 'implementation_name': 'cpython',
          'platform_python_implementation': 'CPython', 'extra': ''}


def _package(dep: dict, env: dict[str, str]) -> dict:
  """The locked package a dependency entry names (forked resolutions: the one whose
  resolution markers hold in env)."""
  options = [p for p in PACKAGES[dep['name']]
             if 'version' not in dep or p.get('version') == dep['version']]
  if len(options) > 1:
    options = [p for p in options if any(
        Marker(m).evaluate(env) for m in p.get('resolution-markers', ['python_version > "0"']))]
  assert len(options) == 1, (dep, [p.get('version') for p in options])
  return options[0]


def _closure(extra: str, python: str) -> dict[str, dict]:
  """Every locked package `pip install imgcls[extra]` pulls on Linux x86-64 / CPython."""
  env = _env(python)
  seen: dict[str, dict] = {}
  todo = [({'name': 'imgcls'}, (extra,))]
  while todo:
    dep, extras = todo.pop()
    pkg = _package(dep, env)
    key = f'{pkg["name"]}=={pkg.get("version")}'
    new = key not in seen
    seen.setdefault(key, pkg)
    deps = list(pkg.get('dependencies', [])) if new else []
    for e in extras:
      deps += pkg.get('optional-dependencies', {}).get(e, [])
    for d in deps:
      if 'marker' in d and not Marker(d['marker']).evaluate(env):
        continue
      todo.append((d, tuple(d.get('extra', ()))))
  return seen


def _installable(pkg: dict, python: str) -> bool:
  """A wheel for CPython `python` on manylinux x86-64 (or a pure one), or the project itself."""
  if 'editable' in pkg.get('source', {}) or 'virtual' in pkg.get('source', {}):
    return True
  cp = 'cp' + python.replace('.', '')
  for wheel in pkg.get('wheels', []):
    _, _, _, tags = parse_wheel_filename(wheel['url'].rsplit('/', 1)[1])
    for t in tags:
      if (t.platform == 'any' or ('linux' in t.platform and t.platform.endswith('x86_64'))) \
          and (t.interpreter in (cp, 'py3') or t.abi == 'abi3'):
        return True
  return 'sdist' in pkg


@pytest.mark.parametrize('python', ['3.12', '3.13'])
@pytest.mark.parametrize('extra', ['cuda12', 'cuda13', 'tpu', 'export'])
def test_every_extra_resolves_to_linux_x86_64_wheels(extra, python):
  assert extra in PROJECT['optional-dependencies']
  packages = _closure(extra, python)
  missing = sorted(k for k, p in packages.items() if not _installable(p, python))
  assert not missing, f'no Linux x86-64 wheel for CPython {python} in uv.lock: {missing}'
  names = {p['name']: p.get('version') for p in packages.values()}
  jax = PACKAGES['jax'][0]['version']
  assert names['jax'] == names['jaxlib'] == jax == '0.12.0.1'
  if extra.startswith('cuda'):  # JAX's CUDA plugin at the pinned JAX, with NVIDIA's libraries
    assert names[f'jax-{extra}-plugin'] == names[f'jax-{extra}-pjrt'] == jax
    assert any(n.startswith('nvidia-cudnn') for n in names)
  if extra == 'tpu':
    assert 'libtpu' in names


def test_uv_lock_check_offline():
  """uv itself agrees the lock matches pyproject.toml, without the network."""
  uv = shutil.which('uv') or shutil.which('uv', path=os.path.expanduser('~/.local/bin'))
  if uv is None:
    pytest.skip('uv is not installed')
  r = subprocess.run([uv, 'lock', '--check', '--offline'], cwd=ROOT, capture_output=True,
                     text=True, timeout=120, env=dict(os.environ, UV_OFFLINE='1'))
  assert r.returncode == 0, r.stderr
