"""Preparation stages (`objective.Preparation`): AB's initialisation and FT's
paraphraser, trained before the distil stage that starts from them."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import ab as ab_experiment
from experiments import ft as ft_experiment
from experiments import seed
from kd_jax import distil_setup
from kd_jax import errors
from kd_jax import experiment
from kd_jax import models
from kd_jax import optimizers
from kd_jax import stages
from kd_jax import train
from kd_jax import validation
from kd_jax import workdir as workdir_lib

IMAGE_SHAPE = (28, 28, 1)


def _quick(module, data_dir, teacher=''):
  """The method's quick variant on the tiny data, one epoch a stage: the
  teacher stage, or (with a `teacher` checkpoint) the distil stage, with
  the preparation before it."""
  config = module.get_config('quick')
  config.data_source, config.data_dir = 'idx', data_dir
  config.eval_batch_size, config.plots = 128, False
  config.stages = 'distill' if teacher else 'teacher'
  config.teacher.checkpoint = teacher
  config.teacher.epochs = config.student.epochs = 1
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, tiny_idx_dir) -> str:
  """The checkpoint of the strong teacher (bn_cnn) both methods distil."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  experiment.run(_quick(ab_experiment, tiny_idx_dir), workdir)
  return os.path.join(workdir, 'checkpoints', 'teacher')


def _initial_student(config):
  """The distilled student's initial model variables (stage rng index 1)."""
  state = train.create_train_state(
      models.make_model(config.student.model), jax.random.fold_in(
          jax.random.PRNGKey(config.seed), 1), IMAGE_SHAPE)
  return train.model_variables(state)


