"""Checks an experiment config before any work starts.

`FIELDS` is the schema: every field an experiment config has, its type and the
values it may take. `validate` rejects a config with a missing, unknown or
out-of-range field, naming the field and what is allowed.
"""

from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any

import ml_collections

from kd_jax import data
from kd_jax import errors
from kd_jax import losses
from kd_jax import methods
from kd_jax import models
from kd_jax import train

STAGES = ('teacher', 'distill', 'scratch')
# Distillation methods the pipeline runs (kd_jax.methods has more losses).
PIPELINE_METHODS = ('kd', 'dkd', 'fitnets', 'at', 'rkd', 'pkt', 'multi_teacher',
                    'born_again', 'takd')
# Methods that compare layers pairwise (one student layer per teacher layer).
PAIRED_FEATURE_METHODS = ('fitnets', 'at')
FEATURE_METHODS = tuple(methods.FEATURE_METHODS)
DATA_SOURCES = ('auto', 'idx', 'tfds')
TEACHER_LOGITS = ('auto', 'cached', 'online')
# How the training split is read: held in memory, or streamed from disk
# batch by batch (kd_jax/streaming.py).
INPUTS = ('memory', 'stream')


@dataclasses.dataclass(frozen=True)
class Field:
  """A config field: its Python type, a check of its value, and what is allowed."""
  kind: type
  check: Callable[[Any], bool]
  allowed: str


def _one_of(names) -> Field:
  names = tuple(sorted(names))
  return Field(str, lambda v: v in names, f'one of {", ".join(names)}')


def _int_at_least(low: int) -> Field:
  return Field(int, lambda v: v >= low, f'an integer >= {low}')


def _positive_float() -> Field:
  return Field(float, lambda v: v > 0 and math.isfinite(v),
               'a finite number > 0')


def parse_list(text: str) -> tuple[str, ...]:
  """`'a, b'` -> `('a', 'b')`: a comma-separated config string, in order."""
  return tuple(s.strip() for s in text.split(',') if s.strip())


parse_stages = parse_list


def _valid_stages(value: str) -> bool:
  stages = parse_stages(value)
  return bool(stages) and len(set(stages)) == len(stages) and all(
      s in STAGES for s in stages)


def _valid_models(text: str) -> bool:
  return all(name in models.MODELS for name in parse_list(text))


def _valid_weights(text: str) -> bool:
  try:
    weights = [float(w) for w in parse_list(text)]
  except ValueError:
    return False
  return all(w >= 0 and math.isfinite(w) for w in weights) and (
      not weights or sum(weights) > 0)


