"""Relational knowledge distillation (Park et al., "Relational Knowledge
Distillation", CVPR 2019): distances and angles among a batch's embeddings.

The term is `distance_weight * distance + angle_weight * angle` (the paper's
25 and 50) on the last listed layer of each network, flattened to `[B, D]`;
with the labels' cross-entropy the method's terms are `ce, rkd`.
"""

import optax

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


# Pairs whose squared distance is below this fraction of their squared norms
# (after centring) are coincident: the Gram matrix cannot tell them apart.
_COINCIDENT = 1e-6


def _centered_gram(embeddings: Array) -> Array:
  """`[B, B]` inner products of the embeddings `[B, D]`, centred and scaled.

  Distances and angles between examples do not change when the batch is
  translated, and their RKD potentials not when it is scaled: subtracting
  the mean keeps the products, and so the differences taken from them, as
  small as the spread of the batch (less cancellation), and dividing by the
  largest |element| (under `stop_gradient`) keeps their squares finite.
  """
  centered = embeddings - jnp.mean(embeddings, axis=0, keepdims=True)
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(centered)))
  centered = centered / jnp.where(scale > 0, scale, 1.0)
  return jnp.matmul(centered, centered.T, precision=common.PRECISION)


def _distances_from_gram(gram: Array) -> tuple[Array, Array]:
  """`([B, B] distances, [B, B] bool apart)` from a Gram matrix.

  `||e_i - e_j||^2 = g_ii + g_jj - 2 g_ij`; pairs closer than `_COINCIDENT`
  allows are coincident (`apart` False, distance 0, gradient 0), as a zero
  difference is in `_norm_and_unit`.
  """
  norms = jnp.diagonal(gram)
  squared = norms[:, None] + norms[None, :] - 2.0 * gram
  apart = squared > _COINCIDENT * (norms[:, None] + norms[None, :])
  return jnp.where(apart, jnp.sqrt(jnp.where(apart, squared, 1.0)),
                   0.0), apart


def _off_diagonal(n: int) -> Array:
  return ~jnp.eye(n, dtype=bool)


def rkd_distance_loss(student_embeddings: ArrayLike,
                      teacher_embeddings: ArrayLike,
                      *,
                      weights: ArrayLike | None = None) -> Array:
  """RKD distance-wise distillation loss (Park et al., CVPR 2019).

  The distance potential of a pair is `||e_i - e_j||_2 / mu`, `mu` the mean
  distance over the batch's pairs of distinct examples `i != j`; the loss is
  the Huber loss (smooth L1, `delta = 1`) between the student's and the
  teacher's potentials, averaged over those pairs as in the paper's set
  `X^2`. (The official code averages over all `B^2` entries, diagonal
  included, i.e. this loss times `(B - 1) / B`, and takes `mu` over the
  pairs at nonzero distance.)

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`; `Dt` may differ
      from `Ds`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); a
      pair weighs the product of its examples' weights.

  Returns:
    Scalar loss, 0 for fewer than 2 examples. Invariant to scaling,
    translating and rotating either embedding; finite, with finite
    gradients, where examples coincide (distance 0).
  """
  student, teacher, weights = common.relational_inputs(
      student_embeddings, teacher_embeddings, weights)
  pair_weights = (weights[:, None] * weights[None, :]
                  * _off_diagonal(weights.shape[0]))

  def potentials(embeddings):
    distances, _ = _distances_from_gram(_centered_gram(embeddings))
    mean_distance = losses.weighted_mean(distances, pair_weights)
    return distances / jnp.where(mean_distance > 0, mean_distance, 1.0)

  return losses.weighted_mean(
      optax.losses.huber_loss(potentials(student), potentials(teacher),
                              delta=1.0),
      pair_weights)


