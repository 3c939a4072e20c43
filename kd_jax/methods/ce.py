"""Cross-entropy with the labels: the objective term every paper keeps.

Not a distillation method of its own (it reads no teacher output), so it is
a term of `config.distill.terms` but not a `config.distill.method`.
"""

import ml_collections

from kd_jax import objective


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  del section  # Only the weight, which the objective applies.

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    del teacher
    return objective.label_loss(student.logits, batch), {}
  return term


TERM = objective.Method(
    name='ce',
    reference='cross-entropy with the labels',
    description='the ground-truth labels, at T = 1',
    settings={'weight': objective.term_weight(1.0)},
    loss=_term,
    terms=('ce',),
    reads_teacher=False,
)
