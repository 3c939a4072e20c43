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
from kd_jax import methods
from kd_jax import stages
from kd_jax import validation
from kd_jax import workdir
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
  assert config.distill.terms == 'ce,kd'
  # The tutorial's alpha = 0.1: CE weight alpha, KD weight 1 - alpha.
  assert (config.distill.ce.weight, config.distill.kd.weight) == (0.1, 0.9)
  assert config.distill.kd.temperature == 10.0
  assert config.distill.kd.t2_scaling is False  # The Keras code has no T**2.
  assert config.teacher.optimizer.learning_rate == 1e-3
  assert config.student.optimizer.learning_rate == 1e-3
  assert config.dataset == 'fashion_mnist'
  assert _config('mnist').dataset == 'mnist'
  assert _config('quick').teacher.epochs == 1


def _load_experiment(name):
  return importlib.import_module(f'experiments.{name}')


@pytest.mark.parametrize('name', ['fitnets', 'at', 'rkd', 'pkt'])
def test_feature_method_configs(name):
  config = _load_experiment(name).get_config('quick')
  validation.validate(config)
  assert config.distill.method == name
  assert config.distill.terms == f'ce,{name}'
  assert config.distill.ce.weight == 1.0  # The papers' CE + feature term.
  assert set(config.distill) == {'method', 'terms', 'teacher_logits', 'ce',
                                 name}  # Only the sections it uses.
  assert not experiment.use_teacher_cache(config)
  config.distill[name].teacher_layers = ' '
  assert (f"config.distill.{name}.teacher_layers = ' ': expected "
          'comma-separated layer names of the teacher') in _error_message(
              config)


@pytest.mark.parametrize('arg', [None, 'quick'])
def test_dkd_config_is_the_seed_with_dkd(arg):
  config = _load_experiment('dkd').get_config(arg)
  validation.validate(config)
  assert config.distill.method == 'dkd'
  assert (config.distill.dkd.tckd_weight, config.distill.dkd.nckd_weight,
          config.distill.dkd.temperature) == (1.0, 8.0, 4.0)
  # The reference code's warm-up is the record's default, off here.
  assert methods.default_section('dkd').warmup_epochs == 20
  assert config.distill.dkd.warmup_epochs == 0
  seed = _config(arg)
  assert config.teacher == seed.teacher and config.student == seed.student


def test_unknown_variant():
  with pytest.raises(ValueError, match='known variants: quick, mnist'):
    _config('fast')


