"""The three-stage KD experiment: teacher, distilled student, student from scratch.

`run(config, workdir)` is everything `run.py` does after parsing flags. It
writes under `workdir`:

  config.json       the resolved config
  metrics.jsonl     one JSON line per stage and epoch (train and test metrics)
  <stage>.msgpack   the final parameters of each stage (Flax serialization)
  results.json      `teacher_accuracy`, `distilled_accuracy`, `scratch_accuracy`
                    (test fractions) and per-stage details
  results.md        the same as a Markdown table

A stage whose parameters and result are already in the workdir is not run
again: re-running a finished or partly finished command resumes at the first
unfinished stage. A workdir written with a different config is refused.
"""

from collections.abc import Mapping
import datetime
import json
import os
import time
from typing import Any

from absl import logging
import flax.serialization
import jax
import ml_collections

from kd_jax import data as data_lib
from kd_jax import errors
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
          '--workdir, or delete this one to start over')


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

  def params_path(self, stage: str) -> str:
    return self.file(f'{stage}.msgpack')

  def load_results(self) -> dict[str, Any]:
    path = self.file('results.json')
    return _read_json(path) if os.path.exists(path) else {'stages': {}}

  def save_params(self, stage: str, params) -> None:
    _write_atomic(self.params_path(stage),
                  flax.serialization.to_bytes(jax.device_get(params)))

  def load_params(self, stage: str, template):
    path = self.params_path(stage)
    try:
      with open(path, 'rb') as f:
        return flax.serialization.from_bytes(template, f.read())
    except Exception as e:  # msgpack and Flax raise many kinds here.
      raise errors.UserInputError(
          f'{path}: cannot restore {stage} parameters for the configured '
          f'model ({type(e).__name__}: {e})') from e

  def start_stage_metrics(self, stage: str) -> None:
    """Drops metric lines of an earlier, unfinished attempt at `stage`."""
    path = self.file('metrics.jsonl')
    if not os.path.exists(path):
      return
    with open(path) as f:
      kept = [line for line in f if json.loads(line).get('stage') != stage]
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
  cache was computed on and the teacher is deterministic in inference mode.
  kd_jax has no data augmentation yet, so `'auto'` always caches; an
  augmenting pipeline must make `'auto'` choose `'online'`.
  """
  return config.distill.teacher_logits in ('auto', 'cached')


def _stage_done(workdir: _Workdir, results: Mapping[str, Any],
                stage: str) -> bool:
  return (stage in results['stages'] and
          os.path.exists(workdir.params_path(stage)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Validates `config`, runs its stages in `workdir`, returns the results.

  Args:
    config: an experiment config (see `experiments/seed.py`), validated here
      before anything else happens.
    workdir: directory for every output of the run (created if needed).

  Returns:
    The contents of `results.json`.

  Raises:
    errors.UserInputError: invalid config, data or workdir, before training.
  """
  validation.validate(config)
  requested = validation.parse_stages(config.stages)
  stages = [stage for stage in validation.STAGES if stage in requested]
  check_workdir(config, workdir)
  wd = _Workdir(workdir)
  results = wd.load_results()
  if ('distill' in stages and 'teacher' not in stages
      and not _stage_done(wd, results, 'teacher')):
    raise errors.UserInputError(
        f'config.stages = {config.stages!r}: distill needs a teacher, and '
        f'{workdir} has no finished teacher stage; add "teacher" to '
        'config.stages')

  dataset = data_lib.load_dataset(
      config.dataset, data_dir=config.data_dir or None,
      source=config.data_source, train_limit=config.train_limit or None,
      test_limit=config.test_limit or None)
  _check_labels(dataset, config.teacher.num_classes)
  record_config(config, workdir)
  image_shape = dataset.train.images.shape[1:]
  logging.info('data: %s (%d train, %d test)', dataset.source,
               len(dataset.train.labels), len(dataset.test.labels))
  results.update(dataset=dataset.name, data_source=dataset.source,
                 seed=config.seed)

  base_rng = jax.random.PRNGKey(config.seed)
  teacher_rng, student_rng = jax.random.fold_in(base_rng, 0), jax.random.fold_in(
      base_rng, 1)
  teacher_model = _make_model(config.teacher)
  student_model = _make_model(config.student)

  def new_state(stage: str):
    if stage == 'teacher':
      return train.create_train_state(teacher_model, teacher_rng, image_shape,
                                      config.teacher.learning_rate)
    # Both students start from the same initialisation, so the comparison
    # isolates the effect of the teacher.
    return train.create_train_state(student_model, student_rng, image_shape,
                                    config.student.learning_rate)

  teacher_variables = None
  if 'distill' in stages and _stage_done(wd, results, 'teacher'):
    template = models.init_params(teacher_model, teacher_rng, image_shape)
    teacher_variables = {'params': wd.load_params('teacher', template)}

  for stage in stages:
    if _stage_done(wd, results, stage):
      logging.info('stage %s: already finished in %s, reusing it', stage,
                   workdir)
      continue
    state = new_state(stage)
    model_config = config.teacher if stage == 'teacher' else config.student
    wd.start_stage_metrics(stage)
    start = time.perf_counter()
    step, step_args, extras, cache_seconds = train.train_step, (), {}, 0.0
    if stage == 'distill':
      step = train.distill_step_with(
          teacher_model.apply, alpha=config.distill.alpha,
          temperature=config.distill.temperature,
          t2_scaling=config.distill.t2_scaling, form=config.distill.form)
      if use_teacher_cache(config):
        extras['teacher_logits'] = train.predict_logits(
            teacher_model.apply, teacher_variables, dataset.train,
            config.eval_batch_size)
        jax.block_until_ready(extras['teacher_logits'])
        cache_seconds = time.perf_counter() - start
        logging.info('cached teacher logits %s in %.1f s',
                     extras['teacher_logits'].shape, cache_seconds)
      else:
        step_args = (teacher_variables,)
    state, test_metrics = train.fit(
        state, step, dataset, stage=stage, epochs=model_config.epochs,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        seed=config.seed, step_args=step_args, train_extras=extras,
        loop=config.loop, steps_per_chunk=config.steps_per_chunk,
        scan_unroll=config.scan_unroll,
        on_epoch_end=wd.append_metrics)
    wall = time.perf_counter() - start
    wd.save_params(stage, state.params)
    if stage == 'teacher':
      teacher_variables = {'params': state.params}
    results['stages'][stage] = {
        'model': model_config.model,
        'params': models.count_params(state.params),
        'epochs': model_config.epochs,
        'test_accuracy': test_metrics['accuracy'],
        'test_loss': test_metrics['loss'],
        'wall_time_s': round(wall, 2),
    }
    if stage == 'distill':
      results['stages'][stage]['teacher_logits'] = (
          'cached' if use_teacher_cache(config) else 'online')
      results['stages'][stage]['teacher_cache_s'] = round(cache_seconds, 2)
    results[RESULT_KEYS[stage]] = test_metrics['accuracy']
    results['updated'] = datetime.datetime.now().isoformat(timespec='seconds')
    _write_atomic(wd.file('results.json'),
                  json.dumps(results, indent=2, sort_keys=True) + '\n')
    logging.info('stage %s: test accuracy %.4f (%.1f s)', stage,
                 test_metrics['accuracy'], wall)

  table = results_table(results, config)
  _write_atomic(wd.file('results.md'), table)
  return results


def results_table(results: Mapping[str, Any],
                  config: ml_collections.ConfigDict) -> str:
  """A Markdown table of each finished stage, with how it was produced."""
  rows = ['| stage | model | params | epochs | test accuracy | wall time |',
          '|---|---|---:|---:|---:|---:|']
  for stage in STAGE_TITLES:
    info = results['stages'].get(stage)
    if info is None:
      continue
    rows.append(
        f'| {STAGE_TITLES[stage]} | {info["model"]} | {info["params"]:,} | '
        f'{info["epochs"]} | {100 * info["test_accuracy"]:.2f}% | '
        f'{info["wall_time_s"]:.1f} s |')
  d = config.distill
  footer = (
      f'\nExperiment `{config.name}` on {results.get("dataset")} '
      f'({results.get("data_source")}), seed {config.seed}, batch '
      f'{config.batch_size}; distillation alpha={d.alpha}, T={d.temperature}, '
      f'T^2 scaling {"on" if d.t2_scaling else "off"}, form {d.form}. '
      f'Test accuracy after the last epoch; wall time includes compilation '
      f'and per-epoch evaluation.\n')
  return '\n'.join(rows) + '\n' + footer
