"""End to end: the real `run.py` in a subprocess on tiny synthetic IDX data."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir: str, data_dir: str, *overrides: str,
         config: str = 'seed.py:quick'):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             # Compile fast; this test checks plumbing, not speed.
             JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  command = [sys.executable, os.path.join(ROOT, 'run.py'),
             '--config=' + os.path.join(ROOT, 'experiments', config),
             f'--workdir={workdir}', '--config.data_source=idx',
             f'--config.data_dir={data_dir}', '--config.eval_batch_size=128',
             *overrides]
  return subprocess.run(command, capture_output=True, text=True, env=env,
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
                                                      tiny_idx_dir):
  workdir, _ = finished_run
  result = _run(workdir, tiny_idx_dir, '--config.teacher.epochs=2',
                '--config.distill.kd.temperature=4')
  assert result.returncode == 2
  assert 'config.distill.kd.temperature' in result.stderr
  assert '--start_over' in result.stderr
  assert 'Traceback' not in result.stderr


def test_bad_input_stops_before_work_without_traceback(tmp_path, tiny_idx_dir):
  workdir = str(tmp_path / 'never')
  result = _run(workdir, tiny_idx_dir, '--config.distill.kd.weight=-1.5')
  assert result.returncode == 2
  assert 'config.distill.kd.weight = -1.5: expected a finite number >= 0' in (
      result.stderr)
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(workdir)


@pytest.mark.parametrize('flag, expected', [
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
])
def test_flag_mistakes_are_one_clear_error(tmp_path, tiny_idx_dir, flag,
                                           expected):
  result = _run(str(tmp_path / 'never'), tiny_idx_dir, flag)
  assert result.returncode == 2
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_variant_is_one_clear_error(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'run.py'),
       '--config=' + os.path.join(ROOT, 'experiments', 'seed.py:fast'),
       f'--workdir={tmp_path}/never'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert "unknown variant(s) ['fast']; known variants: quick, mnist" in (
      result.stderr)
  assert 'Traceback' not in result.stderr


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
