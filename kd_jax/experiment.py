"""The KD experiment: teacher, distilled student, student from scratch.

`run(config, workdir)` is everything `run.py` does after parsing flags: it
validates the config, plans the stages (`kd_jax.stages`), loads the data,
trains each stage that has not finished (`kd_jax.loop`), and writes
everything under the workdir (`kd_jax.workdir`) and nowhere else: config,
metrics, checkpoints, results and plots (`kd_jax.reports`).

Re-running the same command resumes: finished stages are reused, and an
unfinished one continues from its newest checkpoint, exactly as if it had not
stopped (data order and randomness are functions of seed, epoch and step). A
workdir written with a different config is refused unless `start_over`.
"""

import functools
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kd_jax import augment
from kd_jax import checkpoints as checkpoints_lib
from kd_jax import data as data_lib
from kd_jax import distil_setup
from kd_jax import errors
from kd_jax import loop
from kd_jax import methods
from kd_jax import models
from kd_jax import optimizers
from kd_jax import parallel
from kd_jax import precision
from kd_jax import provenance
from kd_jax import reports
from kd_jax import stages as stages_lib
from kd_jax import streaming
from kd_jax import train
from kd_jax import validation
from kd_jax import workdir as workdir_lib

Stage = stages_lib.Stage


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
      source=config.data_source, data_url=config.data_url, **limits)
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


def use_teacher_cache(config: ml_collections.ConfigDict,
                      num_teachers: int = 1) -> bool:
  """Whether a distilled stage reads precomputed teacher logits.

  Caching is exact when the student sees exactly the inputs the teacher's
  cache was computed on and the teacher is deterministic in inference mode;
  an objective that reads teacher layers needs the teacher run in the step.
  So `'auto'` caches unless the training batches are augmented (the teacher
  then runs on each augmented batch, the view the student sees), the
  training split is streamed (a cache would hold logits for all of it) or
  teacher layers are read. Several teachers are cached whenever that is
  exact, whatever `teacher_logits` says.
  """
  if (config.input == 'stream' or methods.teacher_layers(config.distill)
      or not augment.AugmentSettings.from_section(
          config.augment).is_identity):
    return False
  return num_teachers > 1 or config.distill.teacher_logits in ('auto',
                                                               'cached')


def run(config: ml_collections.ConfigDict, workdir: str, *,
        start_over: bool = False) -> dict[str, Any]:
  """Validates `config`, runs its stages in `workdir`, returns the results.

  Args:
    config: an experiment config (see `experiments/seed.py`), validated here
      before anything else happens.
    workdir: directory for every output of the run (created if needed).
    start_over: first delete what an earlier run wrote in `workdir` (only
      `workdir.OWN_FILES`), even if its config differs.

  Returns:
    The contents of `results.json`.

  Raises:
    errors.UserInputError: invalid config, data, teacher checkpoint or
      workdir, or a workdir another run holds (`workdir.WorkdirLock`, taken
      for the whole run), before training.
    loop.NonFiniteError: a stage diverged; its last good checkpoint stays.
  """
  validation.validate(config)
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    if parallel.is_main_process():
      lock.take_if_exists()
    return _run_locked(config, workdir, start_over, lock)
  finally:
    lock.release()


