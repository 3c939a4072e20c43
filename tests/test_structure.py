"""The codebase's shape: small modules, one file per method, public layers."""

import ast
import glob
import os
import re

import pytest

from kd_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = sorted(glob.glob(os.path.join(ROOT, 'kd_jax', '**', '*.py'),
                           recursive=True))
MAX_LINES = 500


def _relative(path):
  return os.path.relpath(path, ROOT)


@pytest.mark.parametrize('path', LIBRARY, ids=_relative)
def test_no_library_module_is_over_500_lines(path):
  with open(path) as f:
    assert len(f.readlines()) <= MAX_LINES


@pytest.mark.parametrize('name', sorted(methods.RECORDS))
def test_a_method_name_is_quoted_in_its_module_and_the_registry_only(name):
  quoted = re.compile(rf"""['"]{name}['"]""")
  holders = []
  for path in LIBRARY:
    with open(path) as f:
      if quoted.search(f.read()):
        holders.append(_relative(path))
  assert len(holders) <= 2, holders


@pytest.mark.parametrize('path', LIBRARY, ids=_relative)
def test_no_private_name_of_another_library_module_is_used(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  imported = {alias.asname or alias.name for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)
              and (node.module or '').startswith('kd_jax')
              for alias in node.names}
  private = sorted(
      f'{node.value.id}.{node.attr}' for node in ast.walk(tree)
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
      and node.value.id in imported and node.attr.startswith('_'))
  assert not private


def test_every_method_has_a_config_and_a_readme_row():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for name, record in methods.METHODS.items():
    config = 'seed' if name == 'kd' else name
    assert os.path.exists(os.path.join(ROOT, 'experiments', f'{config}.py'))
    assert f'| `{name}` | {record.reference} |' in readme, name


def test_the_readme_example_is_the_shipped_method_and_its_tests():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for path in ('kd_jax/methods/logit_l2.py', 'tests/test_logit_l2.py'):
    with open(os.path.join(ROOT, path)) as f:
      assert f'```python\n# {path}\n{f.read()}```' in readme, path
