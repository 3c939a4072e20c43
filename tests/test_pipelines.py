"""Pipeline methods end to end: stage order, and which teacher each stage used.

Each distilled stage's metrics include `train/teacher_accuracy`, the accuracy
of the teacher outputs it was trained on. Over a full epoch (no dropped
remainder) that is the accuracy of its teacher on the whole training split,
so recomputing it from the named teacher's checkpoint says whether the
stage distilled from the right network.
"""

import glob
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoints
from kd_jax import compare
from kd_jax import data
from kd_jax import errors
from kd_jax import experiment
from kd_jax import loop
from kd_jax import models
from kd_jax import train
from kd_jax.methods import fitnets
from synthetic import write_idx_dataset


# A teacher network other than the student's at a fifth of the seed
# teacher's arithmetic, where a test does not need the seed teacher.
CHEAP_TEACHER = 'seed_assistant_cnn'


@pytest.fixture(scope='module')
def noisy_idx_dir(tmp_path_factory) -> str:
  """512 train / 200 test examples, so noisy that no network learns them
  all in a few steps: different teachers have different accuracies."""
  return write_idx_dataset(str(tmp_path_factory.mktemp('noisy_idx')), 512,
                           200, noise=250)


def _config(name, data_dir, stages='teacher,distill'):
  """The quick variant: 512 - 256 validation examples in batches of 64,
  4 steps, nothing dropped (the shapes of the other end-to-end tests, so
  their compiled steps are reused from the compilation cache)."""
  config = importlib.import_module(f'experiments.{name}').get_config('quick')
  config.data_source, config.data_dir = 'idx', data_dir
  config.eval_batch_size, config.plots = 128, False
  config.stages = stages
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_accuracy(workdir, stages, model_name, dataset):
  """Accuracy on the training split of the (ensemble of) `stages`' final
  networks, recomputed from their checkpoints."""
  model = models.make_model(model_name, num_classes=10)
  template = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  logits = jnp.stack([loop.predict_logits(
      model.apply, checkpoints.load_variables(
          os.path.join(workdir, 'checkpoints', stage), template, what=stage),
      dataset.train, 128) for stage in stages], axis=1)
  predicted = train.ensemble_prediction(logits if len(stages) > 1
                                        else logits[:, 0])
  return float(jnp.mean(predicted == jnp.asarray(dataset.train.labels)))


def _check_each_stage_used_its_teacher(workdir, results, expected_order,
                                       data_dir):
  dataset = data.hold_out_validation(
      data.load_dataset('fashion_mnist', data_dir=data_dir, source='idx'), 256)
  lines = _metrics(workdir)
  assert [line['stage'] for line in lines] == expected_order
  accuracies = []
  for line in lines:
    info = results['stages'][line['stage']]
    if 'distilled_from' not in info:
      continue
    teachers = info['distilled_from'].split(',')
    model = results['stages'][teachers[0]]['model']
    expected = _train_accuracy(workdir, teachers, model, dataset)
    assert line['train/teacher_accuracy'] == pytest.approx(expected, abs=1e-6)
    accuracies.append(expected)
  # The teachers differ, so the check above tells them apart.
  assert len(set(accuracies)) == len(accuracies)


