"""End to end: the real `run.py` in a subprocess on tiny synthetic IDX data
(the command-line mistakes in forks of one process, tests/run_many.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import seed
from kd_jax import cli
from kd_jax import errors
from kd_jax import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Compile fast; these tests check plumbing, not speed.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')


def _args(workdir: str, data_dir: str, *overrides: str) -> list[str]:
  """run.py's arguments for the quick variant on `data_dir`."""
  return ['--config=' + os.path.join(ROOT, 'experiments', 'seed.py:quick'),
          f'--workdir={workdir}', '--config.data_source=idx',
          f'--config.data_dir={data_dir}', '--config.eval_batch_size=128',
          *overrides]


def _run(workdir: str, data_dir: str, *overrides: str):
  command = [sys.executable, os.path.join(ROOT, 'run.py'),
             *_args(workdir, data_dir, *overrides)]
  return subprocess.run(command, capture_output=True, text=True, env=ENV,
                        timeout=300, check=False)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, tiny_idx_dir):
  workdir = str(tmp_path_factory.mktemp('run') / 'work')
  result = _run(workdir, tiny_idx_dir, '--config.teacher.epochs=2')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_run_writes_results(finished_run):
  workdir, result = finished_run
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  for key in ('teacher_accuracy', 'distilled_accuracy', 'scratch_accuracy'):
    assert 0.0 <= results[key] <= 1.0
  # Ten very different classes; two epochs of the teacher beat chance (0.1).
  assert results['teacher_accuracy'] > 0.3
  assert results['stages']['teacher']['params'] == 273_802
  assert results['stages']['distill']['params'] == 20_490
  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read()
  assert '| student, distilled | seed_student_cnn | 20,490 | 1 |' in table
  assert table in result.stdout
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['teacher']['epochs'] == 2
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [(r['stage'], r['epoch']) for r in lines] == [
      ('teacher', 1), ('teacher', 2), ('distill', 1), ('scratch', 1)]
  assert {'train/ce_loss', 'train/kd_loss'} <= set(lines[2])
  assert lines[-1]['test/count'] == 200
  for stage in ('teacher', 'distill', 'scratch'):
    # One epoch of 8 steps per student stage, 2 for the teacher: the newest
    # checkpoint is the final state.
    assert os.listdir(os.path.join(workdir, 'checkpoints', stage))