def _assert_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _assert_all_differ(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert not np.array_equal(x, y)


# --- the plan and the config of a preparation stage. --------------------------


@pytest.mark.parametrize('module,name,trains', [(ab_experiment, 'ab_init',
                                                 'features'),
                                                (ft_experiment, 'paraphraser',
                                                 'modules')])
def test_the_preparation_runs_between_teacher_and_distil_stage(
    module, name, trains):
  config = module.get_config('quick')
  plan = stages.stage_plan(config)
  assert [s.name for s in plan] == ['teacher', name, 'distill', 'scratch']
  preparation, distill = plan[1], plan[2]
  # Both learn from the teacher, at the distilled student's initialisation.
  assert preparation.teachers == distill.teachers == ('teacher',)
  assert preparation.rng_index == distill.rng_index == 1
  assert preparation.preparation.trains == trains
  assert distill.starts_from == name and preparation.starts_from is None

  derived = distil_setup.stage_config(config, preparation)
  term = preparation.preparation.term.name
  assert derived.distill.terms == term
  assert derived.distill[term].weight == 1.0
  assert derived.student.epochs == preparation.preparation.epochs(config)
  assert derived.student.optimizer.schedule == 'constant'
  assert derived.student.optimizer.warmup_epochs == 0
  # The user's config is left as it was.
  assert config.distill.terms != term
  assert distil_setup.stage_config(config, distill) is config


def test_a_prepared_term_needs_its_method():
  config = seed.with_method(ft_experiment.get_config('quick'), 'kd',
                            terms=('ce', 'kd', 'ft'))
  with pytest.raises(errors.UserInputError,
                     match="term 'ft' needs what the preparation stage of "
                     "method 'ft' trains"):
    validation.validate(config)


# --- training only part of the state. ---------------------------------------


def _step_with_decay(trains):
  """One SGD step (weight decay on) of a bn_cnn student with a module,
  training only `trains`; the state before and after."""
  tx = optimizers.training_only(optax.chain(
      optax.add_decayed_weights(0.1), optax.sgd(0.5)), trains)
  state = train.create_train_state(
      models.make_model('bn_cnn'), jax.random.PRNGKey(0), IMAGE_SHAPE,
      tx=tx, modules={'m': {'w': jnp.ones(3)}})
  grads = jax.tree_util.tree_map(jnp.ones_like, state.trainable)
  return state, state.apply_gradients(grads=grads)


def test_training_only_the_features_keeps_the_classifier():
  before, after = _step_with_decay('features')
  _assert_equal(before.params[models.CLASSIFIER],
                after.params[models.CLASSIFIER])
  _assert_all_differ(
      {k: v for k, v in before.params.items() if k != models.CLASSIFIER},
      {k: v for k, v in after.params.items() if k != models.CLASSIFIER})
  _assert_all_differ(before.modules, after.modules)


def test_training_only_the_modules_keeps_the_model():
  before, after = _step_with_decay('modules')
  _assert_equal(before.params, after.params)
  _assert_all_differ(before.modules, after.modules)


def test_training_only_refuses_what_it_cannot_do():
  with pytest.raises(ValueError, match='trains must be one of'):
    optimizers.training_only(optax.sgd(1.0), 'head')
  tx = optimizers.training_only(optax.sgd(1.0), 'features')
  with pytest.raises(ValueError, match="no classifier 'head'"):
    tx.init({'model': {'dense': jnp.ones(2)}})


# --- end to end. ------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
  """Stage name -> (the state it started from, its constants, its final
  state), recorded from `experiment._run_stage` in the runs of the test."""
  calls = {}
  run_stage = experiment._run_stage  # pylint: disable=protected-access

  def recording(stage, config, wd, dataset, state, *args):
    info, final = run_stage(stage, config, wd, dataset, state, *args)
    calls[stage.name] = (state, args[-1], final)
    return info, final

  monkeypatch.setattr(experiment, '_run_stage', recording)
  return calls


def _features(params):
  return {k: v for k, v in params.items() if k != models.CLASSIFIER}


def test_ab_initialises_the_features_and_distil_starts_there(
    tmp_path, tiny_idx_dir, teacher, recorded):
  config = _quick(ab_experiment, tiny_idx_dir, teacher)
  workdir = str(tmp_path / 'ab')
  results = experiment.run(config, workdir)
  assert results['stages']['distill']['started_from'] == 'ab_init'
  assert results['stages']['ab_init']['distilled_from'] == 'teacher'
  metrics = workdir_lib.read_metrics(workdir)
  assert [m['stage'] for m in metrics] == ['ab_init', 'distill']
  assert np.isfinite(metrics[0]['train/ab_boundary_loss'])

  start, _, prepared = recorded['ab_init']
  # At the distilled student's initialisation; every feature layer trained,
  # the classifier kept.
  _assert_equal(train.model_variables(start), _initial_student(config))
  _assert_equal(prepared.params[models.CLASSIFIER],
                start.params[models.CLASSIFIER])
  _assert_all_differ(_features(prepared.params), _features(start.params))
  assert prepared.modules == {} or 'ab_boundary' in prepared.modules
  # The distil stage starts from there.
  distill_start, _, _ = recorded['distill']
  _assert_equal(train.model_variables(distill_start),
                train.model_variables(prepared))


def test_ft_trains_the_paraphraser_and_distil_reads_it(tmp_path, tiny_idx_dir,
                                                       teacher, recorded):
  config = _quick(ft_experiment, tiny_idx_dir, teacher)
  workdir = str(tmp_path / 'ft')
  results = experiment.run(config, workdir)
  assert results['stages']['distill']['started_from'] == 'paraphraser'
  assert set(results['stages']['paraphraser']['module_params']) == {
      'ft_paraphraser'}
  metrics = workdir_lib.read_metrics(workdir)
  assert [m['stage'] for m in metrics] == ['paraphraser', 'distill']
  assert np.isfinite(metrics[0]['train/ft_paraphraser_loss'])
  assert np.isfinite(metrics[1]['train/ft_loss'])

  start, _, prepared = recorded['paraphraser']
  # Only the paraphraser trained; the student stayed at its initialisation.
  _assert_equal(prepared.params, start.params)
  _assert_equal(train.model_variables(start), _initial_student(config))
  _assert_all_differ(prepared.modules, start.modules)
  # The distil stage: the translator trains, the paraphraser is a constant.
  distill_start, constants, final = recorded['distill']
  _assert_equal(constants['ft'], prepared.modules['ft_paraphraser'])
  assert set(final.modules) == {'ft'}
  _assert_all_differ(final.modules, distill_start.modules)

  # Lose the distil stage and re-run: the paraphraser comes back from its
  # checkpoint, and the distil stage is the same again.
  first = jax.device_get(train.model_variables(final))
  del results['stages']['distill']
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'distill'))
  recorded.clear()
  experiment.run(config, workdir)
  assert set(recorded) == {'distill'}
  _, constants, final = recorded['distill']
  _assert_equal(constants['ft'], prepared.modules['ft_paraphraser'])
  _assert_equal(train.model_variables(final), first)
