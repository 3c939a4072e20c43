"""The stages of an experiment, in order, and their names in results.

A run trains the teacher(s), then a chain of distilled stages ending with the
student (one link for most methods; a method's record may put stages in
between, e.g. TAKD's assistants or born-again generations, or a preparation
stage the distil stage starts from, e.g. FT's paraphraser), then the student
trained from scratch.
"""

import dataclasses
import re

import ml_collections

from kd_jax import fields
from kd_jax import methods
from kd_jax import objective

STAGES = ('teacher', 'distill', 'scratch')
RESULT_KEYS = {
    'teacher': 'teacher_accuracy',
    'distill': 'distilled_accuracy',
    'scratch': 'scratch_accuracy',
}
# fold_in indices of teachers 2, 3, ...; far from those of the chain (2, 3...).
_TEACHER_RNG_BASE = 1000


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of an experiment.

  Attributes:
    name: its name in the workdir (checkpoints/<name>/, results.json):
      teacher, teacher<k>, a chain link's name, distill or scratch.
    title: its row title in results tables.
    model: the `kd_jax.models` name of the network it trains.
    teachers: the stages it distils from (several for a method with several
      teachers); empty for hard labels only.
    rng_index: `jax.random.fold_in(PRNGKey(seed), rng_index)` seeds its init
      and dropout; distill and scratch share 1, so the two students start
      from the same initialisation and the comparison isolates the teacher.
    preparation: for a method's preparation stage, what it trains
      (`objective.Preparation`); it runs as a distil stage of
      `distil_setup.stage_config(config, stage)`.
    starts_from: the stage whose final model variables this one starts from
      (the distil stage after a preparation stage), or None.
  """
  name: str
  title: str
  model: str
  teachers: tuple[str, ...]
  rng_index: int
  preparation: objective.Preparation | None = None
  starts_from: str | None = None


def parse_stages(text: str) -> tuple[str, ...]:
  return fields.parse_list(text)


def loaded_teachers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The teacher checkpoint directories of `config.teacher.checkpoint`."""
  return fields.parse_list(config.teacher.checkpoint)


def teacher_stages(config: ml_collections.ConfigDict) -> list[Stage]:
  """The teacher stages: one, or as many as the method distils from when
  they are trained here (their inits differ; the data order is the same)."""
  count = 1 if loaded_teachers(config) else methods.num_teachers(config)
  return [Stage('teacher', 'teacher', config.teacher.model, (), 0)] + [
      Stage(f'teacher{k}', f'teacher {k}', config.teacher.model, (),
            _TEACHER_RNG_BASE + k) for k in range(2, count + 1)]


def is_teacher(name: str) -> bool:
  """Whether the stage `name` trains a teacher (teacher, teacher2, ...): it
  trains by `config.teacher`, every other stage by `config.student`."""
  return re.fullmatch(r'teacher([2-9]|[1-9][0-9]+)?', name) is not None


def stage_plan(config: ml_collections.ConfigDict) -> list[Stage]:
  """The stages `config` runs, in order (a validated config).

  `config.stages` picks among teacher, distill and scratch; "distill" brings
  the method's whole chain (`methods.chain`), each link distilled from the
  one before, or its preparation stage, which learns from the same teacher
  as the distil stage and is where the distil stage starts (both at the
  distilled student's initialisation).
  """
  requested = parse_stages(config.stages)
  teachers = teacher_stages(config)
  plan = list(teachers) if 'teacher' in requested else []
  if 'distill' in requested:
    previous = tuple(t.name for t in teachers)
    for i, link in enumerate(methods.chain(config)):
      plan.append(Stage(link.name, link.title, link.model, previous, 2 + i))
      previous = (link.name,)
    preparation = methods.method_of(config).preparation
    if preparation:
      plan.append(Stage(preparation.name, preparation.title,
                        config.student.model, previous, 1,
                        preparation=preparation))
    plan.append(Stage('distill', methods.student_title(config),
                      config.student.model, previous, 1,
                      starts_from=preparation and preparation.name))
  if 'scratch' in requested:
    plan.append(Stage('scratch', 'student, from scratch',
                      config.student.model, (), 1))
  return plan


def result_key(stage: str) -> str:
  """The results.json key of `stage`'s test accuracy."""
  return RESULT_KEYS.get(stage, f'{stage}_accuracy')


def stage_titles(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Stage name -> title, for every stage `config` can have, in order."""
  titles = {stage.name: stage.title for stage in teacher_stages(config)}
  titles.update((stage.name, stage.title) for stage in stage_plan(config))
  return titles
