"""Teacher-assistant KD (Mirzadeh et al., "Improved Knowledge Distillation
via Teacher Assistant", AAAI 2020).

Teacher assistants of intermediate size sit between teacher and student:
each is distilled from the one before (stages assistant1, assistant2, ...)
and the student from the last, all with the stage's objective (the paper's:
`ce, kd`). The method adds no term of its own.
"""

import ml_collections

from kd_jax import fields
from kd_jax import models
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import kd


def _chain(config: ml_collections.ConfigDict) -> list[objective.Link]:
  return [objective.Link(f'assistant{i}', f'assistant {i}', model)
          for i, model in enumerate(
              fields.parse_list(config.distill.takd.assistant_models),
              start=1)]


METHOD = objective.Method(
    name='takd',
    reference='Mirzadeh et al., AAAI 2020',
    description='the teacher through assistants of intermediate size',
    settings={
        'assistant_models': objective.Setting(
            'seed_assistant_cnn', fields.Field(
                str, lambda v: bool(fields.parse_list(v)) and all(
                    m in models.MODELS for m in fields.parse_list(v)),
                'comma-separated model names from '
                + ', '.join(sorted(models.MODELS)) + ' (at least one)'),
            'The teacher assistants\' models (kd_jax.models.MODELS), largest '
            'first, comma-separated; each trains student.epochs at the '
            'student\'s optimiser settings, distilled from the one before.'),
    },
    terms=(ce.TERM.name, kd.METHOD.name),
    chain=_chain,
)
