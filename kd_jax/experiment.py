"""The KD experiment: teacher, distilled student, student from scratch.

`run(config, workdir)` is everything `run.py` does after parsing flags. The
stages (see `stage_plan`) are the teacher, then a chain of distilled stages
ending with the student (one link for most methods; `takd` puts teacher
assistants in between, `born_again` earlier generations of the teacher's
architecture), then the student trained from scratch. It writes under
`workdir`, and nowhere else:

  config.json          the resolved config
  metrics.jsonl        one JSON line per stage and epoch (train and test)
  checkpoints/<stage>/ orbax checkpoints of each stage's train state, every
                       `config.checkpoint_every_steps` steps and at each
                       epoch's end; the newest is the stage's final state
  results.json         `teacher_accuracy`, `distilled_accuracy`,
                       `scratch_accuracy` (test fractions; `<stage>_accuracy`
                       for assistants and generations) and per-stage details
  results.md           the same as a Markdown table

Re-running the same command resumes: finished stages are reused, and an
unfinished one continues from its newest checkpoint, exactly as if it had not
stopped (data order and randomness are functions of seed, epoch and step). A
workdir written with a different config is refused unless `start_over`.
"""

from collections.abc import Mapping
import dataclasses
import datetime
import functools
import json
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from kd_jax import checkpoints as checkpoints_lib
from kd_jax import data as data_lib
from kd_jax import calibration
from kd_jax import errors
from kd_jax import logs
from kd_jax import methods
from kd_jax import models
from kd_jax import parallel
from kd_jax import streaming
from kd_jax import train
from kd_jax import validation

RESULT_KEYS = {
    'teacher': 'teacher_accuracy',
    'distill': 'distilled_accuracy',
    'scratch': 'scratch_accuracy',
}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of an experiment.

  Attributes:
    name: its name in the workdir (checkpoints/<name>/, results.json):
      teacher, assistant<i>, generation<i>, distill or scratch.
    title: its row title in results tables.
    model: the `kd_jax.models` name of the network it trains.
    teachers: the stages it distils from (several for `multi_teacher`); empty
      for hard labels only.
    rng_index: `jax.random.fold_in(PRNGKey(seed), rng_index)` seeds its init
      and dropout; distill and scratch share 1, so the two students start
      from the same initialisation and the comparison isolates the teacher.
  """
  name: str
  title: str
  model: str
  teachers: tuple[str, ...]
  rng_index: int


def stage_plan(config: ml_collections.ConfigDict) -> list[Stage]:
  """The stages `config` runs, in order (a validated config).

  `config.stages` picks among teacher, distill and scratch; "distill" brings
  the whole chain: for `takd`, the teacher assistants of
  `distill.assistant_models` (each distilled from the one before); for
  `born_again`, generations 1 .. `distill.generations` - 1 of the teacher's
  architecture, the student being the last generation. For `multi_teacher`
  without `teacher.checkpoint`, "teacher" trains `distill.num_teachers`
  teachers (teacher, teacher2, ...) that differ only in initialisation.
  """
  requested = validation.parse_stages(config.stages)
  method = config.distill.method
  student = config.student.model
  chain = []
  if method == 'takd':
    chain = [(f'assistant{i}', f'assistant {i}', model) for i, model in
             enumerate(validation.parse_list(config.distill.assistant_models),
                       start=1)]
  elif method == 'born_again':
    chain = [(f'generation{i}', f'generation {i}', config.teacher.model)
             for i in range(1, config.distill.generations)]
  distill_title = 'student, distilled'
  if method == 'born_again':
    distill_title += f' (generation {config.distill.generations})'
  teachers = teacher_stages(config)
  plan = list(teachers) if 'teacher' in requested else []
  if 'distill' in requested:
    previous = tuple(t.name for t in teachers) if method == 'multi_teacher' else (
        'teacher',)
    for i, (name, title, model) in enumerate(chain):
      plan.append(Stage(name, title, model, previous, 2 + i))
      previous = (name,)
    plan.append(Stage('distill', distill_title, student, previous, 1))
  if 'scratch' in requested:
    plan.append(Stage('scratch', 'student, from scratch', student, (), 1))
  return plan


def teacher_stages(config: ml_collections.ConfigDict) -> list[Stage]:
  """The teacher stages: one, or `distill.num_teachers` for `multi_teacher`
  trained here (their inits differ; the data order is the same)."""
  count = 1
  if (config.distill.method == 'multi_teacher'
      and not validation.parse_list(config.teacher.checkpoint)):
    count = config.distill.num_teachers
  return [Stage('teacher', 'teacher', config.teacher.model, (), 0)] + [
      Stage(f'teacher{k}', f'teacher {k}', config.teacher.model, (),
            _TEACHER_RNG_BASE + k) for k in range(2, count + 1)]


# fold_in indices of teachers 2, 3, ...; far from those of the chain (2, 3...).
_TEACHER_RNG_BASE = 1000


def result_key(stage: str) -> str:
  """The results.json key of `stage`'s test accuracy."""
  return RESULT_KEYS.get(stage, f'{stage}_accuracy')