def rkd_angle_loss(student_embeddings: ArrayLike,
                   teacher_embeddings: ArrayLike,
                   *,
                   weights: ArrayLike | None = None) -> Array:
  """RKD angle-wise distillation loss (Park et al., CVPR 2019).

  The angle potential of a triplet `(i, j, k)` is the cosine of the angle at
  `e_j`, `<u_ij, u_kj>` with `u_ij = (e_i - e_j) / ||e_i - e_j||`; the loss is
  the Huber loss (`delta = 1`) between student and teacher potentials,
  averaged over the triplets of distinct examples, the paper's set `X^3`.
  (The official code averages over all `B^3` entries, degenerate triplets of
  potential 0 or 1 in both networks included, i.e. this loss times
  `(B - 1)(B - 2) / B^2`.)

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); a
      triplet weighs the product of its examples' weights.

  Returns:
    Scalar loss, 0 for fewer than 3 examples. The cosines come from the
    batch's Gram matrix, `<e_i - e_j, e_k - e_j> = g_ik - g_ij - g_jk +
    g_jj`: time `O(B^2 D + B^3)`, memory `O(B D + B^3)`, where forming the
    `[B, B, D]` differences would cost `O(B^3 D)` time and `O(B^2 D)`
    memory (the seed teacher's conv2, D = 12,544: 620 ms per step against
    ~1 ms). Pairs closer than 1e-3 of their norms after centring count as
    coincident (cosine 0), like exactly equal examples.
  """
  student, teacher, weights = common.relational_inputs(
      student_embeddings, teacher_embeddings, weights)
  n = weights.shape[0]
  distinct = (_off_diagonal(n)[:, :, None] & _off_diagonal(n)[:, None, :]
              & _off_diagonal(n)[None, :, :])
  # Indexed [j, i, k], the vertex j first.
  triplet_weights = (weights[:, None, None] * weights[None, :, None]
                     * weights[None, None, :] * distinct)

  def potentials(embeddings):  # Indexed [j, i, k], the vertex j first.
    gram = _centered_gram(embeddings)
    distances, apart = _distances_from_gram(gram)
    norms = jnp.diagonal(gram)
    dots = (gram[None, :, :] - gram[:, :, None] - gram[:, None, :]
            + norms[:, None, None])
    both = apart[:, :, None] & apart[:, None, :]
    lengths = distances[:, :, None] * distances[:, None, :]
    cosines = jnp.where(both, dots / jnp.where(both, lengths, 1.0), 0.0)
    return jnp.clip(cosines, -1.0, 1.0)

  return losses.weighted_mean(
      optax.losses.huber_loss(potentials(student), potentials(teacher),
                              delta=1.0),
      triplet_weights)


def rkd_loss(student_embeddings: ArrayLike,
             teacher_embeddings: ArrayLike,
             *,
             distance_weight: Scalar = 25.0,
             angle_weight: Scalar = 50.0,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Relational KD: weighted distance-wise plus angle-wise losses.

  Park et al., "Relational Knowledge Distillation", CVPR 2019; the default
  weights are the paper's (`lambda_D = 25`, `lambda_A = 50`). See
  `rkd_distance_loss` and `rkd_angle_loss`.

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`.
    distance_weight: weight >= 0 of the distance-wise term.
    angle_weight: weight >= 0 of the angle-wise term.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, aux)`: the scalar `distance_weight * distance + angle_weight *
    angle`, and `aux` with the unweighted scalar terms `'distance'` and
    `'angle'`.
  """
  common.check_non_negative('distance_weight', distance_weight)
  common.check_non_negative('angle_weight', angle_weight)
  distance = rkd_distance_loss(
      student_embeddings, teacher_embeddings, weights=weights)
  angle = rkd_angle_loss(
      student_embeddings, teacher_embeddings, weights=weights)
  loss = distance_weight * distance + angle_weight * angle
  return loss, {'distance': distance, 'angle': angle}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  student_layer = common.student_layers(section)[-1]
  teacher_layer = common.teacher_layers(section)[-1]
  weights = dict(distance_weight=section.distance_weight,
                 angle_weight=section.angle_weight)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return rkd_loss(common.flat(student.features[student_layer]),
                    common.flat(teacher.features[teacher_layer]),
                    weights=objective.batch_weights(batch), **weights)
  return term


METHOD = objective.Method(
    name='rkd',
    reference='Park et al., CVPR 2019',
    description='distances and angles among the examples of a batch',
    settings={
        'weight': objective.term_weight(1.0),
        **common.layer_settings('conv2', 'conv2'),
        'distance_weight': objective.Setting(
            25.0, fields.non_negative_float(),
            'Weight of the distance-wise loss. Number >= 0.'),
        'angle_weight': objective.Setting(
            50.0, fields.non_negative_float(),
            'Weight of the angle-wise loss. Number >= 0.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'rkd'),
    student_layers=lambda section: common.student_layers(section)[-1:],
    teacher_layers=lambda section: common.teacher_layers(section)[-1:],
    zoo_settings=common.zoo_layer('embedding'),
)