def _run_locked(config: ml_collections.ConfigDict, workdir: str,
                start_over: bool, lock: workdir_lib.WorkdirLock
                ) -> dict[str, Any]:
  """`run` with `workdir` locked (or, while it does not exist yet, locked as
  soon as the run makes it)."""
  plan = stages_lib.stage_plan(config)
  if start_over and os.path.isdir(workdir) and parallel.is_main_process():
    workdir_lib.clear_workdir(workdir)
  parallel.sync('kd_jax workdir ready')
  workdir_lib.check_workdir(config, workdir)
  wd = workdir_lib.Workdir(workdir, writes=parallel.is_main_process())
  results = wd.load_results()

  image_shape = data_lib.DATASETS[config.dataset].image_shape
  base_rng = jax.random.PRNGKey(config.seed)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch_size(config.batch_size, mesh, 'config.batch_size')
  parallel.check_batch_size(config.eval_batch_size, mesh,
                            'config.eval_batch_size')

  dataset_info = data_lib.DATASETS[config.dataset]

  def model_of(stage: Stage) -> nn.Module:
    # The dataset's normalisation is the model's first operation.
    return models.make_model(stage.model, input_mean=dataset_info.mean,
                             input_std=dataset_info.std,
                             num_classes=config.student.num_classes)

  teacher_stage, *_ = all_teachers = stages_lib.teacher_stages(config)
  stages_by_name = {stage.name: stage for stage in [*all_teachers, *plan]}
  frozen = {}  # Stage name -> variables of its final state.
  teacher_paths = stages_lib.loaded_teachers(config)
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
                      if name not in planned
                      and name not in results['stages']})
    if missing:
      raise errors.UserInputError(
          f'config.stages = {config.stages!r}: distill needs a teacher, and '
          f'{workdir} has no finished {", ".join(missing)} stage; add '
          '"teacher" to config.stages or set config.teacher.checkpoint')

  # What each stage trains by: a preparation stage has its own objective.
  stage_configs = {stage.name: distil_setup.stage_config(config, stage)
                   for stage in plan}
  # Layers and modules of every distilled stage, checked before any work.
  modules = {stage.name: distil_setup.student_modules(
      stage_configs[stage.name], stage.model,
      stages_by_name[stage.teachers[0]].model, image_shape)
             for stage in plan if stage.teachers}
  dataset = load_data(config)
  if dataset.train.num_examples < config.batch_size:
    raise errors.UserInputError(
        f'config.batch_size = {config.batch_size}: the training split has '
        f'only {dataset.train.num_examples} examples')
  keeps_memory = bool(modules) and methods.keeps_memory(config.distill)
  if keeps_memory:  # The terms' memory fits this training split (shapes only).
    if not hasattr(dataset.train, 'labels'):
      raise errors.UserInputError(
          f'config.input = {config.input!r}: a term of config.distill.terms '
          f'({config.distill.terms}) keeps a memory of every training '
          "example, which needs the split in memory; use config.input = "
          "'memory'")
    jax.eval_shape(functools.partial(distil_setup.initial_memory, config,
                                     dataset.train.labels), base_rng)
  steps_per_epoch = data_lib.num_train_batches(dataset.train.num_examples,
                                               config.batch_size)
  if wd.writes:
    os.makedirs(workdir, exist_ok=True)
    lock.take()
    workdir_lib.record_config(config, workdir)
  logging.info('data: %s (%d train, %d validation, %d test)', dataset.source,
               dataset.train.num_examples, config.validation_size,
               dataset.test.num_examples)
  results.update(dataset=dataset.name, data_source=dataset.source,
                 seed=config.seed, provenance=provenance.resumed(
                     provenance.manifest(config, dataset, mesh),
                     results.get('provenance')))

  if teacher_paths and 'teacher' not in results['stages']:
    info = _external_teacher_result(config, model_of(teacher_stage), teachers,
                                    teacher_paths, dataset, mesh)
    if len(teachers) == 1:
      info['calibration'] = reports.stage_calibration(
          model_of(teacher_stage), teachers[0], dataset,
          config.eval_batch_size, mesh)
    wd.record(results, 'teacher', info)

  def new_state(stage: Stage) -> train.TrainState:
    stage_config = stage_configs.get(stage.name, config)
    model_config = (config.teacher if stages_lib.is_teacher(stage.name)
                    else stage_config.student)
    rng = jax.random.fold_in(base_rng, stage.rng_index)
    stage_modules, input_shapes = modules.get(stage.name, ({}, {}))
    tx = optimizers.make_optimizer(model_config.optimizer,
                                   steps_per_epoch=steps_per_epoch,
                                   epochs=model_config.epochs)
    if stage.preparation:
      tx = optimizers.training_only(tx, stage.preparation.trains)
    return train.create_train_state(
        model_of(stage), rng, image_shape, precision=config.precision,
        modules=distil_setup.init_modules(stage_modules, input_shapes, rng),
        memory=(distil_setup.initial_memory(
            stage_config, dataset.train.labels, rng)
                if stage.teachers and keeps_memory else {}),
        tx=tx, augment=augment.AugmentSettings.from_section(config.augment))

  finished = {}  # Stage name -> its final state, once needed.

  def final_state(name: str) -> train.TrainState:
    if name not in finished:
      state = _final_state(wd, config, name, new_state(stages_by_name[name]))
      if state is None:
        raise errors.UserInputError(
            f'{wd.checkpoint_dir(name)}: the {name} stage is recorded as '
            'finished in results.json but its final checkpoint is missing or '
            'damaged (see any warning above); rerun with --start_over')
      finished[name] = state
    return finished[name]

  def variables_of(name: str):
    if name not in frozen:
      frozen[name] = train.model_variables(final_state(name))
    return frozen[name]

  def initial_state(stage: Stage) -> train.TrainState:
    """A fresh state, or where `stage` starts from another stage, that
    stage's final model variables."""
    state = new_state(stage)
    if stage.starts_from is None:
      return state
    start = variables_of(stage.starts_from)
    return state.replace(params=start['params'],
                         batch_stats=start.get('batch_stats', {}))

  # A finished stage whose final checkpoint no longer reads back as saved
  # runs again, from the checkpoint before (the same result, exactly); the
  # others' final states are kept for the stages that use them.
  for name in dict.fromkeys([*(s.name for s in plan),
                             *(t for s in plan for t in s.teachers)]):
    trained_here = not (teacher_paths and stages_lib.is_teacher(name))
    if (name in results['stages'] and name in stages_by_name
        and trained_here):
      state = _final_state(wd, config, name, new_state(stages_by_name[name]))
      if state is not None:
        finished[name] = state
        continue
      wd.forget(results, name)
      if name not in {s.name for s in plan}:
        raise errors.UserInputError(
            f'{wd.checkpoint_dir(name)}: the final checkpoint of the finished '
            f'{name} stage is missing or damaged (see the warning above); '
            f'add {name!r} to config.stages to train it again (from its '
            'newest good checkpoint, if any)')
      logging.warning('stage %s: its final checkpoint is missing or '
                      'damaged; training it again (from its newest good '
                      'checkpoint, if any)', name)

  try:
    for stage in plan:
      if stage.name in results['stages']:
        logging.info('stage %s: already finished in %s, reusing it',
                     stage.name, workdir)
        continue
      teacher_model, ensemble, constants = None, [], {}
      if stage.teachers:
        teacher_model = model_of(stages_by_name[stage.teachers[0]])
        several = stage.name == 'distill' and methods.num_teachers(config) > 1
        ensemble = (teachers if teacher_paths and several
                    else [variables_of(name) for name in stage.teachers])
        constants = jax.device_get(distil_setup.teacher_constants(
            stage_configs[stage.name],
            stages_by_name[stage.teachers[0]].model, ensemble[0]))
        if stage.starts_from:  # What the preparation stage trained.
          constants.update(distil_setup.prepared_constants(
              config, final_state(stage.starts_from).modules))
      info, state = _run_stage(
          stage, stage_configs[stage.name], wd, dataset, initial_state(stage),
          teacher_model, ensemble, modules.get(stage.name, ({}, {}))[0], mesh,
          constants)
      if stage.starts_from:
        info['started_from'] = stage.starts_from
      finished[stage.name] = state
      frozen[stage.name] = train.model_variables(state)
      info['calibration'] = reports.stage_calibration(
          model_of(stage), frozen[stage.name], dataset, config.eval_batch_size,
          mesh)
      wd.record(results, stage.name, info)
      if wd.writes:
        provenance.write_manifest(wd.checkpoint_dir(stage.name),
                                  results['provenance'])
  finally:
    wd.tensorboard.close()

  # The tutorial's figure needs the teacher: in memory when this call
  # trained, loaded or taught with it, or checked it as a finished stage.
  if config.plots and 'teacher' not in frozen and 'teacher' in finished:
    frozen['teacher'] = train.model_variables(finished['teacher'])
  teacher_logits = None
  if 'teacher' in frozen and config.plots:
    teacher_logits = model_of(teacher_stage).apply(
        frozen['teacher'], dataset.test.images[:1], train=False)[0]
  if wd.writes:
    if config.plots:
      reports.write_plots(wd.file('plots'), workdir_lib.read_metrics(wd.path),
                          results, stages_lib.stage_titles(config),
                          teacher_logits)
    workdir_lib.write_atomic(wd.file('results.md'),
                             reports.results_table(results, config))
  parallel.sync('kd_jax results written')
  return results


