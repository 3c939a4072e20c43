"""Reliability: kill and resume bit-exactly, determinism, checkpoints, NaN."""

import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import seed
from kd_jax import checkpoints
from kd_jax import errors
from kd_jax import experiment
from kd_jax import loop
from kd_jax import models
from kd_jax import workdir as workdir_lib
import run_many

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 512 - 256 validation examples in batches of 16: 16 steps an epoch; the
# teacher 1 epoch, each student 2; a checkpoint every 8 steps; one step per
# compiled chunk, as in the quick variant (chunks of several unrolled steps,
# about 3x slower to compile, are checked against one scan per epoch in
# tests/test_loop.py).
# With the CIFAR recipe's augmentation (random crop and flip, so the teacher
# runs in the distil step) and, for the students, its SGD (momentum,
# Nesterov here, weight decay, a step decay after the first epoch): all of
# it must resume exactly. The teacher has the student's network: its stage
# resumes as any other, and the seed teacher's steps cost 6x the student's
# (it is trained end to end in tests/test_run.py).
SMALL = ('--config.batch_size=16', '--config.teacher.epochs=1',
         '--config.teacher.model=seed_student_cnn',
         '--config.student.epochs=2', '--config.checkpoint_every_steps=8',
         '--config.steps_per_chunk=1', '--config.eval_batch_size=128',
         '--config.augment.crop_padding=4', '--config.augment.flip=True',
         '--config.student.optimizer.name=sgd',
         '--config.student.optimizer.learning_rate=0.05',
         '--config.student.optimizer.nesterov=True',
         '--config.student.optimizer.weight_decay=5e-4',
         '--config.student.optimizer.schedule=step',
         '--config.student.optimizer.decay_epochs=1')


def _args(workdir, data_dir):
  """run.py's arguments for the SMALL run."""
  return ['--config=' + os.path.join(ROOT, 'experiments', 'seed.py:quick'),
          f'--workdir={workdir}', '--config.data_source=idx',
          f'--config.data_dir={data_dir}', '--config.plots=False', *SMALL]


def _newest_step(workdir, stage):
  directory = os.path.join(workdir, 'checkpoints', stage)
  if not os.path.isdir(directory):
    return -1
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  return max(steps, default=-1)


def _final_arrays(workdir, stage):
  directory = os.path.join(workdir, 'checkpoints', stage)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True)) as manager:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  return step, restored['state']


