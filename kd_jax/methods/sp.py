"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019): the batch's pairwise similarities of activations.

For each (student, teacher) layer pair, the `[B, B]` Gram matrix of the
batch's flattened activations, each row L2-normalised, of the student is
matched to the teacher's; the term sums `||G_s - G_t||_F^2 / B^2` over the
pairs (widths and spatial sizes may differ: only the batch is shared).
With the labels' cross-entropy the paper's objective is `ce, sp`; the
weight is RepDistiller's (`-b 3000`, for this same loss, its `Similarity`
module), on the last stage of each network (RepDistiller's `feat[-2]`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def similarity_matrix(features: Array) -> Array:
  """`[B, B]` row-normalised Gram matrix of `[B, D]` features.

  `G = F F^T`, each row divided by its L2 norm (the paper's `G~ / ||G~[i,
  :]||_2`, RepDistiller's `F.normalize(G)`). The features are first divided
  by their largest |element| (under `stop_gradient`; `G`'s rows are exactly
  invariant to it), so that the products neither overflow nor underflow. A
  zero example has a zero row (and column), with finite gradients.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(features)))
  features = features / jnp.where(scale > 0, scale, 1.0)
  gram = jnp.matmul(features, features.T, precision=common.PRECISION)
  _, rows = common.norm_and_unit(gram)
  return rows


def sp_loss(student_features: ArrayLike,
            teacher_features: ArrayLike,
            *,
            weights: ArrayLike | None = None) -> Array:
  """Similarity-preserving loss of one layer pair.

  Tung & Mori, ICCV 2019, Eq. for `L_SP`: `(1 / B^2) ||G_s - G_t||_F^2`,
  with `G` the row-normalised Gram matrix of the batch's activations
  (`similarity_matrix`).

  Args:
    student_features: `[B, ...]` (trailing axes are flattened).
    teacher_features: `[B, ...]`, under `stop_gradient`; only the batch
      size must match the student's.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask): an
      entry `(i, j)` weighs `w_i w_j`, and the sum is divided by `(sum w)^2`
      (so a 0/1 mask gives the loss of the kept examples alone).

  Returns:
    Scalar loss, 0 where the two Gram matrices agree after normalisation
    and at most `4 / B` without weights (normalised rows differ by at most 2
    in norm). Invariant to scaling either network's features.
  """
  student, teacher, weights = common.relational_inputs(
      student_features, teacher_features, weights)
  difference = similarity_matrix(student) - similarity_matrix(teacher)
  return losses.weighted_mean(jnp.square(difference),
                              weights[:, None] * weights[None, :])


def multi_layer_sp_loss(
    feature_pairs: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
  """`sp_loss` summed over `(student, teacher)` layer pairs (the paper's
  sum over the pairs `I`).

  Raises:
    ValueError: no pairs, or a pair that cannot be compared (the message
      names the layer's position).
  """
  return common.sum_over_layers(
      lambda student, teacher: sp_loss(student, teacher, weights=weights),
      feature_pairs)


def _last_stage(names: tuple[str, ...]) -> str:
  """The last `stageK` of a zoo feature list (`stem, stage1..K,
  embedding`): RepDistiller's `feat[-2]`."""
  return [name for name in names if name.startswith('stage')][-1]


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  pairs = list(zip(common.student_layers(section),
                   common.teacher_layers(section), strict=True))

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return multi_layer_sp_loss(
        [(student.features[s], teacher.features[t]) for s, t in pairs],
        weights=objective.batch_weights(batch))
  return term


METHOD = objective.Method(
    name='sp',
    reference='Tung & Mori, ICCV 2019',
    description='the pairwise similarities of the examples of a batch, '
                'per layer',
    settings={
        # RepDistiller's `-b 3000` (scripts/run_cifar_distill.sh), the weight
        # of its `Similarity` loss, which is this one.
        'weight': objective.term_weight(3000.0),
        **common.layer_settings('conv2', 'conv2'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'sp'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    check=common.paired_layers_problems('sp'),
    zoo_settings=lambda teacher, student: {
        'student_layers': _last_stage(student),
        'teacher_layers': _last_stage(teacher)},
)
