"""Logit regression (Ba & Caruana, "Do Deep Nets Really Need to be Deep?",
NeurIPS 2014): the student regresses the teacher's logits with an L2 loss.

The term is `1/2 ||student_logits - teacher_logits||^2` per example, the
paper's objective (its mean over the batch), and needs no temperature: the
logits carry the teacher's relative confidences before the softmax squashes
them. With the labels' cross-entropy the terms are `ce, logit_l2`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce


def logit_l2_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                  weights: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over the batch of `1/2 ||student - teacher||^2` over the classes.

  Args:
    student_logits: `[B, K]`.
    teacher_logits: `[B, K]`, under `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, {})`, the scalar weighted mean.
  """
  student = losses.as_float(losses.mask_rows(student_logits, weights))
  teacher = jax.lax.stop_gradient(
      losses.as_float(losses.mask_rows(teacher_logits, weights)))
  per_example = 0.5 * jnp.sum(jnp.square(student - teacher), axis=-1)
  return losses.weighted_mean(per_example, weights), {}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  del section  # Only the weight, which the objective applies.

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return logit_l2_loss(student.logits, teacher.logits,
                         weights=objective.batch_weights(batch))
  return term


METHOD = objective.Method(
    name='logit_l2',
    reference='Ba & Caruana, NeurIPS 2014',
    description="the teacher's logits, regressed with an L2 loss",
    settings={'weight': objective.term_weight(1.0)},
    loss=_term,
    terms=(ce.TERM.name, 'logit_l2'),
)
