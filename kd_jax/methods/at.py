"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
Attention", ICLR 2017), activation-based.

The term is the attention-map loss summed over the (student, teacher) layer
pairs; with the labels' cross-entropy the paper's objective is `ce, at`,
weight 1000 with the official code's mean-square form (as in CRD's reference
code, RepDistiller).
"""

from collections.abc import Sequence
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


def _check_p(p: Scalar) -> None:
  # |a|^p has a finite derivative at a = 0 only for p >= 1.
  if isinstance(p, numbers.Real) and not p >= 1:
    raise ValueError(f'p must be >= 1, got {p}.')


def attention_map(features: ArrayLike, *, p: Scalar = 2) -> Array:
  """Activation-based spatial attention map, L2-normalised.

  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
  activation-based attention transfer: `F(A) = sum_c |A_c|^p` over channels,
  flattened over space and divided by its L2 norm. (The official code takes
  the mean over channels; after normalisation that is the same map.)

  Args:
    features: `[B, H, W, C]` activations (NHWC, as in Flax), or any
      `[B, ..., C]` with at least one spatial axis.
    p: exponent >= 1 (the paper uses 2).

  Returns:
    `[B, H * W]` maps of unit L2 norm; an all-zero example gives an all-zero
    map (not NaN), with finite gradients.

  Raises:
    ValueError: features of rank < 3, or a Python `p` < 1.
  """
  _check_p(p)
  features = losses.as_float(features)
  if features.ndim < 3:
    raise ValueError('features must be [B, H, W, C] (or [B, ..., C]), got '
                     f'shape {features.shape}.')
  energy = jnp.sum(jnp.abs(features)**p, axis=-1)
  _, unit = common.norm_and_unit(energy.reshape(energy.shape[0], -1))
  return unit


def attention_transfer_loss_per_example(student_features: ArrayLike,
                                        teacher_features: ArrayLike,
                                        *,
                                        p: Scalar = 2) -> Array:
  """Per-example attention-transfer loss of one layer.

  The official code's form, `(at(s) - at(t)).pow(2).mean()`: the mean over
  spatial positions of the squared difference of the normalised maps. (The
  paper's Eq. for the loss writes the L2 norm of the difference, not its
  mean square, with a factor `beta / 2`; the official code and its
  `beta = 1000` use this form.)

  Args:
    student_features: `[B, H, W, Cs]`.
    teacher_features: `[B, H, W, Ct]`, under `stop_gradient`; the channel
      counts may differ, the spatial sizes must match.
    p: exponent >= 1 of `attention_map`.

  Returns:
    `[B]` losses, in `[0, 4 / (H * W)]`.

  Raises:
    ValueError: batch or spatial sizes that differ (the message names both
      shapes).
  """
  student_shape = jnp.shape(student_features)
  teacher_shape = jnp.shape(teacher_features)
  if student_shape[:-1] != teacher_shape[:-1]:
    raise ValueError(
        f'student_features {student_shape} and teacher_features '
        f'{teacher_shape} must have the same batch and spatial sizes (all but '
        'the last, channel, axis); resize one of them first.')
  student_map = attention_map(student_features, p=p)
  teacher_map = attention_map(jax.lax.stop_gradient(teacher_features), p=p)
  return jnp.mean(jnp.square(student_map - teacher_map), axis=-1)


def attention_transfer_loss(student_features: ArrayLike,
                            teacher_features: ArrayLike,
                            *,
                            p: Scalar = 2,
                            weights: ArrayLike | None = None) -> Array:
  """Attention-transfer loss of one layer, mean over the batch.

  Zagoruyko & Komodakis, ICLR 2017. See
  `attention_transfer_loss_per_example`.

  Args:
    student_features: `[B, H, W, Cs]`.
    teacher_features: `[B, H, W, Ct]`, under `stop_gradient`.
    p: exponent >= 1 of `attention_map`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar weighted mean.
  """
  return losses.weighted_mean(
      attention_transfer_loss_per_example(
          losses.mask_rows(student_features, weights),
          losses.mask_rows(teacher_features, weights), p=p), weights)


def multi_layer_attention_transfer_loss(
    feature_pairs: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    p: Scalar = 2,
    weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
  """Attention-transfer loss summed over layers.

  The paper's objective adds `beta / 2` times this sum (`beta = 1000` in the
  official code) to the cross-entropy.

  Args:
    feature_pairs: `(student_features, teacher_features)` pairs, one per
      layer, each as in `attention_transfer_loss` (spatial sizes match within
      a pair and may differ between layers).
    p: exponent >= 1 of `attention_map`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, {})`: the scalar sum over layers of `attention_transfer_loss`.

  Raises:
    ValueError: no pairs, or a pair whose spatial sizes differ (the message
      names the layer and both shapes).
  """
  return common.sum_over_layers(
      lambda student, teacher: attention_transfer_loss(
          student, teacher, p=p, weights=weights),
      feature_pairs)


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  pairs = list(zip(common.student_layers(section),
                   common.teacher_layers(section), strict=True))
  p = section.p

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return multi_layer_attention_transfer_loss(
        [(student.features[s], teacher.features[t]) for s, t in pairs], p=p,
        weights=objective.batch_weights(batch))
  return term


METHOD = objective.Method(
    name='at',
    reference='Zagoruyko & Komodakis, ICLR 2017',
    description='spatial attention maps of intermediate layers',
    settings={
        'weight': objective.term_weight(1000.0),
        **common.layer_settings('conv2', 'conv2'),
        'p': objective.Setting(2.0, fields.Field(
            float, lambda v: v >= 1, 'a number >= 1'),
                               'Exponent of the attention map. Number >= 1.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'at'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    check=common.paired_layers_problems('at'),
    zoo_settings=common.zoo_shared_stages,
)