# Fields that may change between runs in one workdir: which stages to run
# does not change what any stage computes.
_RERUNNABLE_FIELDS = ('stages', 'name', 'num_seeds')
# Fields added after workdirs were first written: an older config.json
# without them ran with these values.
ADDED_FIELD_DEFAULTS = {'num_devices': 0, 'precision': 'float32',
                        'input': 'memory'}
# The config sections that a workdir running only one stage never reads.
_UNUSED_SECTIONS = {'teacher': ('student', 'distill'),
                    'scratch': ('teacher', 'distill')}


def _write_atomic(path: str, payload: bytes | str) -> None:
  """Writes `payload` to `path` through a temporary file and a rename."""
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(payload.encode() if isinstance(payload, str) else payload)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.UserInputError(
        f'{path}: cannot read it as JSON ({e}); move the workdir aside or '
        'choose another --workdir') from e


def _differing_fields(old: Any, new: Any, prefix: str = '') -> list[str]:
  """Dotted names of the fields that differ between two nested dicts."""
  if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
    return [] if old == new else [prefix.rstrip('.')]
  names = []
  for key in sorted(set(old) | set(new)):
    if f'{prefix}{key}' in _RERUNNABLE_FIELDS:
      continue
    names += _differing_fields(old.get(key), new.get(key), f'{prefix}{key}.')
  return names


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a `workdir` that holds a run with another config; writes nothing.

  Fields that do not change what is computed are not compared (`name`,
  `stages`, `num_seeds`), nor, when both runs train only the teacher (or
  only the student from scratch), the sections that stage never reads:
  a sweep shares such workdirs between points.

  Raises:
    errors.UserInputError: `workdir` is not a directory, or its config.json
      differs from `config` (the message names the differing fields).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserInputError(f'--workdir={workdir}: exists and is not a '
                                'directory')
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    old, new = _read_json(path), _config_dict(config)
    for field, default in ADDED_FIELD_DEFAULTS.items():
      old.setdefault(field, default)
    stages = {validation.parse_stages(old.get('stages', ''))} | {
        validation.parse_stages(new['stages'])}
    if len(stages) == 1 and (only := stages.pop()) and len(only) == 1:
      for section in _UNUSED_SECTIONS.get(only[0], ()):
        old.pop(section, None)
        new.pop(section, None)
    differing = _differing_fields(old, new)
    if differing:
      raise errors.UserInputError(
          f'--workdir={workdir} holds a run with a different config (fields: '
          f'{", ".join("config." + f for f in differing)}); use another '
          '--workdir, or pass --start_over to replace that run')


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates `workdir` and writes the resolved config to its config.json."""
  os.makedirs(workdir, exist_ok=True)
  _write_atomic(os.path.join(workdir, 'config.json'),
                json.dumps(_config_dict(config), indent=2, sort_keys=True) + '\n')


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The configured dataset, `config.validation_size` examples held out.

  With `config.input = 'stream'` the training split is a
  `streaming.StreamingSplit` (read from disk batch by batch; its labels were
  checked against the dataset's classes while opening it) and the test and
  validation splits are read into memory; the examples are the same as
  in memory.

  Raises:
    errors.UserInputError: missing or malformed data, labels beyond the
      configured classes, validation_size too large.
  """
  limits = dict(train_limit=config.train_limit or None,
                test_limit=config.test_limit or None)
  if config.input == 'stream':
    streamed = streaming.load_streaming_dataset(
        config.dataset, data_dir=config.data_dir or None,
        source='tfds' if config.data_source == 'tfds' else 'idx',
        validation_size=config.validation_size, **limits)
    dataset = data_lib.Dataset(
        name=streamed.name, train=streamed.train, test=streamed.test.load(),
        num_classes=streamed.num_classes,
        source=f'{streamed.source}, training split streamed',
        validation=streamed.validation and streamed.validation.load())
    _check_labels(dataset, config.teacher.num_classes)
    return dataset
  dataset = data_lib.load_dataset(
      config.dataset, data_dir=config.data_dir or None,
      source=config.data_source, **limits)
  _check_labels(dataset, config.teacher.num_classes)
  if config.validation_size >= dataset.train.num_examples:
    raise errors.UserInputError(
        f'config.validation_size = {config.validation_size}: the training '
        f'split has only {dataset.train.num_examples} examples')
  return data_lib.hold_out_validation(dataset, config.validation_size)


