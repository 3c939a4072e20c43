"""End to end: the real `run.py` on tiny synthetic IDX data, every run of it
in a fork of one process that imported its modules (tests/run_many.py)."""

import glob
import json
import os

import pytest

from experiments import seed
from kd_jax import cli
from kd_jax import errors
from kd_jax import experiment
import run_many
from test_sweep import read_event_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No cluster for --multihost to find. Compile fast: these tests check
# plumbing, not speed.
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(('SLURM_', 'OMPI_', 'PMI_', 'JAX_COORDINATOR'))}
ENV.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')

# Command-line mistakes: each stops with one line on stderr and status 2.
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
DEFAULT_CONFIG_MISTAKE = '--config.seeed=3'
UNKNOWN_VARIANT = '--config=' + os.path.join(ROOT, 'experiments',
                                             'seed.py:fast')


def _args(workdir, data_dir: str, *overrides: str) -> list[str]:
  """run.py's arguments for the quick variant on `data_dir`."""
  return ['--config=' + os.path.join(ROOT, 'experiments', 'seed.py:quick'),
          f'--workdir={workdir}', '--config.data_source=idx',
          f'--config.data_dir={data_dir}', '--config.eval_batch_size=128',
          '--config.plots=False',
          *overrides]


def _empty_dir(path):
  path.mkdir()
  return path


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_idx_dir):
  """Each run of this module, by name: (its workdir, or for a mistake a
  directory, empty before it, that holds or is its workdir; the run's exit
  status, stdout and stderr)."""
  root = tmp_path_factory.mktemp('run')
  work, rerun, start_over = root / 'work', root / 'rerun', root / 'start_over'
  teacher_epochs = '--config.teacher.epochs=2'
  # A full run; then, each on a copy of its workdir, the same command again
  # and another config with --start_over.
  jobs = {
      'finished': (work, {'args': _args(work, tiny_idx_dir, teacher_epochs)}),
      # With figures, which a re-run may change.
      'rerun': (rerun, {'args': _args(rerun, tiny_idx_dir, teacher_epochs,
                                      '--config.plots=True'),
                        'copy': [work, rerun]}),
      'start_over': (start_over, {
          'args': _args(start_over, tiny_idx_dir, teacher_epochs,
                        '--config.stages=scratch', '--config.seed=5',
                        '--start_over'),
          'copy': [work, start_over]}),
  }
  for i, (flag, _) in enumerate([BAD_VALUE, *FLAG_MISTAKES]):
    directory = _empty_dir(root / f'mistake{i}')
    jobs[flag] = directory, {
        'args': _args(directory / 'never', tiny_idx_dir, flag)}
  directory = _empty_dir(root / 'variant')
  jobs[UNKNOWN_VARIANT] = directory, {'args': [
      UNKNOWN_VARIANT, f'--workdir={directory / "never"}']}
  # A workdir whose parent is a file: a filesystem failure, one line.
  directory = _empty_dir(root / 'under_a_file')
  (directory / 'a_file').write_text('mine\n')
  jobs['under_a_file'] = directory, {
      'args': _args(directory / 'a_file' / 'work', tiny_idx_dir)}
  # The default config (no --config) takes its overrides when the flag is
  # defined, not when flags are parsed.
  directory = _empty_dir(root / 'default_config')
  jobs[DEFAULT_CONFIG_MISTAKE] = directory, {'args': [
      DEFAULT_CONFIG_MISTAKE, f'--workdir={directory / "never"}']}
  # An existing, empty workdir: nothing may be written to it.
  directory = _empty_dir(root / 'multihost')
  jobs['--multihost'] = directory, {'args': ['--multihost',
                                             f'--workdir={directory}']}
  # num_seeds > 1: a sweep over seeds (the teacher the student's network,
  # as in tests/test_sweep.py, whose sweeps this is one of).
  directory = root / 'seeds'
  jobs['seeds'] = directory, {'args': _args(
      directory, tiny_idx_dir, '--config.num_seeds=2', '--config.seed=3',
      '--config.teacher.model=seed_student_cnn')}
  outcomes = run_many.run_jobs([job for _, job in jobs.values()], env=ENV)
  return {name: (str(directory), outcome) for (name, (directory, _)), outcome
          in zip(jobs.items(), outcomes)}


def _succeeded(run) -> dict:
  """A run's exit status, stdout and stderr, once it succeeded."""
  _, outcome = run
  assert outcome['returncode'] == 0, outcome['stderr'][-3000:]
  return outcome


def test_run_writes_results(runs):
  workdir, _ = runs['finished']
  result = _succeeded(runs['finished'])
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
  assert table in result['stdout']
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
  assert not os.path.exists(os.path.join(workdir, 'plots'))  # plots=False


