"""The installable package: the wheel built from pyproject.toml holds every
module, config and dependency kd_jax needs, outside the checkout."""

import ast
import email
import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the wheel is built from: pyproject.toml's packages and README.
SOURCES = ('pyproject.toml', 'README.md', 'kd_jax', 'experiments')

# Run by the installed package, in a directory that is not the checkout.
_CHECK = r'''
import os, sys
import jax, numpy as np
import kd_jax, experiments
from experiments import seed
from kd_jax import distil_setup, models, train, validation

venv = sys.argv[1]
for module in (kd_jax, experiments):
  assert module.__file__.startswith(venv), module.__file__
config = seed.get_config('quick')
validation.validate(config)
teacher = models.make_model(config.teacher.model)
student = models.make_model(config.student.model)
teacher_variables = models.init_variables(teacher, jax.random.PRNGKey(0),
                                          (28, 28, 1))
state = train.create_train_state(student, jax.random.PRNGKey(1), (28, 28, 1))
step = jax.jit(train.make_distill_step(
    distil_setup.distiller(config, teacher.apply)))
batch = {'image': np.zeros((4, 28, 28, 1), np.float32),
         'label': np.arange(4, dtype=np.int32)}
state, metrics = step(state, batch, teacher_variables)
assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
print('installed kd_jax ran a distil step:', float(metrics['loss']))
'''


def _run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True,
                          timeout=300, check=False, **kwargs)
  assert result.returncode == 0, (command, result.stdout[-2000:],
                                  result.stderr[-3000:])
  return result


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
  """The wheel built (without network) from a copy of the package's files."""
  root = tmp_path_factory.mktemp('package')
  source = root / 'source'
  for name in SOURCES:
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, source / name, ignore=shutil.ignore_patterns(
          '__pycache__', '*.pyc'))
    else:
      source.mkdir(exist_ok=True)
      shutil.copy(path, source / name)
  _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-index',
        '--no-build-isolation', '--disable-pip-version-check', '-q', '-w',
        str(root / 'dist'), str(source)])
  (built,) = (root / 'dist').iterdir()
  return str(built)


def test_the_wheel_holds_the_library_and_the_configs_only(wheel):
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
  tops = {name.split('/')[0] for name in names
          if not name.split('/')[0].endswith('.dist-info')}
  assert tops == {'kd_jax', 'experiments'}
  for package in ('kd_jax', 'experiments'):
    expected = {os.path.relpath(os.path.join(directory, f), ROOT)
                for directory, _, files in os.walk(os.path.join(ROOT, package))
                for f in files if f.endswith('.py') or f == 'py.typed'}
    assert expected <= set(names), sorted(expected - set(names))


def _imported_top_names(package: str) -> set[str]:
  """Top-level names of every module `package`'s files import, anywhere."""
  names = set()
  for directory, _, files in os.walk(os.path.join(ROOT, package)):
    for f in files:
      if not f.endswith('.py'):
        continue
      with open(os.path.join(directory, f)) as source:
        tree = ast.parse(source.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          names.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          names.add(node.module.split('.')[0])
  return names


def test_every_import_is_a_declared_dependency(wheel):
  with zipfile.ZipFile(wheel) as archive:
    (metadata,) = [n for n in archive.namelist()
                   if n.endswith('.dist-info/METADATA')]
    requires = email.message_from_bytes(archive.read(metadata)).get_all(
        'Requires-Dist')
  declared = {r.split(';')[0].split('~')[0].split('>')[0].split('=')[0]
              .split('[')[0].strip().lower().replace('_', '-')
              for r in requires}
  distributions = importlib.metadata.packages_distributions()
  own = {'kd_jax', 'experiments'}
  missing = {}
  for name in _imported_top_names('kd_jax') | _imported_top_names(
      'experiments'):
    if name in own or name in sys.stdlib_module_names:
      continue
    found = {d.lower().replace('_', '-') for d in distributions.get(name, [])}
    assert found, f'{name}: imported by kd_jax but not installed here'
    if not found & declared:
      missing[name] = sorted(found)
  assert not missing, f'imported but not in Requires-Dist: {missing}'


def test_the_installed_package_runs_outside_the_checkout(wheel, tmp_path):
  # A fresh virtual environment; the dependencies come from this one's
  # site-packages through a path file (no network), the package from the
  # wheel alone.
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
  python = venv / 'bin' / 'python'
  purelib = _run([str(python), '-c', 'import sysconfig; '
                  'print(sysconfig.get_paths()["purelib"])']).stdout.strip()
  here = [sysconfig.get_paths()['purelib'], *site.getsitepackages()]
  with open(os.path.join(purelib, 'dependencies.pth'), 'w') as f:
    f.write('\n'.join(dict.fromkeys(here)) + '\n')
  _run([sys.executable, '-m', 'pip', '--python', str(python), 'install',
        '--no-deps', '--no-index', '--disable-pip-version-check', '-q',
        wheel])
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  work = tmp_path / 'elsewhere'
  work.mkdir()
  checked = _run([str(python), '-c', _CHECK, str(venv)], cwd=work, env=env)
  assert 'installed kd_jax ran a distil step' in checked.stdout
  # The console script, with its default config (experiments/seed.py beside
  # the installed kd_jax): a misspelt override is its one-line error.
  script = subprocess.run(
      [str(venv / 'bin' / 'kd-jax-run'), '--config.seeed=3'], cwd=work,
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert script.returncode == 2, script.stderr[-3000:]
  assert 'did you mean --config.seed?' in script.stderr
  assert not os.listdir(work)
  # Every command has its console script; the export command runs from the
  # installed package alone (a directory without a run: its one line).
  for command in ('kd-jax-run', 'kd-jax-export', 'kd-jax-sweep',
                  'kd-jax-compare', 'kd-jax-cifar100'):
    assert (venv / 'bin' / command).exists(), command
  script = subprocess.run(
      [str(venv / 'bin' / 'kd-jax-export'), f'--workdir={work}'], cwd=work,
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert script.returncode == 2, script.stderr[-3000:]
  assert 'not a kd_jax workdir (no config.json)' in script.stderr
  assert not os.listdir(work)