@pytest.mark.parametrize('experiment_name, field, value, expected', [
    ('seed', 'distill.ce.weight', -0.1, r'config\.distill\.ce\.weight = '
     r'-0\.1: expected a finite number >= 0'),
    ('seed', 'distill.kd.temperature', 0.0, r'config\.distill\.kd\.'
     r'temperature = 0\.0: expected a finite number > 0'),
    ('seed', 'distill.kd.temperature', -2.0, r'config\.distill\.kd\.temperature'),
    ('seed', 'distill.kd.temperature', float('inf'),
     r'config\.distill\.kd\.temperature'),
    ('seed', 'batch_size', 0, r'config\.batch_size = 0: expected an integer >= 1'),
    ('seed', 'batch_size', -64, r'config\.batch_size'),
    ('seed', 'eval_batch_size', 0, r'config\.eval_batch_size'),
    ('seed', 'teacher.model', 'resnet9000', r'config\.teacher\.model = '
     '.resnet9000.: expected one of .*seed_teacher_cnn'),
    ('seed', 'student.model', 'nope', r'config\.student\.model'),
    ('seed', 'dataset', 'imagenet', r'config\.dataset = .imagenet.: expected '
     r'one of cifar10, cifar100, fashion_mnist, mnist'),
    ('seed', 'data_source', 'internet', r'config\.data_source.*auto, download, idx, tfds'),
    ('seed', 'stages', 'teacher,distil',
     r'config\.stages.*teacher, distill, scratch'),
    ('seed', 'stages', '', r'config\.stages'),
    ('seed', 'stages', 'teacher,teacher', r'config\.stages'),
    ('seed', 'teacher.epochs', 0, r'config\.teacher\.epochs'),
    ('seed', 'student.optimizer.learning_rate', 0.0,
     r'config\.student\.optimizer\.learning_rate'),
    ('seed', 'distill.kd.form', 'js',
     r'config\.distill\.kd\.form.*cross_entropy, kl'),
    ('seed', 'distill.kd.t2_scaling', 1, r'config\.distill\.kd\.t2_scaling = '
     '1: expected True or False'),
    ('seed', 'seed', -1, r'config\.seed'),
    ('seed', 'train_limit', -5, r'config\.train_limit'),
    ('seed', 'name', '', r'config\.name'),
    ('seed', 'loop', 'gpu', r'config\.loop = .gpu.: expected one of python, '
     'scan'),
    ('seed', 'steps_per_chunk', -1, r'config\.steps_per_chunk'),
    ('seed', 'scan_unroll', 'yes', r'config\.scan_unroll'),
    ('seed', 'checkpoint_every_steps', -1, r'config\.checkpoint_every_steps'),
    ('seed', 'checkpoints_to_keep', 0, r'config\.checkpoints_to_keep = 0: '
     'expected an integer >= 1'),
    ('seed', 'teacher.checkpoint', 3, r'config\.teacher\.checkpoint'),
    ('seed', 'distill.method', 'kdd', r'config\.distill\.method = .kdd.: '
     'expected one of ' + ', '.join(sorted(methods.METHODS)) + '$'),
    ('seed', 'distill.terms', 'ce,kd,kdd', r'config\.distill\.terms = '
     '.ce,kd,kdd.: expected comma-separated distinct terms from ce, kd'),
    ('seed', 'distill.terms', 'ce,ce', r'config\.distill\.terms'),
    ('born_again', 'distill.born_again.generations', 0,
     r'config\.distill\.born_again\.generations = 0: expected an integer '
     '>= 1'),
    ('takd', 'distill.takd.assistant_models', 'seed_assistant_cnn,nope',
     r'config\.distill\.takd\.assistant_models = .seed_assistant_cnn,nope.: '
     'expected comma-separated model names'),
    ('takd', 'distill.takd.assistant_models', '',
     r'config\.distill\.takd\.assistant_models'),
    ('dkd', 'distill.dkd.nckd_weight', -1.0, r'config\.distill\.dkd\.'
     r'nckd_weight = -1\.0: expected a finite number >= 0'),
    ('dkd', 'distill.dkd.warmup_epochs', -1, r'config\.distill\.dkd\.'
     'warmup_epochs'),
    ('multi_teacher', 'distill.multi_teacher.teacher_weights', '1,-2',
     r'config\.distill\.multi_teacher\.teacher_weights'),
    ('multi_teacher', 'distill.multi_teacher.teacher_weights', '0,0,0',
     r'config\.distill\.multi_teacher\.teacher_weights'),
    ('at', 'distill.at.p', 0.5, r'config\.distill\.at\.p = 0\.5: expected a '
     'number >= 1'),
    ('rkd', 'distill.rkd.angle_weight', -1.0, r'config\.distill\.rkd\.'
     'angle_weight'),
    ('seed', 'distill.teacher_logits', 'sometimes',
     r'config\.distill\.teacher_logits.*auto, cached, online'),
])
def test_invalid_field_is_named(experiment_name, field, value, expected):
  # Edit a plain dict: a config file can hold any value, whatever the type
  # checks of ConfigDict's attribute assignment would allow.
  values = _load_experiment(experiment_name).get_config().to_dict()
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
  config.distill.kd.weight = -2.0
  config.batch_size = 0
  message = _error_message(config)
  assert 'config.distill.kd.weight' in message
  assert 'config.batch_size' in message


def test_unknown_and_missing_fields():
  config = _config()
  with config.unlocked():
    config.distill.kd.temprature = 4.0
    del config.distill.kd['temperature']
    config.distill.temperature = 4.0
    config.distill.dkd = methods.default_section('dkd')
  message = _error_message(config)
  assert ('config.distill.kd.temprature: unknown field; did you mean '
          'config.distill.kd.temperature?') in message
  assert ('config.distill.kd.temperature: missing; expected a finite number '
          "> 0 (config.distill.kd = kd_jax.methods.default_section('kd')"
          ) in message
  assert ('config.distill.temperature: unknown field; did you mean '
          'config.distill.kd.temperature?') in message
  # A known method's section the config does not use: one line.
  assert ("config.distill.dkd: the section of 'dkd', which this config does "
          "not use (config.distill.method = 'kd', config.distill.terms = "
          "'ce,kd'); remove it or add 'dkd' to config.distill.terms"
          ) in message
  assert 'config.distill.dkd.nckd_weight' not in message


def test_a_term_named_without_its_section():
  config = _config()
  config.distill.terms = 'ce,kd,at'
  assert ('config.distill.at.student_layers: missing; expected '
          'comma-separated layer names') in _error_message(config)


def test_the_method_and_its_terms_must_fit():
  config = _load_experiment('dkd').get_config()
  config.distill.terms = 'ce'
  assert ("config.distill.method = 'dkd' but config.distill.terms = 'ce' "
          "leaves out its term 'dkd'") in _error_message(config)
  multi = _load_experiment('multi_teacher').get_config()
  with multi.unlocked():
    multi.distill.terms = 'ce,multi_teacher,kd'
    multi.distill.kd = methods.default_section('kd')
  assert ("term 'kd' reads one teacher's outputs, but method "
          "'multi_teacher' distils from several") in _error_message(multi)


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
  assert stages.stage_plan(config)


