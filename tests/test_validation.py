"""Config validation: every user mistake stops early with the field's name."""

import importlib
import json
import os
import re

import ml_collections
import pytest

from experiments import seed
from kd_jax import errors
from kd_jax import experiment
from kd_jax import validation
from synthetic import write_idx_dataset

def _config(arg=None):
  return seed.get_config(arg)


@pytest.mark.parametrize('arg', [None, 'quick', 'mnist', 'quick,mnist'])
def test_seed_configs_are_valid(arg):
  validation.validate(_config(arg))


def test_seed_config_reproduces_the_tutorial():
  config = _config()
  assert config.batch_size == 64
  assert (config.teacher.epochs, config.student.epochs) == (5, 3)
  assert (config.distill.alpha, config.distill.temperature) == (0.1, 10.0)
  assert config.distill.t2_scaling is False  # The Keras code has no T**2.
  assert config.teacher.learning_rate == config.student.learning_rate == 1e-3
  assert config.dataset == 'fashion_mnist'
  assert _config('mnist').dataset == 'mnist'
  assert _config('quick').teacher.epochs == 1


def _load_experiment(name):
  return importlib.import_module(f'experiments.{name}')


@pytest.mark.parametrize('name', ['fitnets', 'at', 'rkd', 'pkt'])
def test_feature_method_configs(name):
  config = _load_experiment(name).get_config('quick')
  validation.validate(config)
  assert config.distill.method == name and config.distill.alpha == 1.0
  assert not experiment.use_teacher_cache(config)
  config.distill.features.teacher_layers = ' '
  assert ('config.distill.features.teacher_layers is empty' in
          _error_message(config))


@pytest.mark.parametrize('arg', [None, 'quick'])
def test_dkd_config_is_the_seed_with_dkd(arg):
  config = _load_experiment('dkd').get_config(arg)
  validation.validate(config)
  assert config.distill.method == 'dkd'
  assert (config.distill.dkd.alpha, config.distill.dkd.beta,
          config.distill.temperature) == (1.0, 8.0, 4.0)
  seed = _config(arg)
  assert config.teacher == seed.teacher and config.student == seed.student


def test_unknown_variant():
  with pytest.raises(ValueError, match='known variants: quick, mnist'):
    _config('fast')


@pytest.mark.parametrize('field, value, expected', [
    ('distill.alpha', 1.5, r'config\.distill\.alpha = 1\.5: expected a number '
     r'in \[0, 1\]'),
    ('distill.alpha', -0.1, r'config\.distill\.alpha'),
    ('distill.temperature', 0.0, r'config\.distill\.temperature = 0\.0: '
     'expected a finite number > 0'),
    ('distill.temperature', -2.0, r'config\.distill\.temperature'),
    ('distill.temperature', float('inf'), r'config\.distill\.temperature'),
    ('batch_size', 0, r'config\.batch_size = 0: expected an integer >= 1'),
    ('batch_size', -64, r'config\.batch_size'),
    ('eval_batch_size', 0, r'config\.eval_batch_size'),
    ('teacher.model', 'resnet9000', r'config\.teacher\.model = .resnet9000.: '
     'expected one of .*seed_teacher_cnn'),
    ('student.model', 'nope', r'config\.student\.model'),
    ('dataset', 'imagenet', r'config\.dataset = .imagenet.: expected one of '
     r'fashion_mnist, mnist'),
    ('data_source', 'internet', r'config\.data_source.*auto, idx, tfds'),
    ('stages', 'teacher,distil', r'config\.stages.*teacher, distill, scratch'),
    ('stages', '', r'config\.stages'),
    ('stages', 'teacher,teacher', r'config\.stages'),
    ('teacher.epochs', 0, r'config\.teacher\.epochs'),
    ('student.learning_rate', 0.0, r'config\.student\.learning_rate'),
    ('distill.form', 'js', r'config\.distill\.form.*cross_entropy, kl'),
    ('distill.t2_scaling', 1, r'config\.distill\.t2_scaling = 1: expected '
     'True or False'),
    ('seed', -1, r'config\.seed'),
    ('train_limit', -5, r'config\.train_limit'),
    ('name', '', r'config\.name'),
    ('loop', 'gpu', r'config\.loop = .gpu.: expected one of python, scan'),
    ('steps_per_chunk', -1, r'config\.steps_per_chunk'),
    ('scan_unroll', 'yes', r'config\.scan_unroll'),
    ('checkpoint_every_steps', -1, r'config\.checkpoint_every_steps'),
    ('checkpoints_to_keep', 0, r'config\.checkpoints_to_keep = 0: expected '
     'an integer >= 1'),
    ('teacher.checkpoint', 3, r'config\.teacher\.checkpoint'),
    ('distill.method', 'crd', r'config\.distill\.method = .crd.: '
     'expected one of at, born_again, dkd, fitnets, kd, multi_teacher, pkt, '
     'rkd, takd'),
    ('distill.generations', 0, r'config\.distill\.generations = 0: expected '
     'an integer >= 1'),
    ('distill.assistant_models', 'seed_assistant_cnn,nope',
     r'config\.distill\.assistant_models = .seed_assistant_cnn,nope.: '
     'expected comma-separated model names'),
    ('distill.dkd.beta', -1.0, r'config\.distill\.dkd\.beta = -1\.0: '
     'expected a finite number >= 0'),
    ('distill.multi_teacher_weights', '1,-2',
     r'config\.distill\.multi_teacher_weights'),
    ('distill.multi_teacher_weights', '0,0',
     r'config\.distill\.multi_teacher_weights'),
    ('distill.teacher_logits', 'sometimes',
     r'config\.distill\.teacher_logits.*auto, cached, online'),
])
def test_invalid_field_is_named(field, value, expected):
  # Edit a plain dict: a config file can hold any value, whatever the type
  # checks of ConfigDict's attribute assignment would allow.
  values = _config().to_dict()
  *parents, leaf = field.split('.')
  target = values
  for name in parents:
    target = target[name]
  target[leaf] = value
  config = ml_collections.ConfigDict(values)
  with pytest.raises(errors.UserInputError, match=expected):
    validation.validate(config)