def test_rerun_reuses_finished_stages(finished_run, tiny_idx_dir):
  workdir, _ = finished_run
  with open(os.path.join(workdir, 'results.json')) as f:
    before = json.load(f)
  result = _run(workdir, tiny_idx_dir, '--config.teacher.epochs=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count('already finished') == 3
  with open(os.path.join(workdir, 'results.json')) as f:
    after = json.load(f)
  assert after['stages'] == before['stages']


def test_different_config_in_same_workdir_is_refused(finished_run,
                                                      tiny_idx_dir, capsys):
  # In this process: run.py passes the error to `cli.exit_with_error` as it
  # does the bad value's below, which runs the real run.py.
  workdir, _ = finished_run
  config = seed.get_config('quick')  # As `_run` with these overrides.
  config.data_source, config.data_dir = 'idx', tiny_idx_dir
  config.eval_batch_size, config.teacher.epochs = 128, 2
  config.distill.kd.temperature = 4.0
  with pytest.raises(errors.UserInputError) as info:
    experiment.run(config, workdir)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    cli.exit_with_error(info.value)
  assert exited.value.code == 2
  stderr = capsys.readouterr().err
  assert 'config.distill.kd.temperature' in stderr
  assert '--start_over' in stderr
  assert stderr.count('\n') == 1 and stderr.startswith('error: ')


# Command-line mistakes: each a real run of run.py (its flags, config file
# and `main`), all forked from one process that imported run.py's modules
# (tests/run_many.py) instead of one interpreter importing JAX for each.
BAD_VALUE = ('--config.distill.kd.weight=-1.5',
             'config.distill.kd.weight = -1.5: expected a finite number >= 0')
FLAG_MISTAKES = [
    ('--config.distill.kd.temprature=4',
     'error: --config.distill.kd.temprature: the config has no field '
     'config.distill.kd.temprature; did you mean '
     '--config.distill.kd.temperature?'),
    # The soft term's settings moved into its section.
    ('--config.distill.temperature=4',
     'did you mean --config.distill.kd.temperature?'),
    ('--config.foo=1', 'error: --config.foo: the config has no field '
     'config.foo\n'),
    ('--config.batch_size=abc', "invalid literal for int() with base 10: 'abc'"),
]
UNKNOWN_VARIANT = '--config=' + os.path.join(ROOT, 'experiments',
                                             'seed.py:fast')


@pytest.fixture(scope='module')
def mistakes(tmp_path_factory, tiny_idx_dir):
  """Case (its flag) -> (a directory, empty before the run, that holds or is
  its --workdir; the run's exit status, stdout and stderr)."""
  root = tmp_path_factory.mktemp('mistakes')
  cases = {}
  for i, (flag, _) in enumerate([BAD_VALUE, *FLAG_MISTAKES]):
    cases[flag] = root / str(i), _args(str(root / str(i) / 'never'),
                                       tiny_idx_dir, flag)
  cases[UNKNOWN_VARIANT] = root / 'variant', [
      UNKNOWN_VARIANT, f'--workdir={root / "variant" / "never"}']
  # An existing, empty workdir: nothing may be written to it.
  cases['--multihost'] = root / 'multihost', [
      '--multihost', f'--workdir={root / "multihost"}']
  for directory, _ in cases.values():
    directory.mkdir()
  # --multihost outside a cluster: none that JAX could detect.
  env = {k: v for k, v in ENV.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'PMI_', 'JAX_COORDINATOR'))}
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'run_many.py'),
       json.dumps([args for _, args in cases.values()])],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = json.loads(result.stdout.splitlines()[-1])
  return {case: (directory, run)
          for (case, (directory, _)), run in zip(cases.items(), runs)}


def _assert_one_clear_error(mistakes, case, *expected):
  directory, result = mistakes[case]
  assert result['returncode'] == 2
  for text in expected:
    assert text in result['stderr']
  assert 'Traceback' not in result['stderr']
  assert not os.listdir(directory)  # Stopped before any work.


def test_bad_input_stops_before_work_without_traceback(mistakes):
  _assert_one_clear_error(mistakes, *BAD_VALUE)


@pytest.mark.parametrize('flag, expected', FLAG_MISTAKES)
def test_flag_mistakes_are_one_clear_error(mistakes, flag, expected):
  _assert_one_clear_error(mistakes, flag, expected)


def test_unknown_variant_is_one_clear_error(mistakes):
  _assert_one_clear_error(
      mistakes, UNKNOWN_VARIANT,
      "unknown variant(s) ['fast']; known variants: quick, mnist")


def test_multihost_outside_a_cluster_is_a_clear_error(mistakes):
  # The flag of tests/test_multihost.py's runs, outside any cluster.
  _assert_one_clear_error(
      mistakes, '--multihost', 'error: cannot join a multi-process run',
      '--coordinator_address, --num_processes and --process_id')


def test_start_over_flag_replaces_a_different_run(finished_run, tmp_path,
                                                  tiny_idx_dir):
  # That a different config is refused without it is tested above.
  workdir = str(tmp_path / 'work')
  shutil.copytree(finished_run[0], workdir)
  replaced = _run(workdir, tiny_idx_dir, '--config.teacher.epochs=2',
                  '--config.stages=scratch', '--config.seed=5',
                  '--start_over')
  assert replaced.returncode == 0, replaced.stderr[-3000:]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['seed'] == 5
  with open(os.path.join(workdir, 'results.json')) as f:
    assert set(json.load(f)['stages']) == {'scratch'}  # The old run's went.
