"""Checks an experiment config before any work starts.

`FIELDS` is the schema of the fields every experiment config has; the
sections of `config.distill` come from the method records
(`kd_jax.methods`): one per term of `config.distill.terms` and one for the
method itself if it has settings. `validate` rejects a config with a
missing, unknown or out-of-range field, naming the field and what is allowed.
"""

from collections.abc import Mapping
import difflib
from typing import Any

import ml_collections

from kd_jax import augment
from kd_jax import data
from kd_jax import errors
from kd_jax import fields
from kd_jax import loop
from kd_jax import methods
from kd_jax import models
from kd_jax import optimizers
from kd_jax import precision
from kd_jax import stages

DATA_SOURCES = data.SOURCES
TEACHER_LOGITS = ('auto', 'cached', 'online')
# How the training split is read: held in memory, or streamed from disk
# batch by batch (kd_jax/streaming.py).
INPUTS = ('memory', 'stream')
MAX_UNROLLED_STEPS = 64


def _valid_stages(value: str) -> bool:
  names = stages.parse_stages(value)
  return bool(names) and len(set(names)) == len(names) and all(
      s in stages.STAGES for s in names)


def _valid_terms(value: str) -> bool:
  names = fields.parse_list(value)
  return bool(names) and len(set(names)) == len(names) and all(
      n in methods.TERMS for n in names)


def _model_fields(role: str) -> dict[str, fields.Field]:
  return {
      f'{role}.model': fields.one_of(models.MODELS),
      f'{role}.num_classes': fields.int_at_least(2),
      f'{role}.epochs': fields.int_at_least(1),
      **{f'{role}.optimizer.{name}': setting.field
         for name, setting in optimizers.SETTINGS.items()},
  }