def test_strong_variant_pairs_feature_layers_of_equal_size():
  config = _load_experiment('fitnets').get_config('strong')
  assert config.teacher.model == 'bn_cnn'
  assert (config.distill.fitnets.student_layers,
          config.distill.fitnets.teacher_layers) == ('conv2', 'block2')


def test_stage_plans_of_the_pipeline_methods():
  names = lambda config: [(s.name, s.model, s.teachers, s.rng_index)
                          for s in stages.stage_plan(config)]
  takd = _load_experiment('takd').get_config()
  takd.distill.takd.assistant_models = 'seed_assistant_cnn, seed_student_cnn'
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


@pytest.mark.parametrize('name, change, expected', [
    ('born_again', {'student.model': 'seed_assistant_cnn'},
     "'born_again': every generation has the teacher's architecture"),
    ('multi_teacher', {'distill.multi_teacher.num_teachers': 1},
     'config.distill.multi_teacher.num_teachers >= 2'),
    ('multi_teacher', {'distill.multi_teacher.teacher_weights': '1,2'},
     'has 2 weights for 3 teachers '
     '\\(config.distill.multi_teacher.num_teachers\\)'),
    ('seed', {'teacher.checkpoint': 'a,b', 'stages': 'distill'},
     "config.teacher.checkpoint names 2 teachers: method 'kd' distils from "
     'one'),
    ('multi_teacher', {'input': 'stream', 'loop': 'python'},
     "config.input = 'stream' with config.distill.method = 'multi_teacher'"),
])
def test_method_settings_are_checked(name, change, expected):
  config = _load_experiment(name).get_config()
  for key, value in change.items():
    *parents, leaf = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  assert re.search(expected, _error_message(config))


@pytest.mark.parametrize('method', ['fitnets', 'at'])
def test_paired_feature_methods_need_as_many_layers_of_each(method):
  config = _load_experiment(method).get_config()
  config.distill[method].student_layers = 'conv1,conv2'
  assert (f'config.distill.{method}: 2 student and 1 teacher layers; '
          f'{method} pairs them') in _error_message(config)


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
  assert config.distill.kd.temperature == 20.0 and config.distill.kd.t2_scaling


def test_workdirs_written_before_a_field_existed_still_resume(tmp_path):
  config = _config()
  old = json.loads(config.to_json())
  for field in workdir.ADDED_FIELD_DEFAULTS:
    del old[field]
  # The layout before optimiser sections and augmentation.
  del old['augment']
  for role in ('teacher', 'student'):
    optimizer = old[role].pop('optimizer')
    old[role]['learning_rate'] = optimizer['learning_rate']
    old[role]['schedule'] = optimizer['schedule']
  os.makedirs(tmp_path / 'work')
  with open(tmp_path / 'work' / 'config.json', 'w') as f:
    json.dump(old, f)
  workdir.check_workdir(config, str(tmp_path / 'work'))  # Same run.
  config.student.optimizer.learning_rate = 3e-3
  with pytest.raises(errors.UserInputError,
                     match=r'fields: config\.student\.optimizer\.learning_rate\)'):
    workdir.check_workdir(config, str(tmp_path / 'work'))
  config.student.optimizer.learning_rate = 1e-3
  config.precision = 'bfloat16'
  with pytest.raises(errors.UserInputError, match='config.precision'):
    workdir.check_workdir(config, str(tmp_path / 'work'))


@pytest.mark.parametrize('payload', ['[]', 'null', '3', '"x"'])
def test_workdir_json_of_the_wrong_shape_is_one_clear_error(tmp_path,
                                                            payload):
  os.makedirs(tmp_path / 'work')
  for name in ('config.json', 'results.json'):
    (tmp_path / 'work' / name).write_text(payload)
  with pytest.raises(errors.UserInputError,
                     match=r'config\.json: expected a JSON object'):
    workdir.check_workdir(_config(), str(tmp_path / 'work'))
  with pytest.raises(errors.UserInputError,
                     match=r'results\.json: expected a JSON object'):
    workdir.Workdir(str(tmp_path / 'work')).load_results()
  (tmp_path / 'work' / 'results.json').write_text('{}')
  with pytest.raises(errors.UserInputError,
                     match=r'results\.json: expected a "stages" object'):
    workdir.Workdir(str(tmp_path / 'work')).load_results()


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  whole = [{'stage': 'teacher', 'epoch': 1, 'train/loss': 1.0},
           {'stage': 'distill', 'epoch': 1, 'train/loss': 2.0}]
  path.write_text(''.join(json.dumps(r) + '\n' for r in whole)
                  + '{"stage": "distill", "epo')  # Cut short by a kill.
  assert workdir.read_metrics(str(tmp_path)) == whole
  assert 'metrics.jsonl, line 3: not a whole metrics record' in caplog.text
  # Resuming distill after its first epoch keeps the whole lines only.
  workdir.Workdir(str(tmp_path)).keep_stage_metrics('distill', 1)
  assert workdir.read_metrics(str(tmp_path)) == whole
  assert path.read_text().endswith('\n')
