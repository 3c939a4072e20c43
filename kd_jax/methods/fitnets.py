"""FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

A learned regressor (`HintRegressor`, a module the method adds to the
student: its parameters train and are checkpointed with the student's and
never count as the student's) maps the student's hint layers to the
teacher's shapes; the term is the mean squared error to the teacher's
layers, summed over the layer pairs. As in CRD's reference code
(RepDistiller), the hint and the labels' cross-entropy train jointly (terms
`ce, fitnets`, hint weight 100), not in the paper's two separate phases.
"""

from collections.abc import Sequence

import jax
import flax.linen as nn
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


def hint_loss_per_example(student_features: ArrayLike,
                          teacher_features: ArrayLike) -> Array:
  """Per-example FitNets hint loss: mean squared error of the features.

  Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, hint-based
  training. The paper's hint loss is `1/2 ||teacher - regressor(student)||^2`,
  a sum; this is the mean over feature elements instead (a constant factor
  that the loss weight absorbs, and which does not grow with the feature
  size).

  Args:
    student_features: `[B, ...]` student features already mapped by the
      learned regressor to the teacher's shape.
    teacher_features: `[B, ...]` teacher ("hint") features, same shape, under
      `stop_gradient`.

  Returns:
    `[B]` mean over each example's feature elements of the squared error.

  Raises:
    ValueError: features of different shapes or without a batch axis.
  """
  common.check_same_shape('student_features', student_features,
                    'teacher_features', teacher_features)
  if jnp.ndim(student_features) < 1:
    raise ValueError('features must have a batch axis, got a scalar.')
  diff = (losses.as_float(student_features)
          - jax.lax.stop_gradient(losses.as_float(teacher_features)))
  return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def hint_loss(student_features: ArrayLike,
              teacher_features: ArrayLike,
              *,
              weights: ArrayLike | None = None
              ) -> tuple[Array, dict[str, Array]]:
  """Mean over the batch of `hint_loss_per_example` (FitNets, ICLR 2015).

  Args:
    student_features: `[B, ...]`, already through the regressor.
    teacher_features: `[B, ...]`, same shape, under `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, {})`: the weighted mean squared error; rows of weight 0 reach
    neither the value nor any gradient.
  """
  return losses.weighted_mean(hint_loss_per_example(
      losses.mask_rows(student_features, weights),
      losses.mask_rows(teacher_features, weights)), weights), {}


def regressor_problem(student_shape: Sequence[int],
                      teacher_shape: Sequence[int]) -> str | None:
  """Why no FitNets regressor maps this student feature to the teacher's,
  or None. Shapes exclude the batch axis: `(H, W, C)` or `(D,)`."""
  if len(student_shape) != len(teacher_shape) or len(student_shape) not in (
      1, 3):
    return (f'student feature shape {tuple(student_shape)} and teacher '
            f'feature shape {tuple(teacher_shape)}: expected both (H, W, C) '
            'or both (D,)')
  if len(student_shape) == 3 and (student_shape[0] < teacher_shape[0] or
                                  student_shape[1] < teacher_shape[1]):
    return (f'student feature map {tuple(student_shape[:2])} is smaller than '
            f'the teacher\'s {tuple(teacher_shape[:2])}; pick a student layer '
            'with at least the teacher layer\'s spatial size')
  return None


class HintRegressor(nn.Module):
  """FitNets' regressors: map student features to the teacher's shapes.

  Romero et al. (ICLR 2015), Section 2.2: a convolutional regressor with
  kernel `(H_s - H_t + 1, W_s - W_t + 1)` and no padding, so that a
  `(H_s, W_s, C_s)` student map becomes `(H_t, W_t, C_t)` (a 1x1 convolution
  when sizes agree); a linear map for `(D,)` features. One regressor per
  pair of layers; check shapes with `regressor_problem` first.
  """
  target_shapes: tuple[tuple[int, ...], ...]

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """Student features `[(B, *S_i)]` -> `[(B, *target_shapes[i])]`."""
    mapped = []
    for i, (x, target) in enumerate(zip(features, self.target_shapes,
                                        strict=True)):
      if x.ndim == 2:
        mapped.append(nn.Dense(target[-1], name=f'regressor{i}')(x))
      else:
        kernel = (x.shape[1] - target[0] + 1, x.shape[2] - target[1] + 1)
        mapped.append(nn.Conv(target[-1], kernel, padding='VALID',
                              name=f'regressor{i}')(x))
    return mapped


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  teacher_layers = common.teacher_layers(section)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    weights = objective.batch_weights(batch)
    total = 0.0
    for mapped, layer in zip(student.modules['fitnets'], teacher_layers,
                             strict=True):
      total += hint_loss(mapped, teacher.features[layer], weights=weights)[0]
    return total, {}
  return term


def _regressor(section: ml_collections.ConfigDict,
               student_shapes: Sequence[tuple[int, ...]],
               teacher_shapes: Sequence[tuple[int, ...]]) -> HintRegressor:
  for layer, s_shape, t_shape in zip(common.student_layers(section),
                                     student_shapes, teacher_shapes):
    problem = regressor_problem(s_shape, t_shape)
    if problem:
      raise ValueError(f'student layer {layer!r}: {problem}')
  return HintRegressor(tuple(tuple(s) for s in teacher_shapes))


METHOD = objective.Method(
    name='fitnets',
    reference='Romero et al., ICLR 2015',
    description='intermediate feature maps, through a learned regressor',
    settings={
        'weight': objective.term_weight(100.0),
        **common.layer_settings('conv2', 'conv2'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'fitnets'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=_regressor,
    check=common.paired_layers_problems('fitnets'),
    zoo_settings=common.zoo_layer('stage2'),
)
