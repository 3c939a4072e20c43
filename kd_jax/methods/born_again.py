"""Born-again networks (Furlanello et al., "Born Again Neural Networks",
ICML 2018).

Generations of one architecture, the teacher's: generation 1 is distilled
from the teacher, each next one from the one before, and the last is the
distilled student (stages generation1 .. generation<N-1>, then distill).
The method adds no term of its own: the paper's objective is the
cross-entropy to the previous generation's predictions alone, the `kd` term
at T = 1 (experiments/born_again.py).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from kd_jax import fields
from kd_jax import objective
from kd_jax.methods import kd


def _chain(config: ml_collections.ConfigDict) -> list[objective.Link]:
  return [objective.Link(f'generation{i}', f'generation {i}',
                         config.teacher.model)
          for i in range(1, config.distill.born_again.generations)]


def _problems(section: ml_collections.ConfigDict,
              flat: Mapping[str, Any]) -> list[str]:
  del section
  if flat['student.model'] != flat['teacher.model']:
    return [
        "config.distill.method = 'born_again': every generation has the "
        f"teacher's architecture, but config.student.model = "
        f'{flat["student.model"]!r} and config.teacher.model = '
        f'{flat["teacher.model"]!r}; set them equal']
  return []


METHOD = objective.Method(
    name='born_again',
    reference='Furlanello et al., ICML 2018',
    description="a chain of generations of the teacher's own architecture",
    settings={
        'generations': objective.Setting(
            2, fields.int_at_least(1),
            'Generations of students after the teacher; the last is the '
            'distilled student, the others are stages generation1, '
            'generation2, ... Integer >= 1.'),
    },
    terms=(kd.METHOD.name,),
    chain=_chain,
    student_title=lambda config: (
        'student, distilled (generation '
        f'{config.distill.born_again.generations})'),
    check=_problems,
)