def _check_labels(dataset: data_lib.Dataset, num_classes: int) -> None:
  """Labels of the in-memory splits must lie below `num_classes`."""
  for split_name, split in (('train', dataset.train), ('test', dataset.test),
                            ('validation', dataset.validation)):
    if not isinstance(split, data_lib.Split):
      continue  # Streamed, or no validation split.
    top = int(split.labels.max(initial=0))
    if top >= num_classes:
      raise errors.UserInputError(
          f'dataset {dataset.name!r} ({dataset.source}), {split_name} split: '
          f'label {top} needs at least {top + 1} classes but config.teacher/'
          f'student.num_classes = {num_classes}')


def _make_model(model_config: ml_collections.ConfigDict):
  return models.make_model(model_config.model,
                           num_classes=model_config.num_classes)


class _Workdir:
  """Reads and writes a run's files; a small helper for `run`.

  Every process of a multi-process run reads; only the one with `writes`
  (process 0) writes, so files are written once.
  """

  def __init__(self, path: str, *, writes: bool = True):
    self.path = path
    self.writes = writes
    self.tensorboard = logs.TensorBoardWriter(self.file('tensorboard'))

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def checkpoint_dir(self, stage: str) -> str:
    return self.file(os.path.join('checkpoints', stage))

  def load_results(self) -> dict[str, Any]:
    path = self.file('results.json')
    return _read_json(path) if os.path.exists(path) else {'stages': {}}

  def keep_stage_metrics(self, stage: str, epochs: int) -> None:
    """Keeps the metric lines of `stage`'s first `epochs` epochs only.

    Lines of epochs that a resumed stage will run again, and a line torn by
    a kill, are dropped (from TensorBoard's view too).
    """
    path = self.file('metrics.jsonl')
    if not self.writes or not os.path.exists(path):
      return
    if os.path.isdir(os.path.join(self.file('tensorboard'), stage)):
      self.tensorboard.resume(stage, epochs + 1)
    kept = []
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if record.get('stage') != stage or record.get('epoch', 0) <= epochs:
          kept.append(json.dumps(record) + '\n')
    _write_atomic(path, ''.join(kept))

  def append_metrics(self, stage: str, epoch: int,
                     train_metrics: Mapping[str, float],
                     test_metrics: Mapping[str, float]) -> None:
    """Adds one epoch's metrics to metrics.jsonl and TensorBoard (x = epoch)."""
    if not self.writes:
      return
    record = {'stage': stage, 'epoch': epoch + 1}
    record.update({f'train/{k}': v for k, v in train_metrics.items()})
    record.update({f'test/{k}': v for k, v in test_metrics.items()})
    with open(self.file('metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')
    self.tensorboard.write(stage, epoch + 1, {
        k: v for k, v in record.items() if '/' in k and k[-6:] != '/count'})


def use_teacher_cache(config: ml_collections.ConfigDict) -> bool:
  """Whether distillation reads precomputed teacher logits.

  Caching is exact when the student sees exactly the inputs the teacher's
  cache was computed on and the teacher is deterministic in inference mode;
  feature methods need the teacher's intermediate outputs, so never cache.
  kd_jax has no data augmentation yet, so `'auto'` caches unless the
  training split is streamed (a cache would hold logits for all of it); an
  augmenting pipeline must make `'auto'` choose `'online'`.
  """
  if config.input == 'stream':
    return False
  if config.distill.method in methods.FEATURE_METHODS:
    return False  # Features, not only logits, come from the teacher.
  if config.distill.method == 'multi_teacher':
    return True  # Several teachers are only ever cached.
  return config.distill.teacher_logits in ('auto', 'cached')


def distillation_objective(distill: ml_collections.ConfigDict):
  """The configured `(student_logits, teacher_logits, labels, *, weights) ->
  (loss, aux)` of `config.distill.method`, its settings bound."""
  if distill.method == 'multi_teacher':
    weights = validation.parse_list(distill.multi_teacher_weights)
    return functools.partial(
        methods.LOGIT_METHODS['multi_teacher'], alpha=distill.alpha,
        temperature=distill.temperature, t2_scaling=distill.t2_scaling,
        teacher_weights=(jax.numpy.asarray([float(w) for w in weights])
                         if weights else None))
  if distill.method == 'dkd':
    return functools.partial(
        methods.LOGIT_METHODS['dkd'], ce_weight=distill.dkd.ce_weight,
        alpha=distill.dkd.alpha, beta=distill.dkd.beta,
        temperature=distill.temperature)
  return functools.partial(
      methods.LOGIT_METHODS['kd'], alpha=distill.alpha,
      temperature=distill.temperature, t2_scaling=distill.t2_scaling,
      form=distill.form)


def feature_settings(distill: ml_collections.ConfigDict) -> dict[str, Any]:
  """`distill_step` keywords of a feature method (empty for logit methods),
  except FitNets' `regressor_apply_fn` (see `fitnets_regressor`)."""
  if distill.method not in methods.FEATURE_METHODS:
    return {}
  return {
      'feature_loss': methods.FEATURE_METHODS[distill.method],
      'student_layers': validation.parse_list(distill.features.student_layers),
      'teacher_layers': validation.parse_list(distill.features.teacher_layers),
      'feature_weight': distill.features.weight,
  }


def feature_shapes(model, rng: jax.Array, image_shape: tuple[int, ...],
                   layers: tuple[str, ...], *, role: str,
                   model_name: str) -> list[tuple[int, ...]]:
  """Shapes (batch axis dropped) of `layers`' outputs, from one forward pass
  on zeros.

  Raises:
    errors.UserInputError: a layer is not in the model (the message lists
      the layers it has).
  """
  variables = models.init_variables(model, rng, image_shape)
  images = jax.numpy.zeros((1, *image_shape))
  try:
    _, features, _ = train.forward_with_features(model.apply, variables,
                                                 images, layers, train=False)
  except ValueError as e:
    _, collections = model.apply(variables, images, capture_intermediates=True,
                                 mutable=['intermediates'])
    known = sorted(set(collections['intermediates']) - {'__call__'})
    raise errors.UserInputError(
        f'config.distill.features.{role}_layers = {",".join(layers)!r}: '
        f'{e.args[0].split(";")[0]}; the {role} model {model_name!r} has '
        f'{", ".join(known)}') from e
  return [tuple(f.shape[1:]) for f in features]


def fitnets_regressor(config: ml_collections.ConfigDict, teacher_model,
                      student_model, image_shape: tuple[int, ...]
                      ) -> tuple[models.HintRegressor | None,
                                 list[tuple[int, ...]]]:
  """Checks the feature layers of a feature method (before any work).

  Returns:
    For `fitnets`, the regressor mapping the student's layers to the
    teacher's shapes and the student's feature shapes; otherwise
    `(None, [])`.

  Raises:
    errors.UserInputError: a configured layer does not exist, or (fitnets)
      a student feature cannot be mapped to its teacher feature.
  """
  settings = feature_settings(config.distill)
  if not settings:
    return None, []
  rng = jax.random.PRNGKey(0)  # Shapes do not depend on the values.
  teacher_shapes = feature_shapes(
      teacher_model, rng, image_shape, settings['teacher_layers'],
      role='teacher', model_name=config.teacher.model)
  student_shapes = feature_shapes(
      student_model, rng, image_shape, settings['student_layers'],
      role='student', model_name=config.student.model)
  if config.distill.method != 'fitnets':
    return None, []
  for layer, s_shape, t_shape in zip(settings['student_layers'],
                                     student_shapes, teacher_shapes):
    problem = models.regressor_problem(s_shape, t_shape)
    if problem:
      raise errors.UserInputError(
          f'config.distill.features: student layer {layer!r}: {problem}')
  return models.HintRegressor(tuple(teacher_shapes)), student_shapes


def _stage_done(results: Mapping[str, Any], stage: str) -> bool:
  return stage in results['stages']


# What `run` writes in a workdir; `start_over` deletes these and nothing else.
OWN_FILES = ('config.json', 'metrics.jsonl', 'results.json', 'results.md',
             'checkpoints', 'tensorboard', 'plots')


def clear_workdir(workdir: str) -> None:
  """Deletes the files kd_jax wrote in `workdir` (`OWN_FILES`), no others."""
  for name in OWN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        start_over: bool = False) -> dict[str, Any]:
  """Validates `config`, runs its stages in `workdir`, returns the results.

  Args:
    config: an experiment config (see `experiments/seed.py`), validated here
      before anything else happens.
    workdir: directory for every output of the run (created if needed).
    start_over: first delete what an earlier run wrote in `workdir` (only
      `OWN_FILES`), even if its config differs.

  Returns:
    The contents of `results.json`.

  Raises:
    errors.UserInputError: invalid config, data, teacher checkpoint or
      workdir, before training.
    train.NonFiniteError: a stage diverged; its last good checkpoint stays.
  """
  validation.validate(config)
  plan = stage_plan(config)
  if start_over and os.path.isdir(workdir) and parallel.is_main_process():
    clear_workdir(workdir)
  parallel.sync('kd_jax workdir ready')
  check_workdir(config, workdir)
  wd = _Workdir(workdir, writes=parallel.is_main_process())
  results = wd.load_results()

  image_shape = data_lib.DATASETS[config.dataset].image_shape
  base_rng = jax.random.PRNGKey(config.seed)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch_size(config.batch_size, mesh, 'config.batch_size')
  parallel.check_batch_size(config.eval_batch_size, mesh,
                            'config.eval_batch_size')

  def model_of(stage: Stage):
    return models.make_model(stage.model,
                             num_classes=config.student.num_classes)

  teacher_stage, *_ = all_teachers = teacher_stages(config)
  stages_by_name = {stage.name: stage for stage in [*all_teachers, *plan]}
  frozen = {}  # Stage name -> variables of its final state.
  teacher_paths = validation.parse_list(config.teacher.checkpoint)
  if teacher_paths:
    template = models.init_variables(model_of(teacher_stage),
                                     jax.random.PRNGKey(0), image_shape)
    teachers = [checkpoints_lib.load_variables(
        path, template, what='config.teacher.checkpoint')
                for path in teacher_paths]
    frozen['teacher'] = teachers[0]
  else:
    planned = {stage.name for stage in plan}
    missing = sorted({name for stage in plan for name in stage.teachers
                      if name not in planned and not _stage_done(results,
                                                                 name)})
    if missing:
      raise errors.UserInputError(
          f'config.stages = {config.stages!r}: distill needs a teacher, and '
          f'{workdir} has no finished {", ".join(missing)} stage; add '
          '"teacher" to config.stages or set config.teacher.checkpoint')

  regressor, student_feature_shapes = fitnets_regressor(
      config, model_of(teacher_stage),
      models.make_model(config.student.model,
                        num_classes=config.student.num_classes), image_shape)
  dataset = load_data(config)
  if dataset.train.num_examples < config.batch_size:
    raise errors.UserInputError(
        f'config.batch_size = {config.batch_size}: the training split has '
        f'only {dataset.train.num_examples} examples')
  steps_per_epoch = data_lib.num_train_batches(dataset.train.num_examples,
                                               config.batch_size)
  if wd.writes:
    record_config(config, workdir)
  logging.info('data: %s (%d train, %d validation, %d test)', dataset.source,
               dataset.train.num_examples, config.validation_size,
               dataset.test.num_examples)
  results.update(dataset=dataset.name, data_source=dataset.source,
                 seed=config.seed)

  if teacher_paths and not _stage_done(results, 'teacher'):
    info = _external_teacher_result(config, model_of(teacher_stage), teachers,
                                    teacher_paths, dataset, mesh)
    if len(teachers) == 1:
      info['calibration'] = stage_calibration(
          model_of(teacher_stage), teachers[0], dataset,
          config.eval_batch_size, mesh)
    _record(wd, results, 'teacher', info)

  def new_state(stage: Stage) -> train.TrainState:
    model_config = config.teacher if stage.name == 'teacher' else config.student
    rng = jax.random.fold_in(base_rng, stage.rng_index)
    state = train.create_train_state(
        model_of(stage), rng, image_shape, train.learning_rate_schedule(
            model_config.learning_rate, model_config.schedule,
            model_config.epochs * steps_per_epoch), config.precision)
    if stage.name == 'distill' and regressor is not None:
      state = train.add_regressor(state, regressor.init(
          jax.random.fold_in(rng, 1),
          [jax.numpy.zeros((1, *shape)) for shape in student_feature_shapes]
      )['params'])
    return state

  def variables_of(name: str):
    if name not in frozen:
      stage = stages_by_name[name]
      frozen[name] = train.model_variables(
          _final_state(wd, config, name, new_state(stage)))
    return frozen[name]

  try:
    for stage in plan:
      if _stage_done(results, stage.name):
        logging.info('stage %s: already finished in %s, reusing it',
                     stage.name, workdir)
        continue
      teacher_model, ensemble = None, []
      if stage.teachers:
        teacher_model = model_of(stages_by_name[stage.teachers[0]])
        ensemble = (teachers if teacher_paths and stage.name == 'distill'
                    and config.distill.method == 'multi_teacher'
                    else [variables_of(name) for name in stage.teachers])
      info, state = _run_stage(stage, config, wd, dataset, new_state(stage),
                               teacher_model, ensemble, regressor, mesh)
      frozen[stage.name] = train.model_variables(state)
      info['calibration'] = stage_calibration(
          model_of(stage), frozen[stage.name], dataset, config.eval_batch_size,
          mesh)
      _record(wd, results, stage.name, info)
  finally:
    wd.tensorboard.close()

  # The tutorial's figure needs the teacher: drawn when this call has it in
  # memory (trained, loaded or taught with), not reloaded on every re-run.
  teacher_logits = None
  if 'teacher' in frozen:
    teacher_logits = model_of(teacher_stage).apply(
        frozen['teacher'], dataset.test.images[:1], train=False)[0]
  if wd.writes:
    write_plots(wd.file('plots'), read_metrics(wd.path), results,
                stage_titles(config), teacher_logits)
    _write_atomic(wd.file('results.md'), results_table(results, config))
  parallel.sync('kd_jax results written')
  return results


