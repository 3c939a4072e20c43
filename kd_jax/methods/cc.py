"""Correlation congruence (Peng et al., "Correlation Congruence for Knowledge
Distillation", ICCV 2019): the batch's correlation matrix of embeddings.

The term matches the `[B, B]` correlation matrices of the student's and the
teacher's embeddings (the last listed layer of each network, flattened),
`C_ij = k(f_i, f_j)` with the paper's generalised kernel: the Gaussian RBF
`exp(-gamma ||f_i - f_j||^2)` of L2-normalised embeddings, approximated by
its P-order Taylor expansion; the loss is `||C_s - C_t||_F^2 / B^2`. The
matrices are `B x B` whatever the widths, so student and teacher may differ
in width without any added module.

What is followed, and what not:

* The kernel, its Taylor form and `gamma = 0.4`, `P = 2` are the paper's
  correlation congruence as re-implemented in Knowledge-Distillation-Zoo
  (AberHu, `kd_losses/cc.py`, whose `train_kd.py` defaults are gamma 0.4
  and P 2; the paper's own table of values was not checked here).
* The weight 0.02 is RepDistiller's `-b 0.02`, and the layer its
  `feat[-1]` (the pooled embedding), but RepDistiller's `Correlation` loss
  is a different function: `mean_i sum_d |e_s - e_t|_{i,d} |e_s - e_t|_{i+1,d}`
  of 128-d embeddings produced by two trained linear heads (`LinearEmbed`
  on the student's and on the teacher's features, both trained with the
  student). Neither its loss nor its heads are used here: this term reads
  the networks' own embeddings and has no trainable module, so RepDistiller's
  weight does not carry the same scale (the kernel entries lie in about
  `[0.2, 1]` for gamma 0.4, and their squared differences are small: tune
  `cc.weight` for a real run).
* The paper's full objective adds KD (instance congruence) to CE and CC;
  as in RepDistiller (`-a 0`) and Knowledge-Distillation-Zoo the method's
  terms are `ce, cc`, and `--config.distill.terms=ce,kd,cc` (with a `kd`
  section) gives the paper's.
"""

import math
import numbers

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


def correlation_matrix(embeddings: Array, *, gamma: Scalar = 0.4,
                       order: int = 2) -> Array:
  """`[B, B]` Taylor-approximated Gaussian RBF kernel of `[B, D]` embeddings.

  With `u_i = f_i / ||f_i||` (unit norm, so `||u_i - u_j||^2 = 2 - 2 u_i .
  u_j`), `exp(-gamma ||u_i - u_j||^2) = exp(-2 gamma) exp(2 gamma u_i .
  u_j)`, and the paper's P-order approximation is

    C_ij = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (u_i . u_j)^p.

  A zero embedding has `u = 0` (finite gradients), and its entries are the
  `p = 0` term alone.
  """
  _, unit = common.norm_and_unit(embeddings)
  cosine = jnp.matmul(unit, unit.T, precision=common.PRECISION)
  total = jnp.zeros_like(cosine)
  power = jnp.ones_like(cosine)
  for p in range(order + 1):
    total = total + (2.0 * gamma)**p / math.factorial(p) * power
    power = power * cosine
  return jnp.exp(-2.0 * gamma) * total


def cc_loss(student_embeddings: ArrayLike,
            teacher_embeddings: ArrayLike,
            *,
            gamma: Scalar = 0.4,
            order: int = 2,
            weights: ArrayLike | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """Correlation congruence: `(1 / B^2) ||C_s - C_t||_F^2`.

  Peng et al., ICCV 2019 (the paper's `L_CC`), with `C` the
  `correlation_matrix` of each network's embeddings.

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`; `Dt` may differ
      from `Ds`.
    gamma: the RBF kernel's `gamma > 0`.
    order: the Taylor expansion's order `P >= 1`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask): an
      entry `(i, j)` weighs `w_i w_j`, the sum divided by `(sum w)^2`.

  Returns:
    `(loss, {})`: the scalar loss, 0 where the two correlation matrices
    agree (e.g. equal embeddings up to a positive scale per example).

  Raises:
    ValueError: a Python `gamma` <= 0 or `order` < 1, or different batch
      sizes.
  """
  if isinstance(gamma, numbers.Real) and not gamma > 0:
    raise ValueError(f'gamma must be > 0, got {gamma}.')
  if not isinstance(order, numbers.Integral) or order < 1:
    raise ValueError(f'order must be an integer >= 1, got {order!r}.')
  student, teacher, weights = common.relational_inputs(
      student_embeddings, teacher_embeddings, weights)
  difference = (correlation_matrix(student, gamma=gamma, order=order)
                - correlation_matrix(teacher, gamma=gamma, order=order))
  return losses.weighted_mean(jnp.square(difference),
                              weights[:, None] * weights[None, :]), {}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  student_layer = common.student_layers(section)[-1]
  teacher_layer = common.teacher_layers(section)[-1]
  settings = dict(gamma=section.gamma, order=section.order)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return cc_loss(common.flat(student.features[student_layer]),
                   common.flat(teacher.features[teacher_layer]),
                   weights=objective.batch_weights(batch), **settings)
  return term


METHOD = objective.Method(
    name='cc',
    reference='Peng et al., ICCV 2019',
    description='the correlations (a Taylor-approximated Gaussian kernel) '
                'among the examples of a batch',
    settings={
        # RepDistiller's `-b 0.02`, the weight of its own Correlation loss
        # on trained 128-d embeddings; on this kernel loss it is small (see
        # the module docstring).
        'weight': objective.term_weight(0.02),
        **common.layer_settings('conv2', 'conv2'),
        # Knowledge-Distillation-Zoo's train_kd.py defaults for CC.
        'gamma': objective.Setting(
            0.4, fields.positive_float(),
            'gamma of the Gaussian RBF kernel exp(-gamma ||u_i - u_j||^2) of '
            'the L2-normalised embeddings. Number > 0.'),
        'order': objective.Setting(
            2, fields.int_at_least(1),
            'Order P of the kernel\'s Taylor expansion. Integer >= 1.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'cc'),
    student_layers=lambda section: common.student_layers(section)[-1:],
    teacher_layers=lambda section: common.teacher_layers(section)[-1:],
    zoo_settings=common.zoo_layer('embedding'),
)
