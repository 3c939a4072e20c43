"""The three-stage KD experiment: teacher, distilled student, student from scratch.

`run(config, workdir)` is everything `run.py` does after parsing flags. It
writes under `workdir`, and nowhere else:

  config.json          the resolved config
  metrics.jsonl        one JSON line per stage and epoch (train and test)
  checkpoints/<stage>/ orbax checkpoints of each stage's train state, every
                       `config.checkpoint_every_steps` steps and at each
                       epoch's end; the newest is the stage's final state
  results.json         `teacher_accuracy`, `distilled_accuracy`,
                       `scratch_accuracy` (test fractions) and per-stage details
  results.md           the same as a Markdown table

Re-running the same command resumes: finished stages are reused, and an
unfinished one continues from its newest checkpoint, exactly as if it had not
stopped (data order and randomness are functions of seed, epoch and step). A
workdir written with a different config is refused unless `start_over`.
"""

from collections.abc import Mapping
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

from kd_jax import checkpoints as checkpoints_lib
from kd_jax import data as data_lib
from kd_jax import errors
from kd_jax import methods
from kd_jax import models
from kd_jax import train
from kd_jax import validation

RESULT_KEYS = {
    'teacher': 'teacher_accuracy',
    'distill': 'distilled_accuracy',
    'scratch': 'scratch_accuracy',
}
STAGE_TITLES = {
    'teacher': 'teacher',
    'distill': 'student, distilled',
    'scratch': 'student, from scratch',
}
# Fields that may change between runs in one workdir: which stages to run
# does not change what any stage computes.
_RERUNNABLE_FIELDS = ('stages',)


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

  Raises:
    errors.UserInputError: `workdir` is not a directory, or its config.json
      differs from `config` (the message names the differing fields).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserInputError(f'--workdir={workdir}: exists and is not a '
                                'directory')
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    differing = _differing_fields(_read_json(path), _config_dict(config))
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