FIELDS: dict[str, fields.Field] = {
    'name': fields.Field(str, bool, 'a non-empty string'),
    'seed': fields.int_at_least(0),
    'dataset': fields.one_of(data.DATASETS),
    'data_source': fields.one_of(DATA_SOURCES),
    'data_dir': fields.text('a directory path, or "" for none'),
    'data_url': fields.Field(
        str, lambda v: not v or v.startswith(('http://', 'https://',
                                              'file://')),
        'the http(s):// or file:// URL of a directory holding the dataset\'s'
        ' official files, or "" for the canonical mirror'),
    'train_limit': fields.int_at_least(0),
    'test_limit': fields.int_at_least(0),
    'validation_size': fields.int_at_least(0),
    'num_seeds': fields.int_at_least(1),
    'batch_size': fields.int_at_least(1),
    'num_devices': fields.int_at_least(0),
    'precision': fields.one_of(precision.PRECISIONS),
    'eval_batch_size': fields.int_at_least(1),
    'loop': fields.one_of(loop.LOOPS),
    'input': fields.one_of(INPUTS),
    'steps_per_chunk': fields.int_at_least(0),
    'scan_unroll': fields.boolean(),
    'checkpoint_every_steps': fields.int_at_least(0),
    'checkpoints_to_keep': fields.int_at_least(1),
    'plots': fields.boolean(),
    'stages': fields.Field(str, _valid_stages,
                           'a comma-separated list of distinct stages from '
                           + ', '.join(stages.STAGES)),
    **_model_fields('teacher'),
    'teacher.checkpoint': fields.text('a checkpoint directory, or "" for '
                                      'none'),
    **_model_fields('student'),
    'distill.method': fields.one_of(methods.METHODS),
    'distill.terms': fields.Field(
        str, _valid_terms, 'comma-separated distinct terms from '
        + ', '.join(methods.TERMS)),
    'distill.teacher_logits': fields.one_of(TEACHER_LOGITS),
    **{f'augment.{name}': setting.field
       for name, setting in augment.SETTINGS.items()},
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


def _sections(flat: Mapping[str, Any]) -> list[str]:
  """The method and term sections `config.distill` must have (known names
  only; unknown ones are reported by their fields)."""
  names = [n for n in fields.parse_list(str(flat.get('distill.terms', '')))
           if n in methods.TERMS]
  method = methods.METHODS.get(flat.get('distill.method'))
  if method is not None and method.settings:
    names.append(method.name)
  return list(dict.fromkeys(names))


def schema(flat: Mapping[str, Any]) -> dict[str, fields.Field]:
  """`FIELDS` plus the fields of the distil sections this config uses."""
  full = dict(FIELDS)
  for name in _sections(flat):
    full.update({f'distill.{name}.{setting}': spec.field for setting, spec in
                 methods.RECORDS[name].settings.items()})
  return full


def field_names() -> list[str]:
  """Every field any config may have: `FIELDS` and every method's settings."""
  return list(FIELDS) + [f'distill.{name}.{setting}' for name, record in
                         methods.RECORDS.items() for setting in record.settings]


def closest_field(name: str) -> str | None:
  """The known field most like `name` (a misspelling, or a field that moved
  into a method's section), or None."""
  leaf = name.split('.')[-1]
  candidates = [f for f in field_names() if difflib.get_close_matches(
      leaf, [f.split('.')[-1]], cutoff=0.8)]
  close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
  return close[0] if close else None


def _unknown_fields(names: list[str], flat: Mapping[str, Any]) -> list[str]:
  """One line per unknown field, naming the closest known one; one line per
  section of a known method that this config does not use."""
  used = set(_sections(flat))
  unused = sorted({n.split('.')[1] for n in names if n.count('.') == 2
                   and n.startswith('distill.') and n.split('.')[1]
                   in methods.RECORDS and n.split('.')[1] not in used})
  problems = [
      f'config.distill.{section}: the section of {section!r}, which this '
      f'config does not use (config.distill.method = '
      f'{flat.get("distill.method")!r}, config.distill.terms = '
      f'{flat.get("distill.terms")!r}); remove it or add {section!r} to '
      'config.distill.terms' for section in unused]
  for name in names:
    if name.count('.') == 2 and name.split('.')[1] in unused:
      continue
    close = closest_field(name)
    problems.append(f'config.{name}: unknown field' + (
        f'; did you mean config.{close}?' if close else
        ' (known fields: see kd_jax/validation.py FIELDS and the methods\' '
        'settings)'))
  return problems


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.UserInputError` listing every invalid field of `config`.

  Checks each field's presence, type and range (`schema`), unknown fields,
  and the rules between fields (e.g. teacher and student predict the same
  classes, which cover the dataset's labels; each method's own `check`).
  """
  flat = flatten(config.to_dict())
  known = schema(flat)
  problems = _unknown_fields(sorted(set(flat) - set(known)), flat)
  for name, field in known.items():
    if name not in flat:
      section = name.split('.')[1] if (
          name.count('.') == 2 and name.startswith('distill.')) else None
      problems.append(
          f'config.{name}: missing; expected {field.allowed}' + (
              f' (config.distill.{section} = '
              f'kd_jax.methods.default_section({section!r}) has every '
              'setting at its default)' if section else ''))
    else:
      problems.append(field.problem(name, flat[name]))
  problems = [p for p in problems if p]
  if not problems:
    problems.extend(_cross_field_problems(config, flat))
  if problems:
    raise errors.UserInputError('invalid config:\n  ' + '\n  '.join(problems))


def _cross_field_problems(config: ml_collections.ConfigDict,
                          flat: Mapping[str, Any]) -> list[str]:
  problems = []
  if flat['scan_unroll'] and not (
      1 <= flat['steps_per_chunk'] <= MAX_UNROLLED_STEPS):
    problems.append(
        f'config.steps_per_chunk = {flat["steps_per_chunk"]} with '
        'config.scan_unroll = True: each chunk compiles as straight-line '
        f'code; expected 1 to {MAX_UNROLLED_STEPS} (or scan_unroll = False)')
  loaded = fields.parse_list(flat['teacher.checkpoint'])
  if loaded and 'teacher' in stages.parse_stages(flat['stages']):
    problems.append(
        f'config.teacher.checkpoint = {flat["teacher.checkpoint"]!r} with '
        f'config.stages = {flat["stages"]!r}: a loaded teacher is not trained;'
        ' remove "teacher" from config.stages')
  problems.extend(_method_problems(config, flat, loaded))
  problems.extend(_streaming_problems(config, flat))
  problems.extend(_augment_problems(config, flat))
  for role in ('teacher', 'student'):
    problems.extend(optimizers.problems(
        config[role].optimizer, f'{role}.optimizer',
        epochs=config[role].epochs))
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


def _method_problems(config: ml_collections.ConfigDict,
                     flat: Mapping[str, Any],
                     loaded: tuple[str, ...]) -> list[str]:
  """The method's and terms' own rules, and how they fit together."""
  distill = config.distill
  method = methods.METHODS[distill.method]
  terms = [methods.TERMS[n] for n in methods.term_names(distill)]
  problems = []
  if method.loss and method.name not in methods.term_names(distill):
    problems.append(
        f'config.distill.method = {method.name!r} but config.distill.terms = '
        f'{distill.terms!r} leaves out its term {method.name!r} (its paper '
        f'uses {",".join(method.terms)})')
  for record in {r.name: r for r in [method, *terms]}.values():
    if record.settings:
      problems.extend(record.check(distill[record.name], flat))
  if not method.several_teachers and len(loaded) > 1:
    problems.append(
        f'config.teacher.checkpoint names {len(loaded)} teachers: method '
        f'{method.name!r} distils from one')
  for record in terms:
    owner = methods.preparing_method(record)
    if owner is not None and owner is not method:
      problems.append(
          f'config.distill.terms: term {record.name!r} needs what the '
          f'preparation stage of method {owner.name!r} trains '
          f'({record.prepared_by}); set config.distill.method = '
          f'{owner.name!r}')
    if record.reads_teacher and (record.several_teachers
                                 != method.several_teachers):
      problems.append(
          f'config.distill.terms: term {record.name!r} reads '
          + ('several teachers\' logits' if record.several_teachers
             else 'one teacher\'s outputs')
          + f', but method {method.name!r} distils from '
          + ('several' if method.several_teachers else 'one'))
  return problems


def _augment_problems(config: ml_collections.ConfigDict,
                      flat: Mapping[str, Any]) -> list[str]:
  """Augmented batches need the teacher run on them, inside the step."""
  if augment.AugmentSettings.from_section(config.augment).is_identity:
    return []
  if flat['distill.teacher_logits'] == 'cached':
    return ["config.distill.teacher_logits = 'cached' with config.augment on:"
            ' cached logits are of the un-augmented images; use \'online\' '
            "or 'auto' (which runs the teacher on each augmented batch)"]
  return []


def _streaming_problems(config: ml_collections.ConfigDict,
                        flat: Mapping[str, Any]) -> list[str]:
  """What a streamed training split (never in memory) cannot do."""
  if flat['input'] != 'stream':
    return []
  problems = []
  info = data.DATASETS[flat['dataset']]
  if info.layout and flat['data_source'] != 'tfds':
    problems.append(
        f"config.input = 'stream' with config.dataset = {flat['dataset']!r}: "
        f'streaming reads IDX files or TFDS data, and {info.title} comes as a '
        "python archive; set config.input = 'memory' (or config.data_source "
        "= 'tfds')")
  elif flat['data_source'] == 'download':
    problems.append(
        "config.input = 'stream' with config.data_source = 'download': "
        "streaming does not download; run once with config.input = 'memory' "
        '(which downloads into the cache it reports), then stream with '
        'config.data_dir set to that directory')
  if flat['loop'] != 'python':
    problems.append(
        f"config.input = 'stream' with config.loop = {flat['loop']!r}: the "
        "scan loop holds the training split on device; set config.loop = "
        "'python'")
  if methods.method_of(config).several_teachers:
    problems.append(
        f"config.input = 'stream' with config.distill.method = "
        f"{flat['distill.method']!r}: its teachers' logits are cached for the "
        "whole training split; use config.input = 'memory'")
  elif flat['distill.teacher_logits'] == 'cached':
    problems.append(
        "config.input = 'stream' with config.distill.teacher_logits = "
        "'cached': a cache holds logits for the whole training split; set "
        "it to 'online' or 'auto'")
  return problems
