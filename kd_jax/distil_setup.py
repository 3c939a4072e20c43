"""What a distil stage builds from `config.distill` before it trains.

The config it trains by (`stage_config`: a method's preparation stage has
its own objective and epochs), the layers its objective reads, checked in
both models (with their shapes),
the trainable modules its terms add to the student and their initial
parameters, what its terms compute once from the trained teacher
(`teacher_constants`), their initial memory (`initial_memory`), and the
`train.Distiller` that binds it all for the distil step. `kd_jax.experiment`
calls these for each distilled stage; benchmarks and tests build distil
steps with `distiller`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kd_jax import errors
from kd_jax import methods
from kd_jax import models
from kd_jax import stages
from kd_jax import train

# Term name -> (module, student layers it reads, teacher layers it reads).
Modules = dict[str, tuple[nn.Module, tuple[str, ...], tuple[str, ...]]]
# fold_in of a stage's key for its terms' memory (its modules use 1, 2, ...).
_MEMORY_KEY = 0x6d656d  # b'mem'


def stage_config(config: ml_collections.ConfigDict, stage: stages.Stage
                 ) -> ml_collections.ConfigDict:
  """The config a distilled `stage` trains by: `config` itself, or for a
  method's preparation stage (`stage.preparation`) a copy whose objective is
  the preparation's term alone, at weight 1, with the method's section as
  its settings, and whose student trains `Preparation.epochs` epochs with
  `config.student.optimizer` at its base learning rate, held constant.
  """
  preparation = stage.preparation
  if preparation is None:
    return config
  derived = ml_collections.ConfigDict(config.to_dict())
  method = config.distill.method
  derived.distill = ml_collections.ConfigDict({
      'method': method, 'terms': preparation.term.name,
      'teacher_logits': config.distill.teacher_logits,
      method: config.distill[method].to_dict(),
      preparation.term.name: {**config.distill[method].to_dict(),
                              'weight': 1.0}})
  derived.student.epochs = preparation.epochs(config)
  derived.student.optimizer.schedule = 'constant'
  derived.student.optimizer.warmup_epochs = 0
  return derived


def feature_shapes(model: nn.Module, image_shape: tuple[int, ...],
                   layers: tuple[str, ...], *, field: str,
                   model_name: str) -> list[tuple[int, ...]]:
  """Shapes (batch axis dropped) of `layers`' outputs, from one forward pass
  on zeros.

  Raises:
    errors.UserInputError: a layer is not in the model (the message names
      `field` and lists the layers the model has).
  """
  variables = models.init_variables(model, jax.random.PRNGKey(0), image_shape)
  images = jax.numpy.zeros((1, *image_shape))
  try:
    _, features, _ = train.forward_with_features(model.apply, variables,
                                                 images, layers, train=False)
  except ValueError as e:
    _, collections = model.apply(variables, images, capture_intermediates=True,
                                 mutable=['intermediates'])
    known = sorted(set(collections['intermediates']) - {'__call__'})
    raise errors.UserInputError(
        f'{field} = {",".join(layers)!r}: {e.args[0].split(";")[0]}; the '
        f'model {model_name!r} has {", ".join(known)}') from e
  return [tuple(f.shape[1:]) for f in features]


def student_modules(config: ml_collections.ConfigDict, student: str,
                    teacher: str, image_shape: tuple[int, ...]
                    ) -> tuple[Modules, dict[str, list[list[tuple[int, ...]]]]]:
  """Checks the layers the objective reads in a (student, teacher) pair of
  models (by name) and builds the trainable modules its terms add.

  Returns:
    The modules (term name -> `(module, student layers it reads, teacher
    layers it reads)`), and the shapes (batch axis dropped) of each module's
    arguments, to initialise it: `[student layers' shapes]`, plus the
    teacher layers' for a module that reads them.

  Raises:
    errors.UserInputError: a layer does not exist, a module cannot map the
      student's layers to the teacher's, or a term cannot use the teacher
      (`teacher_constants`).
  """
  models_by_role = {role: (name, models.make_model(
      name, num_classes=config.student.num_classes))
                    for role, name in (('student', student),
                                       ('teacher', teacher))}

  # Each term's layers, checked (and their shapes found) once; the modules
  # are built from the same shapes.
  shapes = {}
  for name in methods.term_names(config.distill):
    record, section = methods.term_record(name), config.distill[name]
    for role, layers in (('student', record.student_layers(section)),
                         ('teacher', record.teacher_layers(section))):
      if layers and (role, layers) not in shapes:
        model_name, model = models_by_role[role]
        shapes[role, layers] = feature_shapes(
            model, image_shape, layers, model_name=model_name,
            field=f'config.distill.{name}.{role}_layers')
  shapes_of = lambda role, layers: shapes[role, layers] if layers else []
  try:
    modules = methods.modules(config.distill, shapes_of)
  except ValueError as e:
    raise errors.UserInputError(str(e)) from e
  if any(methods.term_record(name).teacher_constants
         for name in methods.term_names(config.distill)):
    # Checked on the teacher's initial variables' shapes (no computation).
    variables = jax.eval_shape(functools.partial(
        models.init_variables, models_by_role['teacher'][1],
        image_shape=image_shape), jax.random.PRNGKey(0))
    jax.eval_shape(functools.partial(teacher_constants, config, teacher),
                   variables)
  return modules, {
      name: [shapes_of('student', layers)]
      + ([shapes_of('teacher', teacher_layers)] if teacher_layers else [])
      for name, (_, layers, teacher_layers) in modules.items()}


def teacher_constants(config: ml_collections.ConfigDict, teacher: str,
                      variables: Any) -> dict[str, Any]:
  """`methods.teacher_constants` of the objective's terms for the teacher
  model `teacher` (by name) with Flax `variables`.

  Raises:
    errors.UserInputError: a term cannot use this teacher.
  """
  try:
    return methods.teacher_constants(config.distill, teacher, variables)
  except ValueError as e:
    raise errors.UserInputError(str(e)) from e


def prepared_constants(config: ml_collections.ConfigDict,
                       prepared_modules: dict[str, Any]) -> dict[str, Any]:
  """For each term of `config.distill.terms` that is `prepared_by` a
  preparation stage's term, the final parameters of that term's module
  (`prepared_modules`: the preparation stage's `TrainState.modules`), by
  the distil term's name, for `build_objective`."""
  return {name: prepared_modules[record.prepared_by]
          for name in methods.term_names(config.distill)
          if (record := methods.term_record(name)).prepared_by}


def distiller(config: ml_collections.ConfigDict, teacher_apply_fn,
              modules: Modules | None = None,
              steps_per_epoch: int = 1,
              constants: dict[str, Any] | None = None) -> train.Distiller:
  """The distil step's settings for `config.distill`: its objective (with
  the terms' `constants`, see `teacher_constants`), the layers it reads and
  its trainable `modules` (see `student_modules`)."""
  return train.Distiller(
      objective=methods.build_objective(config.distill, constants),
      teacher_apply_fn=teacher_apply_fn,
      student_layers=methods.student_layers(config.distill),
      teacher_layers=methods.teacher_layers(config.distill),
      modules=dict(modules or {}), steps_per_epoch=steps_per_epoch)


def init_modules(modules: Modules, input_shapes, rng: jax.Array
                 ) -> dict[str, Any]:
  """Initial parameters of `modules` (with `student_modules`' shapes of
  their arguments), module i from `fold_in(rng, 1 + i)`; `{}` for a module
  without any (e.g. AB's connectors between maps of equal shapes)."""
  return {name: module.init(
      jax.random.fold_in(rng, 1 + i),
      *[[jax.numpy.zeros((1, *shape)) for shape in shapes]
        for shapes in input_shapes[name]]).get('params', {})
          for i, (name, (module, *_)) in enumerate(modules.items())}


def initial_memory(config: ml_collections.ConfigDict, labels: np.ndarray,
                   rng: jax.Array) -> dict[str, Any]:
  """`methods.initial_memory` of the objective's terms for a training split
  with `labels` (`[N]`), from `fold_in(rng, _MEMORY_KEY)`.

  Raises:
    errors.UserInputError: a term cannot keep a memory of this split.
  """
  try:
    return methods.initial_memory(config.distill, np.asarray(labels),
                                  jax.random.fold_in(rng, 0))
  except ValueError as e:
    raise errors.UserInputError(str(e)) from e