def _check_labels(dataset: data_lib.Dataset, num_classes: int) -> None:
  for split_name, split in (('train', dataset.train), ('test', dataset.test)):
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
  """Reads and writes a run's files; a small helper for `run`."""

  def __init__(self, path: str):
    self.path = path

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
    a kill, are dropped.
    """
    path = self.file('metrics.jsonl')
    if not os.path.exists(path):
      return
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
    record = {'stage': stage, 'epoch': epoch + 1}
    record.update({f'train/{k}': v for k, v in train_metrics.items()})
    record.update({f'test/{k}': v for k, v in test_metrics.items()})
    with open(self.file('metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')


def use_teacher_cache(config: ml_collections.ConfigDict) -> bool:
  """Whether distillation reads precomputed teacher logits.

  Caching is exact when the student sees exactly the inputs the teacher's
  cache was computed on and the teacher is deterministic in inference mode;
  feature methods need the teacher's intermediate outputs, so never cache.
  kd_jax has no data augmentation yet, so `'auto'` always caches; an
  augmenting pipeline must make `'auto'` choose `'online'`.
  """
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
  """`distill_step` keywords of a feature method (empty for kd and dkd)."""
  if distill.method not in methods.FEATURE_METHODS:
    return {}
  return {
      'feature_loss': methods.FEATURE_METHODS[distill.method],
      'student_layers': validation.parse_list(distill.features.student_layers),
      'teacher_layers': validation.parse_list(distill.features.teacher_layers),
      'feature_weight': distill.features.weight,
  }


def _check_feature_layers(config, teacher_model, student_model, teacher_rng,
                          student_rng, image_shape) -> None:
  """Runs both models once on zeros to check the configured layers exist."""
  settings = feature_settings(config.distill)
  if not settings:
    return
  for role, model, rng, layers in (
      ('teacher', teacher_model, teacher_rng, settings['teacher_layers']),
      ('student', student_model, student_rng, settings['student_layers'])):
    variables = models.init_variables(model, rng, image_shape)
    try:
      train.forward_with_features(model.apply, variables,
                                  jax.numpy.zeros((1, *image_shape)), layers,
                                  train=False)
    except ValueError as e:
      _, collections = model.apply(
          variables, jax.numpy.zeros((1, *image_shape)),
          capture_intermediates=True, mutable=['intermediates'])
      known = sorted(set(collections['intermediates']) - {'__call__'})
      raise errors.UserInputError(
          f'config.distill.features.{role}_layers = {",".join(layers)!r}: '
          f'{e.args[0].split(";")[0]}; the {role} model '
          f'{getattr(config, role).model!r} has {", ".join(known)}') from e


def _stage_done(results: Mapping[str, Any], stage: str) -> bool:
  return stage in results['stages']


# What `run` writes in a workdir; `start_over` deletes these and nothing else.
OWN_FILES = ('config.json', 'metrics.jsonl', 'results.json', 'results.md',
             'checkpoints')


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
  requested = validation.parse_stages(config.stages)
  stages = [stage for stage in validation.STAGES if stage in requested]
  if start_over and os.path.isdir(workdir):
    clear_workdir(workdir)
  check_workdir(config, workdir)
  wd = _Workdir(workdir)
  results = wd.load_results()

  image_shape = data_lib.DATASETS[config.dataset].image_shape
  base_rng = jax.random.PRNGKey(config.seed)
  teacher_rng = jax.random.fold_in(base_rng, 0)
  # Both students start from the same initialisation, so the comparison
  # isolates the effect of the teacher.
  student_rng = jax.random.fold_in(base_rng, 1)
  teacher_model = _make_model(config.teacher)
  student_model = _make_model(config.student)
  teacher_variables = None
  teacher_paths = validation.parse_list(config.teacher.checkpoint)
  if teacher_paths:
    template = models.init_variables(teacher_model, teacher_rng, image_shape)
    teachers = [checkpoints_lib.load_variables(
        path, template, what='config.teacher.checkpoint')
                for path in teacher_paths]
    teacher_variables = teachers[0]
  elif 'distill' in stages and 'teacher' not in stages:
    if not _stage_done(results, 'teacher'):
      raise errors.UserInputError(
          f'config.stages = {config.stages!r}: distill needs a teacher, and '
          f'{workdir} has no finished teacher stage; add "teacher" to '
          'config.stages or set config.teacher.checkpoint')

  _check_feature_layers(config, teacher_model, student_model, teacher_rng,
                        student_rng, image_shape)
  dataset = data_lib.load_dataset(
      config.dataset, data_dir=config.data_dir or None,
      source=config.data_source, train_limit=config.train_limit or None,
      test_limit=config.test_limit or None)
  _check_labels(dataset, config.teacher.num_classes)
  if dataset.train.num_examples < config.batch_size:
    raise errors.UserInputError(
        f'config.batch_size = {config.batch_size}: the training split has '
        f'only {dataset.train.num_examples} examples')
  record_config(config, workdir)
  logging.info('data: %s (%d train, %d test)', dataset.source,
               dataset.train.num_examples, dataset.test.num_examples)
  results.update(dataset=dataset.name, data_source=dataset.source,
                 seed=config.seed)

  if teacher_paths and not _stage_done(results, 'teacher'):
    _record(wd, results, 'teacher', _external_teacher_result(
        config, teacher_model, teachers, teacher_paths, dataset))

  def new_state(stage: str) -> train.TrainState:
    if stage == 'teacher':
      return train.create_train_state(teacher_model, teacher_rng, image_shape,
                                      config.teacher.learning_rate)
    return train.create_train_state(student_model, student_rng, image_shape,
                                    config.student.learning_rate)

  for stage in stages:
    if stage == 'distill' and teacher_variables is None:
      teacher_variables = train.model_variables(_final_state(
          wd, config, 'teacher', new_state('teacher')))
    if _stage_done(results, stage):
      logging.info('stage %s: already finished in %s, reusing it', stage,
                   workdir)
      continue
    ensemble = teachers if config.distill.method == 'multi_teacher' else [
        teacher_variables]
    info, state = _run_stage(stage, config, wd, dataset, new_state(stage),
                             teacher_model, ensemble)
    if stage == 'teacher':
      teacher_variables = train.model_variables(state)
    _record(wd, results, stage, info)

  _write_atomic(wd.file('results.md'), results_table(results, config))
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


def _run_stage(stage: str, config: ml_collections.ConfigDict, wd: _Workdir,
               dataset: data_lib.Dataset, state: train.TrainState,
               teacher_model, teachers: list[Any]
               ) -> tuple[dict[str, Any], train.TrainState]:
  """Trains one stage from scratch or from its newest checkpoint.

  `teachers` holds the frozen teachers' variables: one, or several for
  `multi_teacher` (whose logits are always cached, stacked `(N, M, K)`).
  """
  model_config = config.teacher if stage == 'teacher' else config.student
  steps_per_epoch = data_lib.num_train_batches(dataset.train.num_examples,
                                               config.batch_size)
  ckpt = checkpoints_lib.StageCheckpoints(wd.checkpoint_dir(stage),
                                          keep=config.checkpoints_to_keep)
  resume_totals = None
  if ckpt.latest_step() is not None:
    state, resume_totals = ckpt.restore(state)
    logging.info('stage %s: resuming from the checkpoint at step %d', stage,
                 int(state.step))
  wd.keep_stage_metrics(stage, int(state.step) // steps_per_epoch)
  start = time.perf_counter()
  step, step_args, extras, cache_seconds = train.train_step, (), {}, 0.0
  if stage == 'distill':
    step = train.distill_step_with(
        teacher_model.apply, objective=distillation_objective(config.distill),
        **feature_settings(config.distill))
    if config.distill.method == 'multi_teacher':
      extras['teacher_logits'] = jax.block_until_ready(jax.numpy.stack(
          [train.predict_logits(teacher_model.apply, variables,
                                dataset.train, config.eval_batch_size)
           for variables in teachers], axis=1))
      cache_seconds = time.perf_counter() - start
    elif use_teacher_cache(config):
      extras['teacher_logits'] = jax.block_until_ready(train.predict_logits(
          teacher_model.apply, teachers[0], dataset.train,
          config.eval_batch_size))
      cache_seconds = time.perf_counter() - start
      logging.info('cached teacher logits %s in %.1f s',
                   extras['teacher_logits'].shape, cache_seconds)
    else:
      step_args = (teachers[0],)
  try:
    state, test_metrics = train.fit(
        state, step, dataset, stage=stage, epochs=model_config.epochs,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        seed=config.seed, step_args=step_args, train_extras=extras,
        loop=config.loop, steps_per_chunk=config.steps_per_chunk,
        scan_unroll=config.scan_unroll, checkpoints=ckpt,
        checkpoint_every_steps=config.checkpoint_every_steps,
        resume_totals=resume_totals, on_epoch_end=wd.append_metrics)
  finally:
    ckpt.close()
  info = {
      'model': model_config.model,
      'params': models.count_params(state.params),
      'epochs': model_config.epochs,
      'test_accuracy': test_metrics['accuracy'],
      'test_loss': test_metrics['loss'],
      'wall_time_s': round(time.perf_counter() - start, 2),
  }
  if stage == 'distill':
    info['teacher_logits'] = 'cached' if use_teacher_cache(config) else 'online'
    info['teacher_cache_s'] = round(cache_seconds, 2)
  return info, state


def _external_teacher_result(config, teacher_model, teachers, paths,
                             dataset) -> dict[str, Any]:
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
                                     dataset.train.images.shape[1:], 1e-3)
    state = state.replace(params=teachers[0]['params'],
                          batch_stats=teachers[0].get('batch_stats', {}))
    test_metrics = train.evaluate(state, dataset.test, config.eval_batch_size)
    return {**info, 'test_accuracy': test_metrics['accuracy'],
            'test_loss': test_metrics['loss']}
  test_logits = jax.numpy.stack(
      [train.predict_logits(teacher_model.apply, variables, dataset.test,
                            config.eval_batch_size) for variables in teachers],
      axis=1)
  labels = jax.numpy.asarray(dataset.test.labels)
  correct = lambda logits: float(jax.numpy.mean(
      train.ensemble_prediction(logits) == labels))
  return {**info, 'test_accuracy': correct(test_logits),
          'member_accuracies': [correct(test_logits[:, m])
                                for m in range(len(teachers))]}


def _record(wd: _Workdir, results: dict[str, Any], stage: str,
            info: dict[str, Any]) -> None:
  """Adds a finished stage to results.json (written atomically)."""
  results['stages'][stage] = info
  results[RESULT_KEYS[stage]] = info['test_accuracy']
  results['updated'] = datetime.datetime.now().isoformat(timespec='seconds')
  _write_atomic(wd.file('results.json'),
                json.dumps(results, indent=2, sort_keys=True) + '\n')
  logging.info('stage %s: test accuracy %.4f', stage, info['test_accuracy'])


def results_table(results: Mapping[str, Any],
                  config: ml_collections.ConfigDict) -> str:
  """A Markdown table of each finished stage, with how it was produced."""
  rows = ['| stage | model | params | epochs | test accuracy | wall time |',
          '|---|---|---:|---:|---:|---:|']
  for stage in STAGE_TITLES:
    info = results['stages'].get(stage)
    if info is None:
      continue
    epochs = info.get('epochs', 'loaded')
    wall = (f'{info["wall_time_s"]:.1f} s' if 'wall_time_s' in info
            else 'loaded')
    rows.append(
        f'| {STAGE_TITLES[stage]} | {info["model"]} | {info["params"]:,} | '
        f'{epochs} | {100 * info["test_accuracy"]:.2f}% | {wall} |')
  d = config.distill
  footer = (
      f'\nExperiment `{config.name}` on {results.get("dataset")} '
      f'({results.get("data_source")}), seed {config.seed}, batch '
      f'{config.batch_size}; distillation alpha={d.alpha}, T={d.temperature}, '
      f'T^2 scaling {"on" if d.t2_scaling else "off"}, form {d.form}. '
      f'Test accuracy after the last epoch; wall time includes compilation '
      f'and per-epoch evaluation.\n')
  return '\n'.join(rows) + '\n' + footer