def _comparable(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  results.pop('updated')
  for info in results['stages'].values():
    info.pop('wall_time_s', None)
    info.pop('teacher_cache_s', None)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics = f.read()
  return results, metrics


def _assert_same_run(workdir_a, workdir_b):
  assert _comparable(workdir_a) == _comparable(workdir_b)
  for stage in ('teacher', 'distill', 'scratch'):
    step_a, state_a = _final_arrays(workdir_a, stage)
    step_b, state_b = _final_arrays(workdir_b, stage)
    assert step_a == step_b
    flat_a = ocp.tree.to_flat_dict(state_a)
    flat_b = ocp.tree.to_flat_dict(state_b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
      np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_idx_dir):
  """The same run.py command three times, in order, each in a fork of one
  process (tests/run_many.py): uninterrupted; killed (SIGKILL) once the
  distil stage saved its checkpoint at step 8; resumed in the killed run's
  workdir. Name -> (workdir, the run's exit status, stdout and stderr)."""
  root = tmp_path_factory.mktemp('resume')
  reference, killed, at_kill, damaged = (str(root / name) for name in (
      'reference', 'killed', 'at_kill', 'damaged'))
  outcomes = run_many.run_jobs([
      {'args': _args(reference, tiny_idx_dir)},
      {'args': _args(killed, tiny_idx_dir), 'kill_when_exists': os.path.join(
          killed, 'checkpoints', 'distill', '8')},
      {'args': _args(killed, tiny_idx_dir), 'copy': [killed, at_kill]},
      # The finished run again, its scratch stage's final checkpoint
      # damaged on disk.
      {'args': _args(damaged, tiny_idx_dir), 'copy': [reference, damaged],
       'flip_a_byte_under': os.path.join(damaged, 'checkpoints', 'scratch',
                                         '32')},
  ], env=dict(os.environ, JAX_PLATFORMS='cpu',
              JAX_DISABLE_MOST_OPTIMIZATIONS='1'))
  return {'reference': (reference, outcomes[0]),
          # What the kill left: the copy made before the run resumed.
          'killed': (at_kill, outcomes[1]),
          'resumed': (killed, outcomes[2]),
          'damaged': (damaged, outcomes[3])}


@pytest.fixture(scope='module')
def reference_run(runs):
  workdir, outcome = runs['reference']
  assert outcome['returncode'] == 0, outcome['stderr'][-3000:]
  return workdir


def test_killed_and_resumed_equals_uninterrupted(reference_run, runs):
  # Also the determinism test: the same config and seed, run again (the
  # teacher and scratch stages here never stop), give bit-identical results.
  # Killed in the distil stage's first epoch: the resumed run crosses the
  # learning-rate decay, with the momentum and the augmentation's keys
  # restored.
  at_kill, killed = runs['killed']
  assert killed['returncode'] == -signal.SIGKILL, (
      'run.py ended before it could be killed')
  assert 8 <= _newest_step(at_kill, 'distill') < 16  # Killed mid-epoch.
  workdir, resumed = runs['resumed']
  assert resumed['returncode'] == 0, resumed['stderr'][-3000:]
  assert 'resuming from the checkpoint at step' in resumed['stderr']
  _assert_same_run(reference_run, workdir)  # Provenance included.
  _assert_provenance(workdir)


def _assert_provenance(workdir):
  """results.json's provenance is complete, each stage's checkpoints carry
  it, and the distilled stage names its teacher's fingerprint."""
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  record = results['provenance']
  assert set(record) == {'code_version', 'config_sha256', 'data_sha256',
                         'packages', 'devices'}
  assert record['devices']['count'] == 1
  for stage in ('teacher', 'distill', 'scratch'):
    with open(os.path.join(workdir, 'checkpoints', stage,
                           'provenance.json')) as f:
      assert json.load(f) == record
  template = models.init_variables(models.make_model('seed_student_cnn'),
                                   jax.random.PRNGKey(0), (28, 28, 1))
  teacher = checkpoints.load_variables(
      os.path.join(workdir, 'checkpoints', 'teacher'), template, what='t')
  assert results['stages']['distill']['teacher_sha256'] == (
      checkpoints.fingerprint(teacher))


def test_a_damaged_final_checkpoint_is_trained_again_exactly(reference_run,
                                                           runs):
  workdir, outcome = runs['damaged']
  assert outcome['returncode'] == 0, outcome['stderr'][-3000:]
  damaged = os.path.join(workdir, 'checkpoints', 'scratch', '32')
  assert f'checkpoint {damaged}: ' in outcome['stderr']
  assert 'stage scratch: its final checkpoint is missing or damaged' in (
      outcome['stderr'])
  assert 'resuming from the checkpoint at step 24' in outcome['stderr']
  assert outcome['stderr'].count('already finished') == 2  # The others.
  _assert_same_run(reference_run, workdir)


def test_keeps_the_last_checkpoints_only(reference_run):
  steps = sorted(int(n) for n in os.listdir(
      os.path.join(reference_run, 'checkpoints', 'teacher')) if n.isdigit())
  assert steps == [8, 16]  # checkpoints_to_keep = 2; 8-step intervals.


def _seed_config(tiny_idx_dir):
  """The quick variant with the shapes of the other end-to-end tests."""
  config = seed.get_config('quick')
  config.data_dir, config.data_source = tiny_idx_dir, 'idx'
  config.eval_batch_size, config.plots = 128, False
  config.teacher.model = 'seed_student_cnn'  # As in SMALL.
  return config


def test_distil_from_a_teacher_trained_elsewhere(reference_run, tmp_path,
                                                 tiny_idx_dir):
  config = _seed_config(tiny_idx_dir)  # As SMALL: the reference run's.
  config.batch_size, config.steps_per_chunk = 16, 1
  config.checkpoint_every_steps = 8
  config.augment.crop_padding, config.augment.flip = 4, True
  config.student.epochs = 2
  config.student.optimizer.update(
      name='sgd', learning_rate=0.05, nesterov=True, weight_decay=5e-4,
      schedule='step', decay_epochs='1')
  config.stages = 'distill'
  config.teacher.checkpoint = os.path.join(reference_run, 'checkpoints',
                                           'teacher')
  results = experiment.run(config, str(tmp_path / 'work'))
  with open(os.path.join(reference_run, 'results.json')) as f:
    reference = json.load(f)
  assert results['teacher_accuracy'] == reference['teacher_accuracy']
  assert results['distilled_accuracy'] == reference['distilled_accuracy']
  assert results['stages']['teacher']['checkpoint'] == config.teacher.checkpoint
  assert results['stages']['teacher']['sha256'] == (
      reference['stages']['distill']['teacher_sha256'])


@pytest.mark.parametrize('model, num_classes, expected', [
    # The reference run's teacher is a seed_student_cnn (SMALL).
    ('seed_teacher_cnn', 10, r"\['params'\]\['conv1'\]\['kernel'\]: "
     r'checkpoint \(3, 3, 1, 16\), model \(3, 3, 1, 64\)'),
    ('seed_student_cnn', 12, r"\['params'\]\['head'\]\['kernel'\]: "
     r'checkpoint \(1568, 10\), model \(1568, 12\)'),
    ('hinton_teacher_mlp', 10, r"\['params'\]\['hidden0'\]\['kernel'\]: "
     'missing from the checkpoint'),
])
def test_teacher_checkpoint_of_another_model_is_refused(
    reference_run, tmp_path, tiny_idx_dir, model, num_classes, expected):
  config = _seed_config(tiny_idx_dir)
  config.stages = 'distill'
  config.teacher.model = model
  config.teacher.num_classes = config.student.num_classes = num_classes
  path = os.path.join(reference_run, 'checkpoints', 'teacher')
  config.teacher.checkpoint = path
  with pytest.raises(errors.UserInputError, match=expected) as info:
    experiment.run(config, str(tmp_path / 'work'))
  assert path in str(info.value)
  assert not os.path.exists(tmp_path / 'work')


@pytest.mark.parametrize('make_path, expected', [
    (lambda tmp: str(tmp / 'nowhere'), 'no such directory'),
    (lambda tmp: str(tmp), 'holds no complete checkpoint'),
])
def test_missing_or_empty_teacher_checkpoint(tmp_path, tiny_idx_dir,
                                             make_path, expected):
  config = _seed_config(tiny_idx_dir)
  config.stages = 'distill'
  config.teacher.checkpoint = make_path(tmp_path)
  with pytest.raises(errors.UserInputError,
                     match=f'config.teacher.checkpoint = .*{expected}'):
    experiment.run(config, str(tmp_path / 'work'))


def test_unreadable_teacher_checkpoint(reference_run, tmp_path, tiny_idx_dir):
  broken = tmp_path / 'teacher'
  step = _newest_step(reference_run, 'teacher')
  source = os.path.join(reference_run, 'checkpoints', 'teacher', str(step))
  shutil.copytree(source, broken / str(step))
  for root, _, files in os.walk(broken / str(step) / 'state'):
    for name in files:
      if name != 'commit_success.txt' and not name.startswith('_'):
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  config = _seed_config(tiny_idx_dir)
  config.stages = 'distill'
  config.teacher.checkpoint = str(broken)
  with pytest.raises(errors.UserInputError, match='cannot read the checkpoint'):
    experiment.run(config, str(tmp_path / 'work'))


def test_start_over_replaces_a_run_with_another_config(tmp_path,
                                                       tiny_idx_dir):
  config = _seed_config(tiny_idx_dir)
  config.stages, config.plots = 'scratch', True
  workdir = tmp_path / 'work'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  experiment.run(config, str(workdir))
  config.student.optimizer.learning_rate = 3e-3
  with pytest.raises(errors.UserInputError,
                     match='config.student.optimizer.learning_rate'):
    experiment.run(config, str(workdir))
  # The user's files among the run's, and a stage only the old run had.
  mine = ['plots/mine.png', 'checkpoints/README', 'checkpoints/scratch/notes',
          'tensorboard/notes', 'export/mine.txt']
  (workdir / 'export').mkdir()
  for name in mine:
    (workdir / name).write_text(name)
  exported = ['export/distill.onnx', 'export/distill.jax_export',
              'export/report.md', 'export/report.json']
  for name in exported:  # What export.py wrote from the old run.
    (workdir / name).write_text(name)
  (workdir / 'checkpoints' / 'old_stage' / '5').mkdir(parents=True)
  results = experiment.run(config, str(workdir), start_over=True)
  assert 'scratch_accuracy' in results
  with open(workdir / 'config.json') as f:
    assert json.load(f)['student']['optimizer']['learning_rate'] == 3e-3
  assert (workdir / 'notes.txt').read_text() == 'mine'
  for name in mine:
    assert (workdir / name).read_text() == name
  assert not (workdir / 'checkpoints' / 'old_stage').exists()
  assert not any((workdir / name).exists() for name in exported)


def test_start_over_leaves_a_directory_without_a_run_alone(tmp_path):
  # The user's own plots/ and results.md, and no config.json: no run here.
  (tmp_path / 'plots').mkdir()
  for name in ('plots/training_curves.png', 'results.md', 'metrics.jsonl'):
    (tmp_path / name).write_text(name)
  workdir_lib.clear_workdir(str(tmp_path))
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == [
      'metrics.jsonl', 'plots', 'plots/training_curves.png', 'results.md']


def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(
    tmp_path, tiny_idx_dir):
  config = _seed_config(tiny_idx_dir)
  config.stages = 'scratch'
  config.student.optimizer.learning_rate = 1e30  # Diverges within a few steps.
  workdir = str(tmp_path / 'work')
  with pytest.raises(loop.NonFiniteError,
                     match=r"stage 'scratch' diverged: non-finite loss or "
                     r'gradient, or a loss above 1e\+07, at training step '
                     r'(\d+) \(epoch 1, batch \d+\); (the last good '
                     r'checkpoint is at step \d+|no checkpoint of this stage '
                     r'was saved before it)\. Lower '
                     r'config\.student\.optimizer\.learning_rate \(1e\+30\) '
                     r'or check the inputs') as info:
    experiment.run(config, workdir)
  bad_step = int(re.search(r'training step (\d+)', str(info.value)).group(1))
  newest = _newest_step(workdir, 'scratch')
  assert newest < bad_step
  if newest >= 0:
    _, state = _final_arrays(workdir, 'scratch')
    for leaf in ocp.tree.to_flat_dict(state['params']).values():
      assert np.all(np.isfinite(leaf))


def test_a_finite_but_exploding_teacher_is_stopped_as_diverged(
    tmp_path, tiny_idx_dir):
  # Adam at 1e6: finite losses of 1e20 and more, which once let the teacher
  # finish and the distil stage fail for it.
  config = _seed_config(tiny_idx_dir)
  config.stages = 'teacher'
  config.teacher.optimizer.learning_rate = 1e6
  with pytest.raises(loop.NonFiniteError,
                     match=r"stage 'teacher' diverged: .* Lower "
                     r'config\.teacher\.optimizer\.learning_rate \(1e\+06\)'):
    experiment.run(config, str(tmp_path / 'work'))
  assert not os.path.exists(tmp_path / 'work' / 'results.json')


def test_multi_teacher_distillation_from_two_checkpoints(tmp_path,
                                                        tiny_idx_dir):
  paths = []
  for teacher_seed in (0, 1):
    config = _seed_config(tiny_idx_dir)
    config.seed, config.stages = teacher_seed, 'teacher'
    workdir = str(tmp_path / f'teacher{teacher_seed}')
    experiment.run(config, workdir)
    paths.append(os.path.join(workdir, 'checkpoints', 'teacher'))
  kd_config = _seed_config(tiny_idx_dir)
  config = seed.with_method(_seed_config(tiny_idx_dir), 'multi_teacher',
                            multi_teacher={'teacher_weights': '1,3'})
  config.stages = 'distill'
  config.teacher.checkpoint = ','.join(paths)
  results = experiment.run(config, str(tmp_path / 'student'))
  teacher = results['stages']['teacher']
  assert len(teacher['member_accuracies']) == 2
  assert 0.0 <= teacher['test_accuracy'] <= 1.0
  assert 0.0 <= results['distilled_accuracy'] <= 1.0
  assert results['stages']['distill']['teacher_logits'] == 'cached'
  config.distill.multi_teacher.teacher_weights = '1'
  with pytest.raises(errors.UserInputError,
                     match='has 1 weights for 2 teachers'):
    experiment.run(config, str(tmp_path / 'other'))
  kd_config.stages = 'distill'
  kd_config.teacher.checkpoint = config.teacher.checkpoint
  with pytest.raises(errors.UserInputError,
                     match="names 2 teachers: method 'kd' distils from one"):
    experiment.run(kd_config, str(tmp_path / 'other'))
