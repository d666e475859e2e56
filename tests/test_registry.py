"""imgcls.registry.Registry: names known before their modules load (declare, modules=), each
module imported only when a lookup needs it, and declarations checked against registrations."""

import sys
import textwrap

import pytest

from imgcls.registry import Registry, UnknownName

REG = Registry('thing')  # the test modules below register into this one


@pytest.fixture()
def modules(tmp_path, monkeypatch):
  """Writes importable modules `name -> body` (each registering into REG) under tmp_path."""
  monkeypatch.syspath_prepend(str(tmp_path))
  written = []

  def write(**bodies):
    for name, body in bodies.items():
      (tmp_path / f'{name}.py').write_text(
          'from test_registry import REG\n' + textwrap.dedent(body))
      written.append(name)
  yield write
  for name in written:
    sys.modules.pop(name, None)
  REG.__init__('thing')


def test_declared_name_is_known_and_loads_on_get(modules):
  modules(reg_a="REG.register('a', 'A', flag=True)\n")
  REG.declare('a', 'reg_a', flag=True)
  assert 'a' in REG and REG.names(flag=True) == ['a'] and REG.info('a') == {'flag': True}
  assert 'reg_a' not in sys.modules  # names and info need no import
  assert REG.get('a') == 'A' and 'reg_a' in sys.modules
  assert REG.items() == [('a', 'A')]


def test_declaration_must_match_the_registration(modules):
  modules(reg_b="REG.register('b', 'B', flag=False)\n", reg_c="x = 1\n")
  REG.declare('b', 'reg_b', flag=True)
  with pytest.raises(ValueError, match='declared with'):
    REG.get('b')
  REG.declare('c', 'reg_c')
  with pytest.raises(ValueError, match='does not register'):
    REG.get('c')


def test_modules_load_in_turn_until_a_name_is_found(modules):
  modules(reg_one="REG.register('one', 1)\n", reg_two="REG.register('two', 2)\n")
  REG.__init__('thing', modules=('reg_one', 'reg_two'))
  assert REG.get('one') == 1
  assert 'reg_one' in sys.modules and 'reg_two' not in sys.modules
  assert REG.names() == ['one', 'two'] and 'reg_two' in sys.modules  # a listing loads all


def test_unknown_name_lists_close_matches_after_loading_everything(modules):
  modules(reg_three="REG.register('three', 3)\n")
  REG.__init__('thing', modules=('reg_three',))
  with pytest.raises(UnknownName, match="Did you mean three.*Known things: three"):
    REG.get('thre')


def test_a_failed_import_stays_pending(modules):
  modules(reg_bad="raise RuntimeError('broken')\n")
  REG.__init__('thing', modules=('reg_bad',))
  for _ in range(2):  # not silently dropped: the second lookup fails the same way
    with pytest.raises(RuntimeError, match='broken'):
      REG.get('x')