def _final_state(wd: _Workdir, config: ml_collections.ConfigDict, stage: str,
                 template: train.TrainState) -> train.TrainState:
  """The newest checkpoint of a finished `stage` in this workdir."""
  ckpt = checkpoints_lib.StageCheckpoints(wd.checkpoint_dir(stage),
                                          keep=config.checkpoints_to_keep)
  try:
    if ckpt.latest_step() is None:
      raise errors.UserInputError(
          f'{ckpt.directory}: the {stage} stage is recorded as finished in '
          'results.json but has no checkpoint; rerun with --start_over')
    return ckpt.restore(template)[0]
  finally:
    ckpt.close()


def _run_stage(stage: Stage, config: ml_collections.ConfigDict, wd: _Workdir,
               dataset: data_lib.Dataset, state: train.TrainState,
               teacher_model, teachers: list[Any],
               regressor: models.HintRegressor | None, mesh=None
               ) -> tuple[dict[str, Any], train.TrainState]:
  """Trains one stage from scratch or from its newest checkpoint.

  `teachers` holds the frozen teachers' variables (empty for a stage that
  learns from labels only): one, or several for `multi_teacher` (whose
  logits are always cached, stacked `(N, M, K)`). `regressor` is FitNets'
  (distill stage only).
  """
  model_config = config.teacher if stage.name == 'teacher' else config.student
  steps_per_epoch = data_lib.num_train_batches(dataset.train.num_examples,
                                               config.batch_size)
  ckpt = checkpoints_lib.StageCheckpoints(wd.checkpoint_dir(stage.name),
                                          keep=config.checkpoints_to_keep)
  resume_totals = None
  if ckpt.latest_step() is not None:
    state, resume_totals = ckpt.restore(state)
    logging.info('stage %s: resuming from the checkpoint at step %d',
                 stage.name, int(state.step))
  wd.keep_stage_metrics(stage.name, int(state.step) // steps_per_epoch)
  start = time.perf_counter()
  step, step_args, extras, cache_seconds = train.train_step, (), {}, 0.0
  cached = bool(stage.teachers) and use_teacher_cache(config)
  if stage.teachers:
    settings = feature_settings(config.distill)
    if stage.name == 'distill' and regressor is not None:
      settings['regressor_apply_fn'] = regressor.apply
    teacher_apply = train.compute_in(teacher_model.apply, config.precision)
    step = train.distill_step_with(
        teacher_apply, objective=distillation_objective(config.distill),
        **settings)
    if cached:
      logits = [train.predict_logits(teacher_apply, variables, dataset.train,
                                     config.eval_batch_size, mesh=mesh)
                for variables in teachers]
      extras['teacher_logits'] = jax.block_until_ready(
          jax.numpy.stack(logits, axis=1)
          if config.distill.method == 'multi_teacher' else logits[0])
      cache_seconds = time.perf_counter() - start
      logging.info('stage %s: cached teacher logits %s in %.1f s', stage.name,
                   extras['teacher_logits'].shape, cache_seconds)
    else:
      step_args = (teachers[0],)
  try:
    state, test_metrics = train.fit(
        state, step, dataset, stage=stage.name, epochs=model_config.epochs,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        seed=config.seed, step_args=step_args, train_extras=extras,
        loop=config.loop, steps_per_chunk=config.steps_per_chunk,
        scan_unroll=config.scan_unroll, checkpoints=ckpt,
        checkpoint_every_steps=config.checkpoint_every_steps,
        resume_totals=resume_totals, on_epoch_end=wd.append_metrics,
        mesh=mesh)
  finally:
    ckpt.close()
  info = {
      'model': stage.model,
      'params': models.count_params(train.model_params(state.params)),
      'epochs': model_config.epochs,
      'test_accuracy': test_metrics['accuracy'],
      'test_loss': test_metrics['loss'],
      'wall_time_s': round(time.perf_counter() - start, 2),
  }
  if stage.teachers:
    info['distilled_from'] = ','.join(stage.teachers)
    info['teacher_logits'] = 'cached' if cached else 'online'
    info['teacher_cache_s'] = round(cache_seconds, 2)
  if len(teachers) > 1:
    info['teacher_ensemble_accuracy'] = ensemble_accuracies(
        teacher_model, teachers, dataset.test, config.eval_batch_size,
        mesh)[0]
  if regressor is not None and stage.name == 'distill':
    info['regressor_params'] = models.count_params(
        state.params[models.REGRESSOR_KEY])
  return info, state


def _external_teacher_result(config, teacher_model, teachers, paths,
                             dataset, mesh) -> dict[str, Any]:
  """Results row of the teacher(s) loaded from `config.teacher.checkpoint`.

  For several teachers, `test_accuracy` is the ensemble's (mean softmax) and
  `member_accuracies` lists each one's.
  """
  info = {
      'model': config.teacher.model,
      'params': models.count_params(teachers[0]['params']),
      'checkpoint': ','.join(os.path.abspath(p) for p in paths),
  }
  if len(teachers) == 1:
    state = train.create_train_state(teacher_model, jax.random.PRNGKey(0),
                                     dataset.test.images.shape[1:], 1e-3)
    state = state.replace(params=teachers[0]['params'],
                          batch_stats=teachers[0].get('batch_stats', {}))
    test_metrics = train.evaluate(state, dataset.test, config.eval_batch_size,
                                  mesh)
    return {**info, 'test_accuracy': test_metrics['accuracy'],
            'test_loss': test_metrics['loss']}
  ensemble, members = ensemble_accuracies(teacher_model, teachers, dataset.test,
                                          config.eval_batch_size, mesh)
  return {**info, 'test_accuracy': ensemble, 'member_accuracies': members}


def stage_calibration(model, variables, dataset: data_lib.Dataset,
                      batch_size: int, mesh=None) -> dict[str, Any] | None:
  """Calibration of a trained network before and after temperature scaling.

  The temperature is fitted on `dataset.validation` (held out of training),
  and ECE / NLL are measured on the test split (see `kd_jax.calibration`).

  Returns:
    `calibration.calibration_report`'s numbers plus `'reliability'`: the
    test split's reliability bins before and after scaling (lists, for
    diagrams); None without a validation split.
  """
  if dataset.validation is None:
    return None
  logits = {name: np.asarray(train.predict_logits(
      model.apply, variables, split, batch_size, desc=f'{name} logits',
      mesh=mesh))
            for name, split in (('validation', dataset.validation),
                                ('test', dataset.test))}
  report = calibration.calibration_report(
      logits['validation'], dataset.validation.labels, logits['test'],
      dataset.test.labels)
  bins = lambda scale: {  # Empty bins' NaN becomes null (strict JSON).
      k: [None if x != x else x for x in np.asarray(v).tolist()]
      for k, v in calibration.reliability_bins(
          logits['test'] / scale, dataset.test.labels).items()}
  return {**report, 'reliability': {
      'before': bins(1.0), 'after': bins(report['temperature'])}}


def ensemble_accuracies(model, members: list[Any], split: data_lib.Split,
                        batch_size: int, mesh=None
                        ) -> tuple[float, list[float]]:
  """Accuracy on `split` of the ensemble of `members` (variables of `model`;
  their mean softmax decides), and of each member (inference split over
  `mesh`, if given)."""
  logits = jax.numpy.stack(
      [train.predict_logits(model.apply, variables, split, batch_size,
                            mesh=mesh)
       for variables in members], axis=1)
  labels = jax.numpy.asarray(split.labels)
  correct = lambda predicted: float(jax.numpy.mean(predicted == labels))
  return (correct(train.ensemble_prediction(logits)),
          [correct(train.ensemble_prediction(logits[:, m]))
           for m in range(len(members))])


def _record(wd: _Workdir, results: dict[str, Any], stage: str,
            info: dict[str, Any]) -> None:
  """Adds a finished stage to results.json (written atomically)."""
  results['stages'][stage] = info
  results[result_key(stage)] = info['test_accuracy']
  results['updated'] = datetime.datetime.now().isoformat(timespec='seconds')
  if wd.writes:
    _write_atomic(wd.file('results.json'),
                  json.dumps(results, indent=2, sort_keys=True) + '\n')
  logging.info('stage %s: test accuracy %.4f', stage, info['test_accuracy'])


def _method_summary(config: ml_collections.ConfigDict) -> str:
  """One sentence on the distillation settings, for a results table."""
  d = config.distill
  if d.method == 'dkd':
    soft = (f'DKD ce_weight={d.dkd.ce_weight}, alpha={d.dkd.alpha}, '
            f'beta={d.dkd.beta}, T={d.temperature}')
  else:
    soft = (f'alpha={d.alpha}, T={d.temperature}, T^2 scaling '
            f'{"on" if d.t2_scaling else "off"}, form {d.form}')
  extra = ''
  if d.method in methods.FEATURE_METHODS:
    extra = (f'; {d.method} on student {d.features.student_layers} / teacher '
             f'{d.features.teacher_layers}, weight {d.features.weight}')
  elif d.method == 'takd':
    extra = f'; assistants {d.assistant_models}'
  elif d.method == 'born_again':
    extra = f'; {d.generations} generations'
  return f'method {d.method}: {soft}{extra}'


def stage_titles(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Stage name -> title, for every stage `config` can have, in order."""
  titles = {stage.name: stage.title for stage in teacher_stages(config)}
  titles.update((stage.name, stage.title) for stage in stage_plan(config))
  return titles


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir`'s metrics.jsonl (one per stage and epoch);
  none if it has no such file."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_plots(directory: str, records: list[Mapping[str, Any]],
                results: Mapping[str, Any], titles: Mapping[str, str],
                teacher_logits=None) -> list[str]:
  """Figures of a finished run, as PNGs in `directory` (created if needed).

  training_curves.png (train and test accuracy and loss per epoch of every
  stage, from the metric `records` as `read_metrics` gives them),
  reliability.png (test reliability diagrams of each stage in `results`
  before temperature scaling, when calibration was measured) and
  tempered_softmax.png (the teacher's softmax at several temperatures on
  the first test image, the tutorial's figure, given `teacher_logits`
  `(K,)`). `titles` maps stage names to panel titles, in order.

  Returns:
    The paths written.
  """
  from kd_jax import plots  # pylint: disable=g-import-not-at-top
  written = []
  if records:
    written.append(plots.training_curves(
        os.path.join(directory, 'training_curves.png'), records))
  panels = []
  for name, title in titles.items():
    calib = (results['stages'].get(name) or {}).get('calibration')
    if calib:
      panels.append({'title': title, 'ece': calib['test_ece'],
                     **{k: np.asarray(v, float) for k, v in
                        calib['reliability']['before'].items()}})
  if panels:
    written.append(plots.reliability_diagram(
        os.path.join(directory, 'reliability.png'), panels))
  if teacher_logits is not None:
    written.append(plots.tempered_softmax_figure(
        os.path.join(directory, 'tempered_softmax.png'),
        np.asarray(teacher_logits)))
  return written


def results_table(results: Mapping[str, Any],
                  config: ml_collections.ConfigDict) -> str:
  """A Markdown table of each finished stage, with how it was produced."""
  rows = ['| stage | model | params | epochs | test accuracy | test ECE | '
          'test ECE, T-scaled (T) | wall time |',
          '|---|---|---:|---:|---:|---:|---:|---:|']
  for name, title in stage_titles(config).items():
    info = results['stages'].get(name)
    if info is None:
      continue
    epochs = info.get('epochs', 'loaded')
    wall = (f'{info["wall_time_s"]:.1f} s' if 'wall_time_s' in info
            else 'loaded')
    calib = info.get('calibration')
    ece = (f'{100 * calib["test_ece"]:.2f}% | '
           f'{100 * calib["test_ece_scaled"]:.2f}% '
           f'({calib["temperature"]:.2f})' if calib else 'n/a | n/a')
    rows.append(
        f'| {title} | {info["model"]} | {info["params"]:,} | '
        f'{epochs} | {100 * info["test_accuracy"]:.2f}% | {ece} | {wall} |')
  ensemble = results['stages'].get('distill', {}).get(
      'teacher_ensemble_accuracy')
  if ensemble is not None:
    rows.append(f'\nThe teachers\' ensemble (mean softmax): '
                f'{100 * ensemble:.2f}%.')
  footer = (
      f'\nExperiment `{config.name}` on {results.get("dataset")} '
      f'({results.get("data_source")}), seed {config.seed}, batch '
      f'{config.batch_size}; {_method_summary(config)}. Test accuracy after '
      'the last epoch (never the best epoch); ECE with 15 equal-width bins, '
      'T-scaled with the temperature T fitted on the '
      f'{config.validation_size} validation examples held out of training; '
      'wall time includes compilation and per-epoch evaluation.\n')
  return '\n'.join(rows) + '\n' + footer