def _final_state(wd: workdir_lib.Workdir, config: ml_collections.ConfigDict,
                 stage: str, template: train.TrainState
                 ) -> train.TrainState | None:
  """The newest checkpoint of a finished `stage` in this workdir, or None if
  there is none or it does not read back as saved (then it is logged and
  removed)."""
  ckpt = checkpoints_lib.StageCheckpoints(wd.checkpoint_dir(stage),
                                          keep=config.checkpoints_to_keep)
  try:
    restored = ckpt.restore_newest(template)
    return None if restored is None else restored[0]
  finally:
    ckpt.close()


def _run_stage(stage: Stage, config: ml_collections.ConfigDict,
               wd: workdir_lib.Workdir, dataset: data_lib.Dataset,
               state: train.TrainState, teacher_model: nn.Module | None,
               teachers: list[Any], modules: distil_setup.Modules, mesh=None,
               constants: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], train.TrainState]:
  """Trains one stage from scratch or from its newest checkpoint.

  `teachers` holds the frozen teachers' variables (empty for a stage that
  learns from labels only): one, or several for a several-teacher method
  (their logits stacked `[N, M, K]`, cached or computed in the step).
  `modules` are the objective's trainable modules (their parameters are in
  `state.modules`), `constants` what its terms computed from the first
  teacher (`teacher_constants`).
  """
  model_config = (config.teacher if stages_lib.is_teacher(stage.name)
                  else config.student)
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
  cached = bool(teachers) and use_teacher_cache(config, len(teachers))
  if teachers:
    teacher_apply = precision.compute_in(teacher_model.apply, config.precision)
    step = functools.partial(train.distill_step, distiller=distil_setup.distiller(
        config, teacher_apply, modules, steps_per_epoch, constants))
    if methods.keeps_memory(config.distill):  # Each example's position.
      extras['index'] = np.arange(dataset.train.num_examples, dtype=np.int32)
    if cached:
      logits = [loop.predict_logits(teacher_apply, variables, dataset.train,
                                    config.eval_batch_size, mesh=mesh)
                for variables in teachers]
      extras['teacher_logits'] = jax.block_until_ready(
          jax.numpy.stack(logits, axis=1) if len(logits) > 1 else logits[0])
      cache_seconds = time.perf_counter() - start
      logging.info('stage %s: cached teacher logits %s in %.1f s', stage.name,
                   extras['teacher_logits'].shape, cache_seconds)
    else:
      step_args = (teachers[0] if len(teachers) == 1 else list(teachers),)
  try:
    state, test_metrics = loop.fit(
        state, step, dataset,
        loop.LoopSettings.from_config(
            config, model_config.epochs,
            'teacher' if stages_lib.is_teacher(stage.name) else 'student'),
        stage=stage.name, step_args=step_args, train_extras=extras,
        checkpoints=ckpt, resume_totals=resume_totals,
        on_epoch_end=wd.append_metrics, mesh=mesh)
  finally:
    ckpt.close()
  info = {
      'model': stage.model,
      'params': models.count_params(state.params),
      'epochs': model_config.epochs,
      'test_accuracy': test_metrics['accuracy'],
      'test_loss': test_metrics['loss'],
      'wall_time_s': round(time.perf_counter() - start, 2),
  }
  if teachers:
    info['distilled_from'] = ','.join(stage.teachers)
    info['teacher_sha256'] = ','.join(checkpoints_lib.fingerprint(variables)
                                      for variables in teachers)
    info['teacher_logits'] = 'cached' if cached else 'online'
    info['teacher_cache_s'] = round(cache_seconds, 2)
  if len(teachers) > 1:
    info['teacher_ensemble_accuracy'] = reports.ensemble_accuracies(
        teacher_model, teachers, dataset.test, config.eval_batch_size,
        mesh)[0]
  if state.modules:
    info['module_params'] = {name: models.count_params(params)
                             for name, params in state.modules.items()}
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
      'sha256': ','.join(checkpoints_lib.fingerprint(t) for t in teachers),
  }
  if len(teachers) == 1:
    state = train.create_train_state(teacher_model, jax.random.PRNGKey(0),
                                     dataset.test.images.shape[1:], 1e-3)
    state = state.replace(params=teachers[0]['params'],
                          batch_stats=teachers[0].get('batch_stats', {}))
    test_metrics = loop.evaluate(state, dataset.test, config.eval_batch_size,
                                 mesh)
    return {**info, 'test_accuracy': test_metrics['accuracy'],
            'test_loss': test_metrics['loss']}
  ensemble, members = reports.ensemble_accuracies(
      teacher_model, teachers, dataset.test, config.eval_batch_size, mesh)
  return {**info, 'test_accuracy': ensemble, 'member_accuracies': members}