def test_takd_chain_distils_through_each_assistant(tmp_path, noisy_idx_dir):
  config = _config('takd', noisy_idx_dir)
  config.teacher.model = CHEAP_TEACHER  # The chain is what is tested.
  config.distill.takd.assistant_models = ('seed_assistant_cnn,'
                                         'seed_student_cnn')
  workdir = str(tmp_path / 'takd')
  results = experiment.run(config, workdir)
  stages = results['stages']
  assert [stages[s]['distilled_from'] for s in
          ('assistant1', 'assistant2', 'distill')] == [
              'teacher', 'assistant1', 'assistant2']
  assert stages['assistant1']['model'] == 'seed_assistant_cnn'
  assert stages['assistant1']['params'] == 75_114
  _check_each_stage_used_its_teacher(
      workdir, results, ['teacher', 'assistant1', 'assistant2', 'distill'],
      noisy_idx_dir)
  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read()
  assert '| assistant 2 | seed_student_cnn | 20,490 | 1 |' in table

  # Lose the last link and re-run: the student is distilled again from
  # assistant2, now restored from its checkpoint, to the same parameters.
  first = checkpoints.load_variables(
      os.path.join(workdir, 'checkpoints', 'distill'),
      models.init_variables(models.make_model('seed_student_cnn'),
                            jax.random.PRNGKey(0), (28, 28, 1)), what='x')
  accuracy = results['distilled_accuracy']
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'distill'))
  del results['stages']['distill']
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)
  again = experiment.run(config, workdir)
  second = checkpoints.load_variables(
      os.path.join(workdir, 'checkpoints', 'distill'), first, what='x')
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
  assert again['distilled_accuracy'] == accuracy


def test_born_again_generations_distil_from_the_one_before(tmp_path,
                                                           noisy_idx_dir):
  config = _config('born_again', noisy_idx_dir)
  # The paper's objective (teacher targets only) with a softer target here.
  config.distill.kd.temperature = 4.0
  workdir = str(tmp_path / 'ban')
  results = experiment.run(config, workdir)
  stages = results['stages']
  assert [stages[s]['distilled_from'] for s in
          ('generation1', 'generation2', 'distill')] == [
              'teacher', 'generation1', 'generation2']
  assert {stages[s]['model'] for s in stages} == {'seed_student_cnn'}
  assert results['generation1_accuracy'] == stages['generation1'][
      'test_accuracy']
  _check_each_stage_used_its_teacher(
      workdir, results, ['teacher', 'generation1', 'generation2', 'distill'],
      noisy_idx_dir)


def test_multi_teacher_trains_its_teachers_and_distils_from_all(
    tmp_path, noisy_idx_dir):
  config = _config('multi_teacher', noisy_idx_dir)
  config.distill.multi_teacher.num_teachers = 2
  config.teacher.model = CHEAP_TEACHER
  workdir = str(tmp_path / 'multi')
  results = experiment.run(config, workdir)
  assert results['stages']['distill']['distilled_from'] == 'teacher,teacher2'
  assert 0 <= results['stages']['distill']['teacher_ensemble_accuracy'] <= 1
  _check_each_stage_used_its_teacher(
      workdir, results, ['teacher', 'teacher2', 'distill'], noisy_idx_dir)
  # Same architecture, different initialisations.
  assert (results['stages']['teacher']['test_loss'] !=
          results['stages']['teacher2']['test_loss'])


def test_fitnets_trains_a_regressor_with_the_student(tmp_path, noisy_idx_dir):
  config = _config('fitnets', noisy_idx_dir)
  workdir = str(tmp_path / 'fitnets')
  results = experiment.run(config, workdir)
  distill = results['stages']['distill']
  # A 1x1 convolution from the student's 32 conv2 channels to 256.
  assert distill['module_params'] == {'fitnets': 32 * 256 + 256}
  assert distill['params'] == 20_490
  assert {'train/ce_loss', 'train/fitnets_loss'} <= set(_metrics(workdir)[1])
  # The distilled student loads as a plain model (e.g. to teach another);
  # its checkpoint holds the trained regressor as well.
  student = models.make_model('seed_student_cnn')
  template = models.init_variables(student, jax.random.PRNGKey(0),
                                   (28, 28, 1))
  path = os.path.join(workdir, 'checkpoints', 'distill')
  variables = checkpoints.load_variables(path, template, what='student')
  assert set(variables['params']) == {'conv1', 'conv2', 'head'}
  store = checkpoints.StageCheckpoints(path, keep=2)
  state = train.create_train_state(
      student, jax.random.PRNGKey(0), (28, 28, 1), 1e-3, modules={
          'fitnets': fitnets.HintRegressor(((7, 7, 256),)).init(
              jax.random.PRNGKey(1), [jnp.zeros((1, 7, 7, 32))])['params']})
  restored, _ = store.restore(state)
  store.close()
  init_kernel = state.modules['fitnets']['regressor0']['kernel']
  trained_kernel = restored.modules['fitnets']['regressor0']['kernel']
  assert trained_kernel.shape == (1, 1, 32, 256)
  assert not np.allclose(init_kernel, trained_kernel)