def _error_message(config) -> str:
  with pytest.raises(errors.UserInputError) as info:
    validation.validate(config)
  return str(info.value)


def test_all_problems_are_reported_together():
  config = _config()
  config.distill.alpha = 2.0
  config.batch_size = 0
  message = _error_message(config)
  assert 'config.distill.alpha' in message
  assert 'config.batch_size' in message


def test_unknown_and_missing_fields():
  config = _config()
  with config.unlocked():
    config.distill.temprature = 4.0
    del config.distill['temperature']
  message = _error_message(config)
  assert 'config.distill.temprature: unknown field' in message
  assert 'config.distill.temperature: missing' in message


@pytest.mark.parametrize('steps', [0, 65])
def test_unrolled_chunks_must_be_short(steps):
  config = _config()
  config.scan_unroll, config.steps_per_chunk = True, steps
  assert f'config.steps_per_chunk = {steps} with config.scan_unroll = True' in (
      _error_message(config))
  config.scan_unroll = False
  validation.validate(config)


def test_a_loaded_teacher_is_not_trained():
  config = _config()
  config.teacher.checkpoint = '/somewhere/checkpoints/teacher'
  assert 'remove "teacher" from config.stages' in _error_message(config)
  config.stages = 'distill,scratch'
  validation.validate(config)


def test_teacher_and_student_class_counts_must_agree():
  config = _config()
  config.student.num_classes = 12
  with pytest.raises(errors.UserInputError,
                     match='teacher.num_classes = 10 and config.student.'
                     'num_classes = 12'):
    validation.validate(config)


def test_model_classes_must_cover_the_dataset():
  config = _config()
  config.teacher.num_classes = config.student.num_classes = 5
  with pytest.raises(errors.UserInputError,
                     match=r"'fashion_mnist' has 10 classes"):
    validation.validate(config)


def test_dataset_labels_beyond_the_classes_stop_before_training(tmp_path):
  # The config claims 10 classes; write a dataset whose labels reach 11.
  data_dir = write_idx_dataset(str(tmp_path / 'data'), 64, 32, num_classes=12)
  config = _config('quick')
  config.data_dir, config.data_source = data_dir, 'idx'
  workdir = str(tmp_path / 'work')
  with pytest.raises(errors.UserInputError, match='label'):
    experiment.run(config, workdir)
  assert not os.path.exists(workdir)  # Nothing written, nothing trained.


def test_distill_without_a_teacher_in_the_workdir(tmp_path, tiny_idx_dir):
  config = _config('quick')
  config.data_dir, config.data_source = tiny_idx_dir, 'idx'
  config.stages = 'distill'
  with pytest.raises(errors.UserInputError, match='no finished teacher'):
    experiment.run(config, str(tmp_path / 'work'))


def test_missing_data_stops_before_the_workdir_is_written(tmp_path):
  config = _config('quick')
  config.data_dir, config.data_source = str(tmp_path / 'absent'), 'idx'
  workdir = str(tmp_path / 'work')
  with pytest.raises(errors.UserInputError, match='absent'):
    experiment.run(config, workdir)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize('name', ['seed', 'dkd', 'fitnets', 'at', 'rkd', 'pkt',
                                  'multi_teacher', 'born_again', 'takd',
                                  'hinton_mnist'])