def test_rerun_reuses_finished_stages(runs):
  _succeeded(runs['finished'])
  with open(os.path.join(runs['finished'][0], 'results.json')) as f:
    before = json.load(f)
  workdir, _ = runs['rerun']  # A copy of the finished run's.
  result = _succeeded(runs['rerun'])
  assert result['stderr'].count('already finished') == 3
  with open(os.path.join(workdir, 'results.json')) as f:
    after = json.load(f)
  assert after['stages'] == before['stages']
  # No stage ran; the teacher's checked final state draws the tutorial's
  # figure. Every figure whole (written through a rename), no leftovers.
  assert sorted(os.listdir(os.path.join(workdir, 'plots'))) == [
      'reliability.png', 'tempered_softmax.png', 'training_curves.png']
  for name in os.listdir(os.path.join(workdir, 'plots')):
    with open(os.path.join(workdir, 'plots', name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'  # And not 0 bytes.


def test_different_config_in_same_workdir_is_refused(runs, tiny_idx_dir,
                                                      capsys):
  # In this process, up to what run.py does with the error (as with the bad
  # value's below, which goes through run.py).
  _succeeded(runs['finished'])
  config = seed.get_config('quick')  # `_args`, with these overrides.
  config.data_source, config.data_dir = 'idx', tiny_idx_dir
  config.eval_batch_size, config.teacher.epochs = 128, 2
  config.distill.kd.temperature = 4.0
  with pytest.raises(errors.UserInputError) as info:
    experiment.run(config, runs['finished'][0])
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    cli.exit_with_error(info.value)
  assert exited.value.code == 2
  stderr = capsys.readouterr().err
  assert 'config.distill.kd.temperature' in stderr
  assert '--start_over' in stderr
  assert stderr.count('\n') == 1 and stderr.startswith('error: ')


def _assert_one_clear_error(runs, case, *expected):
  directory, outcome = runs[case]
  assert outcome['returncode'] == 2
  for text in expected:
    assert text in outcome['stderr']
  assert 'Traceback' not in outcome['stderr']
  assert not os.listdir(directory)  # Stopped before any work.


def test_bad_input_stops_before_work_without_traceback(runs):
  _assert_one_clear_error(runs, *BAD_VALUE)


@pytest.mark.parametrize('flag, expected', FLAG_MISTAKES)
def test_flag_mistakes_are_one_clear_error(runs, flag, expected):
  _assert_one_clear_error(runs, flag, expected)


def test_a_mistake_in_the_default_config_is_one_clear_error(runs):
  _assert_one_clear_error(
      runs, DEFAULT_CONFIG_MISTAKE, 'error: --config.seeed: the config has no '
      'field config.seeed; did you mean --config.seed?')


def test_a_filesystem_failure_is_one_line_naming_the_path(runs):
  directory, outcome = runs['under_a_file']
  assert outcome['returncode'] == 1
  workdir = os.path.join(directory, 'a_file', 'work')
  assert outcome['stderr'].splitlines()[-1] == (
      f'error: {workdir}: Not a directory; a file stands where a directory '
      'should be: move it away or use another --workdir, then run the same '
      'command again (it resumes from the newest checkpoint)')
  assert 'Traceback' not in outcome['stderr']
  assert os.listdir(directory) == ['a_file']
  with open(os.path.join(directory, 'a_file')) as f:
    assert f.read() == 'mine\n'  # Untouched.


def test_unknown_variant_is_one_clear_error(runs):
  _assert_one_clear_error(
      runs, UNKNOWN_VARIANT,
      "unknown variant(s) ['fast']; known variants: quick, mnist")


def test_multihost_outside_a_cluster_is_a_clear_error(runs):
  # The flag of tests/test_multihost.py's runs, outside any cluster.
  _assert_one_clear_error(
      runs, '--multihost', 'error: cannot join a multi-process run',
      '--coordinator_address, --num_processes and --process_id')


def test_start_over_flag_replaces_a_different_run(runs):
  # On a copy of the finished run's workdir; that its different config is
  # refused without the flag is tested above.
  workdir, _ = runs['start_over']
  _succeeded(runs['start_over'])
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['seed'] == 5
  with open(os.path.join(workdir, 'results.json')) as f:
    assert set(json.load(f)['stages']) == {'scratch'}  # The old run's went.


def test_num_seeds_runs_a_sweep_and_reports_statistics(runs):
  workdir, _ = runs['seeds']
  result = _succeeded(runs['seeds'])
  assert '| seed_quick | 2 |' in result['stdout']
  with open(os.path.join(workdir, 'rows.jsonl')) as f:
    assert [json.loads(line)['seed'] for line in f] == [3, 4]
  # Every run wrote its metrics for TensorBoard (its figures: off here;
  # tests/test_results.py draws them through sweeps).
  run_dir = glob.glob(os.path.join(workdir, 'runs', 'seed_quick-*'))[0]
  assert os.listdir(os.path.join(run_dir, 'tensorboard', 'distill'))
  teacher_dir = glob.glob(os.path.join(workdir, 'teachers', '*'))[0]
  assert read_event_scalars(os.path.join(teacher_dir, 'tensorboard',
                                         'teacher'))
  assert not os.path.exists(os.path.join(teacher_dir, 'plots'))
