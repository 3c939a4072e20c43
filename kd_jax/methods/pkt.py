"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep
Representations with Probabilistic Knowledge Transfer", ECCV 2018).

The term matches the conditional distributions of cosine similarities
among a batch's embeddings (the last listed layer of each network,
flattened); with the labels' cross-entropy the method's terms are `ce, pkt`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Scalar = common.Scalar


def pkt_loss(student_embeddings: ArrayLike,
             teacher_embeddings: ArrayLike,
             *,
             eps: Scalar = 1e-7,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Probabilistic knowledge transfer with the cosine kernel.

  Passalis & Tefas, "Learning Deep Representations with Probabilistic
  Knowledge Transfer", ECCV 2018, with the cosine kernel: the batch's
  embeddings are L2 normalised, their cosine similarities shifted to `[0, 1]`
  by `(cos + 1) / 2`, and each row normalised into a conditional distribution
  `p_{j|i}`; the loss is `sum_j p_{j|i}^teacher log((p_{j|i}^teacher + eps) /
  (p_{j|i}^student + eps))` for each row `i`, averaged over the rows.

  As in the official code, a row includes the example itself (`j = i`, a
  similarity of 1; the paper's kernel sum skips it) and `eps` smooths the
  log ratio. The official code divides by `B^2` (`torch.mean` of the matrix)
  where this divides by `B`, the number of rows: this loss is the official
  one times `B`. The normalisation of the embeddings is exact (safe at
  zero) where the official code divides by `norm + eps`.

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`.
    eps: smoothing >= 0 of the log ratio.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask): the
      weight of row `i` in the mean and of example `j` in each row's kernel.

  Returns:
    `(loss, {})`: the scalar loss, 0 where the student's and teacher's
    cosine similarities agree. Invariant to scaling either embedding.
  """
  common.check_non_negative('eps', eps)
  student, teacher, weights = common.relational_inputs(
      student_embeddings, teacher_embeddings, weights)

  def conditional_probs(embeddings):
    _, units = common.norm_and_unit(embeddings)
    cosine = jnp.matmul(units, units.T, precision=common.PRECISION)
    # Rounding can take a cosine just below -1.
    kernel = jnp.maximum((cosine + 1.0) / 2.0, 0.0) * weights[None, :]
    row_sums = jnp.sum(kernel, axis=-1, keepdims=True)
    return kernel / jnp.where(row_sums > 0, row_sums, 1.0)

  student_probs = conditional_probs(student)
  teacher_probs = conditional_probs(teacher)
  # Terms of teacher probability 0 (padded columns) add 0, also for eps = 0,
  # and pass no NaN into the gradient.
  positive = teacher_probs > 0
  log_ratio = (jnp.log(jnp.where(positive, teacher_probs + eps, 1.0))
               - jnp.log(jnp.where(positive, student_probs + eps, 1.0)))
  per_row = jnp.sum(jnp.where(positive, teacher_probs * log_ratio, 0.0),
                    axis=-1)
  return losses.weighted_mean(per_row, weights), {}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  student_layer = common.student_layers(section)[-1]
  teacher_layer = common.teacher_layers(section)[-1]
  eps = section.eps

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return pkt_loss(common.flat(student.features[student_layer]),
                    common.flat(teacher.features[teacher_layer]), eps=eps,
                    weights=objective.batch_weights(batch))
  return term


METHOD = objective.Method(
    name='pkt',
    reference='Passalis & Tefas, ECCV 2018',
    description='the distribution of cosine similarities among a batch',
    settings={
        # RepDistiller's 30000 applies to the official code's mean over B^2
        # kernel entries; pkt_loss averages over the B rows, so 30000 / 64
        # for batch 64.
        'weight': objective.term_weight(30000.0 / 64),
        **common.layer_settings('conv2', 'conv2'),
        'eps': objective.Setting(1e-7, fields.non_negative_float(),
                                 'Smoothing of the log ratio. Number >= 0.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'pkt'),
    student_layers=lambda section: common.student_layers(section)[-1:],
    teacher_layers=lambda section: common.teacher_layers(section)[-1:],
    zoo_settings=common.zoo_layer('embedding'),
)