def test_fitnets_layers_that_cannot_be_mapped_are_refused(tmp_path,
                                                          noisy_idx_dir):
  config = _config('fitnets', noisy_idx_dir)
  config.distill.fitnets.student_layers = 'conv2'  # 7x7
  config.distill.fitnets.teacher_layers = 'conv1'  # 14x14
  with pytest.raises(errors.UserInputError,
                     match=r"config\.distill\.fitnets: student layer 'conv2': "
                     r'student feature map \(7, 7\) is smaller than the '
                     'teacher'):
    experiment.run(config, str(tmp_path / 'bad'))
  assert not os.path.exists(tmp_path / 'bad')


def test_method_comparison_shares_one_teacher(tmp_path, noisy_idx_dir):
  # kd and logit_l2 share a teacher (how a sweep shares stages is tested in
  # tests/test_sweep.py); born-again's teacher is the student network.
  every_stage = 'teacher,distill,scratch'
  configs = {'kd': _config('seed', noisy_idx_dir, every_stage),
             'logit_l2': _config('logit_l2', noisy_idx_dir, every_stage),
             'born_again': _config('born_again', noisy_idx_dir, every_stage)}
  configs['kd'].teacher.model = configs['logit_l2'].teacher.model = (
      CHEAP_TEACHER)
  workdir = str(tmp_path / 'compare')
  groups = compare.run_comparison(configs, workdir, seeds=(0, 1))
  assert [g['base'] for g in groups] == ['kd', 'logit_l2', 'born_again']
  kd, logit_l2, born_again = groups
  assert kd['teacher_mean'] == logit_l2['teacher_mean']
  assert kd['scratch_mean'] == logit_l2['scratch_mean']
  # Each teacher is trained once, with seed 0, and both seeds distil from
  # it; the students from scratch are one per seed.
  assert len(os.listdir(os.path.join(workdir, 'teachers'))) == 2
  assert len(os.listdir(os.path.join(workdir, 'scratch'))) == 2
  assert kd['teacher_ci'] == born_again['teacher_ci'] == 0
  assert born_again['teacher_mean'] != kd['teacher_mean']
  l2_runs = glob.glob(os.path.join(workdir, 'runs', 'logit_l2-*'))
  assert len(l2_runs) == 2
  for run in l2_runs:
    with open(os.path.join(run, 'results.json')) as f:
      results = json.load(f)
    assert results['stages']['teacher']['checkpoint'].startswith(
        os.path.join(workdir, 'teachers'))
    assert 'scratch' not in results['stages']
  assert 'vs_reference_mean' not in kd
  assert logit_l2['vs_reference_p'] <= 1
  assert born_again['distill_wall_time_s_mean'] > 0
  table = compare.methods_table(groups, {'kd': CHEAP_TEACHER,
                                         'logit_l2': CHEAP_TEACHER,
                                         'born_again': 'seed_student_cnn'})
  assert table.count('\n') == 5
  assert (f'| `logit_l2` | Ba & Caruana, NeurIPS 2014 | {CHEAP_TEACHER} |'
          in table)
  assert '| distilled - kd | p | distil wall time |' in table
  assert table.rstrip().endswith('| 2 |')  # Seeds.


def test_feature_layers_that_do_not_exist_are_named(tmp_path, noisy_idx_dir):
  config = _config('at', noisy_idx_dir)
  config.distill.at.student_layers = 'conv9'
  with pytest.raises(errors.UserInputError, match=(
      "config.distill.at.student_layers = 'conv9': no intermediate feature "
      "'conv9'; the model 'seed_student_cnn' has conv1, conv2, head")):
    experiment.run(config, str(tmp_path / 'bad'))
  assert not os.path.exists(tmp_path / 'bad')