@pytest.mark.parametrize('arg', [None, 'quick', 'strong'])
def test_every_experiment_config_is_valid(name, arg):
  config = _load_experiment(name).get_config(arg)
  validation.validate(config)
  if name not in ('seed', 'hinton_mnist'):
    assert config.distill.method == name
  assert experiment.stage_plan(config)


def test_strong_variant_pairs_feature_layers_of_equal_size():
  config = _load_experiment('fitnets').get_config('strong')
  assert config.teacher.model == 'bn_cnn'
  assert (config.distill.features.student_layers,
          config.distill.features.teacher_layers) == ('conv2', 'block2')


def test_stage_plans_of_the_pipeline_methods():
  names = lambda config: [(s.name, s.model, s.teachers, s.rng_index)
                          for s in experiment.stage_plan(config)]
  takd = _load_experiment('takd').get_config()
  takd.distill.assistant_models = 'seed_assistant_cnn, seed_student_cnn'
  assert names(takd) == [
      ('teacher', 'seed_teacher_cnn', (), 0),
      ('assistant1', 'seed_assistant_cnn', ('teacher',), 2),
      ('assistant2', 'seed_student_cnn', ('assistant1',), 3),
      ('distill', 'seed_student_cnn', ('assistant2',), 1),
      ('scratch', 'seed_student_cnn', (), 1)]
  ban = _load_experiment('born_again').get_config()
  ban.stages = 'distill,teacher'  # Order comes from the pipeline.
  assert [n for n, *_ in names(ban)] == ['teacher', 'generation1',
                                         'generation2', 'distill']
  multi = _load_experiment('multi_teacher').get_config()
  assert names(multi)[:4] == [
      ('teacher', 'seed_teacher_cnn', (), 0),
      ('teacher2', 'seed_teacher_cnn', (), 1002),
      ('teacher3', 'seed_teacher_cnn', (), 1003),
      ('distill', 'seed_student_cnn', ('teacher', 'teacher2', 'teacher3'), 1)]
  kd = _config()
  kd.stages = 'scratch'
  assert names(kd) == [('scratch', 'seed_student_cnn', (), 1)]


@pytest.mark.parametrize('change, expected', [
    (dict(method='takd', assistant_models=''),
     "'takd': set config.distill.assistant_models"),
    (dict(method='born_again'),
     "'born_again': every generation has the teacher's architecture"),
    (dict(method='multi_teacher', num_teachers=1),
     'config.distill.num_teachers >= 2'),
    (dict(method='multi_teacher', num_teachers=3,
          multi_teacher_weights='1,2'),
     'has 2 weights for 3 teachers \\(config.distill.num_teachers\\)'),
])
def test_pipeline_method_settings_are_checked(change, expected):
  config = _config()
  for key, value in change.items():
    config.distill[key] = value
  assert re.search(expected, _error_message(config))


@pytest.mark.parametrize('method', ['fitnets', 'at'])
def test_paired_feature_methods_need_as_many_layers_of_each(method):
  config = _config()
  config.distill.method = method
  config.distill.features.student_layers = 'conv1,conv2'
  config.distill.features.teacher_layers = 'conv2'
  assert ('2 student and 1 teacher layers; method '
          f"'{method}' pairs them") in _error_message(config)


def test_validation_split_larger_than_the_data_stops_early(tmp_path,
                                                          tiny_idx_dir):
  config = _config('quick')
  config.data_dir, config.data_source = tiny_idx_dir, 'idx'
  config.validation_size = 512  # All 512 training examples.
  workdir = str(tmp_path / 'work')
  with pytest.raises(errors.UserInputError,
                     match=r'config\.validation_size = 512: the training '
                     'split has only 512 examples'):
    experiment.run(config, workdir)
  assert not os.path.exists(workdir)


def test_hinton_mnist_follows_the_paper():
  config = _load_experiment('hinton_mnist').get_config()
  validation.validate(config)
  assert (config.dataset, config.teacher.model, config.student.model) == (
      'mnist', 'hinton_teacher_mlp', 'hinton_student_mlp')
  assert config.distill.temperature == 20.0 and config.distill.t2_scaling


def test_workdirs_written_before_a_field_existed_still_resume(tmp_path):
  config = _config()
  old = config.to_dict()
  for field in experiment.ADDED_FIELD_DEFAULTS:
    del old[field]
  os.makedirs(tmp_path / 'work')
  with open(tmp_path / 'work' / 'config.json', 'w') as f:
    json.dump(old, f)
  experiment.check_workdir(config, str(tmp_path / 'work'))  # Same run.
  config.precision = 'bfloat16'
  with pytest.raises(errors.UserInputError, match='config.precision'):
    experiment.check_workdir(config, str(tmp_path / 'work'))