FIELDS: dict[str, Field] = {
    'name': Field(str, bool, 'a non-empty string'),
    'seed': _int_at_least(0),
    'dataset': _one_of(data.DATASETS),
    'data_source': _one_of(DATA_SOURCES),
    'data_dir': Field(str, lambda v: True, 'a directory path, or "" for none'),
    'train_limit': _int_at_least(0),
    'test_limit': _int_at_least(0),
    'validation_size': _int_at_least(0),
    'num_seeds': _int_at_least(1),
    'batch_size': _int_at_least(1),
    'num_devices': _int_at_least(0),
    'precision': _one_of(train.PRECISIONS),
    'eval_batch_size': _int_at_least(1),
    'loop': _one_of(train.LOOPS),
    'input': _one_of(INPUTS),
    'steps_per_chunk': _int_at_least(0),
    'scan_unroll': Field(bool, lambda v: True, 'True or False'),
    'checkpoint_every_steps': _int_at_least(0),
    'checkpoints_to_keep': _int_at_least(1),
    'stages': Field(str, _valid_stages,
                    'a comma-separated list of distinct stages from '
                    + ', '.join(STAGES)),
    'teacher.model': _one_of(models.MODELS),
    'teacher.num_classes': _int_at_least(2),
    'teacher.epochs': _int_at_least(1),
    'teacher.learning_rate': _positive_float(),
    'teacher.schedule': _one_of(train.SCHEDULES),
    'teacher.checkpoint': Field(str, lambda v: True,
                                'a checkpoint directory, or "" for none'),
    'student.model': _one_of(models.MODELS),
    'student.num_classes': _int_at_least(2),
    'student.epochs': _int_at_least(1),
    'student.learning_rate': _positive_float(),
    'student.schedule': _one_of(train.SCHEDULES),
    'distill.method': _one_of(PIPELINE_METHODS),
    'distill.dkd.alpha': Field(float, lambda v: v >= 0 and math.isfinite(v),
                               'a finite number >= 0'),
    'distill.dkd.beta': Field(float, lambda v: v >= 0 and math.isfinite(v),
                              'a finite number >= 0'),
    'distill.dkd.ce_weight': Field(
        float, lambda v: v >= 0 and math.isfinite(v), 'a finite number >= 0'),
    'distill.features.student_layers': Field(
        str, lambda v: True, 'comma-separated layer names of the student'),
    'distill.features.teacher_layers': Field(
        str, lambda v: True, 'comma-separated layer names of the teacher'),
    'distill.features.weight': Field(
        float, lambda v: v >= 0 and math.isfinite(v), 'a finite number >= 0'),
    'distill.multi_teacher_weights': Field(
        str, _valid_weights, 'comma-separated numbers >= 0 with a positive '
        'sum, or "" for equal weights'),
    'distill.generations': _int_at_least(1),
    'distill.num_teachers': _int_at_least(1),
    'distill.assistant_models': Field(
        str, _valid_models, 'comma-separated model names from '
        + ', '.join(sorted(models.MODELS)) + ', or "" for none'),
    'distill.alpha': Field(float, lambda v: 0.0 <= v <= 1.0,
                           'a number in [0, 1]'),
    'distill.temperature': _positive_float(),
    'distill.t2_scaling': Field(bool, lambda v: True, 'True or False'),
    'distill.form': _one_of(losses.DISTILLATION_FORMS),
    'distill.teacher_logits': _one_of(TEACHER_LOGITS),
}


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dicts -> one dict of dotted names: `{'a': {'b': 1}}` -> `{'a.b': 1}`."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _type_ok(value: Any, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.UserInputError` listing every invalid field of `config`.

  Checks each field's presence, type and range (see `FIELDS`), unknown fields,
  and that teacher and student agree on the number of classes, which must
  cover the dataset's labels.
  """
  flat = flatten(config.to_dict())
  problems = [f'config.{k}: unknown field (known fields: see '
              'kd_jax/validation.py FIELDS)' for k in sorted(set(flat) - set(FIELDS))]
  for name, field in FIELDS.items():
    if name not in flat:
      problems.append(f'config.{name}: missing; expected {field.allowed}')
    elif not _type_ok(flat[name], field.kind) or not field.check(flat[name]):
      problems.append(
          f'config.{name} = {flat[name]!r}: expected {field.allowed}')
  if not problems:
    problems.extend(_cross_field_problems(flat))
  if problems:
    raise errors.UserInputError('invalid config:\n  ' + '\n  '.join(problems))


MAX_UNROLLED_STEPS = 64


def _cross_field_problems(flat: Mapping[str, Any]) -> list[str]:
  problems = []
  if flat['scan_unroll'] and not (
      1 <= flat['steps_per_chunk'] <= MAX_UNROLLED_STEPS):
    problems.append(
        f'config.steps_per_chunk = {flat["steps_per_chunk"]} with '
        'config.scan_unroll = True: each chunk compiles as straight-line '
        f'code; expected 1 to {MAX_UNROLLED_STEPS} (or scan_unroll = False)')
  if flat['teacher.checkpoint'] and 'teacher' in parse_stages(flat['stages']):
    problems.append(
        f'config.teacher.checkpoint = {flat["teacher.checkpoint"]!r} with '
        f'config.stages = {flat["stages"]!r}: a loaded teacher is not trained;'
        ' remove "teacher" from config.stages')
  teachers = parse_list(flat['teacher.checkpoint'])
  if flat['distill.method'] == 'multi_teacher':
    count = len(teachers) or flat['distill.num_teachers']
    if count < 2:
      problems.append(
          "config.distill.method = 'multi_teacher' distils from several "
          'teachers: set config.teacher.checkpoint to their checkpoint '
          'directories, comma-separated, or config.distill.num_teachers >= 2 '
          'to train them here')
    weights = parse_list(flat['distill.multi_teacher_weights'])
    if weights and len(weights) != count:
      problems.append(
          f'config.distill.multi_teacher_weights has {len(weights)} weights '
          f'for {count} teachers (' + ('config.teacher.checkpoint' if teachers
                                       else 'config.distill.num_teachers')
          + ')')
  elif len(teachers) > 1:
    problems.append(
        f'config.teacher.checkpoint names {len(teachers)} teachers: only '
        "config.distill.method = 'multi_teacher' distils from several")
  method = flat['distill.method']
  if method in FEATURE_METHODS:
    layers = {role: parse_list(flat[f'distill.features.{role}_layers'])
              for role in ('student', 'teacher')}
    for role, names in layers.items():
      if not names:
        problems.append(
            f'config.distill.features.{role}_layers is empty: method '
            f'{method!r} needs at least one layer')
    if method in PAIRED_FEATURE_METHODS and len(layers['student']) != len(
        layers['teacher']):
      problems.append(
          f'config.distill.features: {len(layers["student"])} student and '
          f'{len(layers["teacher"])} teacher layers; method {method!r} pairs '
          'them in order, so give as many of each')
  if method == 'takd' and not parse_list(flat['distill.assistant_models']):
    problems.append(
        "config.distill.method = 'takd': set config.distill.assistant_models "
        'to the teacher assistant(s) between teacher and student, '
        'comma-separated from the largest')
  if method == 'born_again' and flat['student.model'] != flat['teacher.model']:
    problems.append(
        f"config.distill.method = 'born_again': every generation has the "
        f"teacher's architecture, but config.student.model = "
        f'{flat["student.model"]!r} and config.teacher.model = '
        f'{flat["teacher.model"]!r}; set them equal')
  problems.extend(_streaming_problems(flat))
  teacher, student = flat['teacher.num_classes'], flat['student.num_classes']
  if teacher != student:
    problems.append(
        f'config.teacher.num_classes = {teacher} and config.student.num_classes'
        f' = {student}: teacher and student must predict the same classes')
  dataset_classes = data.DATASETS[flat['dataset']].num_classes
  for role in ('teacher', 'student'):
    if flat[f'{role}.num_classes'] < dataset_classes:
      problems.append(
          f'config.{role}.num_classes = {flat[f"{role}.num_classes"]}: dataset '
          f'{flat["dataset"]!r} has {dataset_classes} classes; expected >= '
          f'{dataset_classes}')
  return problems


def _streaming_problems(flat: Mapping[str, Any]) -> list[str]:
  """What a streamed training split (never in memory) cannot do."""
  if flat['input'] != 'stream':
    return []
  problems = []
  if flat['loop'] != 'python':
    problems.append(
        f"config.input = 'stream' with config.loop = {flat['loop']!r}: the "
        "scan loop holds the training split on device; set config.loop = "
        "'python'")
  if flat['distill.method'] == 'multi_teacher':
    problems.append(
        "config.input = 'stream' with config.distill.method = "
        "'multi_teacher': its teachers' logits are cached for the whole "
        "training split; use config.input = 'memory'")
  elif flat['distill.teacher_logits'] == 'cached':
    problems.append(
        "config.input = 'stream' with config.distill.teacher_logits = "
        "'cached': a cache holds logits for the whole training split; set "
        "it to 'online' or 'auto'")
  return problems
