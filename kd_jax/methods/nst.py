"""Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge
Distill via Neuron Selectivity Transfer", 2017).

Each channel of a feature map is one sample of a distribution over spatial
positions (its flattened map, L2-normalised); the term is the squared
maximum mean discrepancy (MMD) between the student's and the teacher's
channel distributions, with the polynomial kernel `k(a, b) = (a . b)^2`
(d = 2, c = 0), per example, averaged over the batch and summed over the
(student, teacher) layer pairs. This is RepDistiller's `NSTLoss` (its full
loss, the teacher's constant term included, so that it is an MMD >= 0);
with the labels' cross-entropy the terms are `ce, nst`, weight 50
(RepDistiller's `-b 50`) on every stage the two networks share (its
`feat[1:-1]`).

Channel counts may differ within a pair; spatial sizes must match or differ
by whole factors: as RepDistiller does, the larger map is first
average-pooled to the smaller one's size (its `adaptive_avg_pool2d`, which
is this pooling when the sizes divide). Other sizes are an error naming the
layers (at the start of the distil stage, when the step is traced).
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


def _pool_to(features: Array, size: tuple[int, ...]) -> Array:
  """`[B, H, W, C]` average-pooled to `[B, h, w, C]` (`H / h`, `W / w`
  whole); unchanged if already that size."""
  b, height, width, c = features.shape
  h, w = size
  if (height, width) == (h, w):
    return features
  return features.reshape(b, h, height // h, w, width // w, c).mean((2, 4))


def common_size(student_shape: tuple[int, ...],
                teacher_shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """The spatial size both maps are compared at, None if already equal.

  Args:
    student_shape: `[B, H, W, Cs]` (NHWC, as in Flax), or any `[B, ...,
      Cs]` with at least one spatial axis.
    teacher_shape: `[B, H', W', Ct]`.

  Returns:
    None where the spatial sizes are equal, else `(min(H, H'), min(W,
    W'))`, the size the larger map is average-pooled to (RepDistiller's
    `adaptive_avg_pool2d` of the larger map).

  Raises:
    ValueError: different batch sizes, rank < 3, or `[H, W]` sizes that are
      not whole multiples of their minimum (the message names both shapes).
  """
  s_shape, t_shape = tuple(student_shape), tuple(teacher_shape)
  if (len(s_shape) < 3 or len(s_shape) != len(t_shape)
      or s_shape[0] != t_shape[0]):
    raise ValueError(
        f'student_features {s_shape} and teacher_features {t_shape} must be '
        '[B, H, W, C] maps (or [B, ..., C]) of the same rank and batch '
        'size.')
  if s_shape[1:-1] == t_shape[1:-1]:
    return None
  size = tuple(min(s, t) for s, t in zip(s_shape[1:-1], t_shape[1:-1]))
  if len(size) != 2 or any(
      s % m or t % m for s, t, m in zip(s_shape[1:-1], t_shape[1:-1], size)):
    raise ValueError(
        f'student_features {s_shape} and teacher_features {t_shape}: the '
        'spatial sizes (all but the first and last axes) must be equal, or '
        'each [H, W] a whole multiple of the other (the larger is '
        'average-pooled); choose layers of matching sizes.')
  return size


def nst_loss_per_example(student_features: ArrayLike,
                         teacher_features: ArrayLike) -> Array:
  """Per-example MMD^2 of the channel distributions, polynomial kernel.

  With `s_i` (`i < Cs`) and `t_j` (`j < Ct`) the channels' flattened maps,
  each of unit L2 norm, and `k(a, b) = (a . b)^2`:

    MMD^2 = (1/Ct^2) sum_jj' k(t_j, t_j') + (1/Cs^2) sum_ii' k(s_i, s_i')
            - (2 / (Cs Ct)) sum_ij k(s_i, t_j)

  (the paper's Eq. for `L_MMD^2`). An all-zero channel (a dead ReLU) is a
  zero vector, as `F.normalize` makes it, with finite gradients.

  Args:
    student_features: `[B, H, W, Cs]` (or `[B, ..., Cs]`).
    teacher_features: `[B, H', W', Ct]`, under `stop_gradient`; the
      spatial sizes match or the larger is pooled (`common_size`).

  Returns:
    `[B]` values, >= 0 up to rounding (an MMD^2), 0 when both networks'
    channel distributions are the same (e.g. equal maps).
  """
  student = losses.as_float(student_features)
  teacher = jax.lax.stop_gradient(losses.as_float(teacher_features))
  size = common_size(student.shape, teacher.shape)
  if size is not None:
    student, teacher = _pool_to(student, size), _pool_to(teacher, size)

  def channels(features):  # [B, ..., C] -> [B, C, positions], unit rows.
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    _, unit = common.norm_and_unit(jnp.swapaxes(flat, 1, 2))
    return unit

  s, t = channels(student), channels(teacher)

  def mean_kernel(a, b):
    dots = jnp.einsum('bip,bjp->bij', a, b, precision=common.PRECISION)
    return jnp.mean(jnp.square(dots), axis=(1, 2))

  return mean_kernel(t, t) + mean_kernel(s, s) - 2.0 * mean_kernel(s, t)


def nst_loss(student_features: ArrayLike,
             teacher_features: ArrayLike,
             *,
             weights: ArrayLike | None = None) -> Array:
  """NST loss of one layer pair, weighted mean over the batch (see
  `nst_loss_per_example`; `weights`: `None` or `[B]`, e.g. a padding
  mask)."""
  return losses.weighted_mean(
      nst_loss_per_example(losses.mask_rows(student_features, weights),
                           losses.mask_rows(teacher_features, weights)),
      weights)


def multi_layer_nst_loss(
    feature_pairs: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
  """`nst_loss` summed over `(student, teacher)` layer pairs, as
  RepDistiller sums its `NSTLoss` over the stages.

  Raises:
    ValueError: no pairs, or a pair of incompatible shapes (the message
      names the layer's position and both shapes).
  """
  return common.sum_over_layers(
      lambda student, teacher: nst_loss(student, teacher, weights=weights),
      feature_pairs)


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  pairs = list(zip(common.student_layers(section),
                   common.teacher_layers(section), strict=True))

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    features = []
    for s, t in pairs:
      s_map, t_map = student.features[s], teacher.features[t]
      try:
        common_size(jnp.shape(s_map), jnp.shape(t_map))
      except ValueError as e:
        raise ValueError(
            f'config.distill.nst: student layer {s!r} and teacher layer '
            f'{t!r}: {e}') from e
      features.append((s_map, t_map))
    return multi_layer_nst_loss(features,
                                weights=objective.batch_weights(batch))
  return term


METHOD = objective.Method(
    name='nst',
    reference='Huang & Wang, 2017',
    description='the distribution of each channel over the positions of a '
                'feature map, matched by MMD',
    settings={
        # RepDistiller's `-b 50` (scripts/run_cifar_distill.sh), the weight
        # of its `NSTLoss`, which is this loss.
        'weight': objective.term_weight(50.0),
        **common.layer_settings('conv2', 'conv2'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'nst'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    check=common.paired_layers_problems('nst'),
    zoo_settings=common.zoo_shared_stages,
)
