"""Variational information distillation (Ahn et al., "Variational Information
Distillation for Knowledge Transfer", CVPR 2019).

VID maximises a variational lower bound of the mutual information between a
teacher layer `t` and a student layer `s`: the teacher's map is modelled as
a Gaussian whose mean `mu(s)` a trained regressor predicts from the
student's map and whose variance `sigma_c^2` is a trained value per teacher
channel. The term is the negative log-likelihood, without its constant
`log(2 pi) / 2`,

  mean over positions and channels of  0.5 * (log sigma_c^2
                                              + (t - mu(s))^2 / sigma_c^2),

averaged over the batch and summed over the (student, teacher) layer pairs.
It may be negative (a small variance that fits well).

The regressor and variances (`VIDRegressors`, a module the method adds to
the student: trained and checkpointed with it, never counted as its
parameters) are RepDistiller's `VIDLoss`, which is the authors' code:
`mu` is conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1 without biases, the
middle width the teacher's channel count (its `VIDLoss(s, t, t)`), and
`sigma_c^2 = softplus(alpha_c) + eps` with `alpha` initialised so that
every variance starts at `init_pred_var` (5.0, eps 1e-5). Weight 1
(`-b 1`) on every stage both networks have (its `feat[1:-1]`); terms
`ce, vid`. Where the spatial sizes of a pair differ, the larger map is
average-pooled to the smaller one's size first, as RepDistiller does (the
student's before the regressor, the teacher's before the loss); sizes that
are not whole multiples are an error naming the layers when the distil
stage starts, before any training.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def vid_loss_per_example(mean: ArrayLike, target: ArrayLike,
                         variance: ArrayLike) -> Array:
  """Per-example Gaussian negative log-likelihood of the teacher's map.

  Args:
    mean: `[B, H, W, C]` (or `[B, ..., C]`): the regressor's prediction
      `mu(s)` of the teacher's map.
    target: the teacher's map `t`, same shape, under `stop_gradient`.
    variance: `[C]` per-channel variances `sigma_c^2 > 0`.

  Returns:
    `[B]`: the mean over positions and channels of `0.5 * (log sigma_c^2 +
    (t - mu)^2 / sigma_c^2)`.

  Raises:
    ValueError: `mean` and `target` of different shapes, or `variance` not
      `[C]`.
  """
  common.check_same_shape('mean', mean, 'target', target)
  mean, variance = losses.as_float(mean), losses.as_float(variance)
  if variance.shape != mean.shape[-1:]:
    raise ValueError(f'variance {variance.shape} must be [C] for mean '
                     f'{mean.shape}.')
  target = jax.lax.stop_gradient(losses.as_float(target))
  nll = 0.5 * (jnp.log(variance) + jnp.square(target - mean) / variance)
  return jnp.mean(nll.reshape(nll.shape[0], -1), axis=-1)


def vid_loss(mean: ArrayLike, target: ArrayLike, variance: ArrayLike, *,
             weights: ArrayLike | None = None) -> Array:
  """VID loss of one layer pair: the weighted batch mean of
  `vid_loss_per_example` (`weights`: `None` or `[B]`, e.g. a padding mask;
  rows of weight 0 reach neither the value nor any gradient)."""
  return losses.weighted_mean(vid_loss_per_example(
      losses.mask_rows(mean, weights), losses.mask_rows(target, weights),
      variance), weights)


def multi_layer_vid_loss(
    predictions: Sequence[tuple[ArrayLike, ArrayLike]],
    targets: Sequence[ArrayLike],
    *,
    weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
  """`vid_loss` summed over the layer pairs (RepDistiller's `sum` of its
  `VIDLoss`es).

  Args:
    predictions: per pair, `(mean [B, h, w, C], variance [C])`, the output of
      `VIDRegressors`.
    targets: per pair, the teacher's map `[B, H, W, C]`; average-pooled to
      `(h, w)` where larger.

  Raises:
    ValueError: no pairs, different counts, or a pair whose shapes do not
      fit (the message names the pair's position).
  """
  if not predictions or len(predictions) != len(targets):
    raise ValueError(f'{len(predictions)} predictions and {len(targets)} '
                     'targets: give one of each per layer pair, at least one.')
  total = 0.0
  for layer, ((mean, variance), target) in enumerate(zip(predictions,
                                                         targets)):
    try:
      if jnp.ndim(target) != 4 or jnp.ndim(mean) != 4:
        raise ValueError(f'expected [B, H, W, C] maps, got mean '
                         f'{jnp.shape(mean)} and target {jnp.shape(target)}')
      target = common.average_pool_to(
          losses.as_float(target),
          common.smaller_size(jnp.shape(mean)[1:3], jnp.shape(target)[1:3]))
      total += vid_loss(mean, target, variance, weights=weights)
    except ValueError as e:
      raise ValueError(f'layer {layer}: {e}') from e
  return total, {}


def inverse_softplus(value: float) -> float:
  """`alpha` with `softplus(alpha) = value > 0`: `log(exp(value) - 1)`."""
  return float(value + np.log(-np.expm1(-value)))


class VIDRegressors(nn.Module):
  """Per layer pair: the mean regressor `mu` and the per-channel variances.

  Pair `i` average-pools the student's map to `sizes[i]`, then applies
  conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1 (no biases; widths
  `channels[i]`, the teacher's), and has the parameter `alpha` (`[C]`) with
  `variance = softplus(alpha) + eps`, initialised to `init_variance`.
  """
  channels: tuple[int, ...]
  sizes: tuple[tuple[int, int], ...]
  init_variance: float = 5.0
  eps: float = 1e-5

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]
               ) -> list[tuple[jax.Array, jax.Array]]:
    """Student maps `[(B, H_i, W_i, Cs_i)]` -> `[(mean (B, *sizes[i],
    channels[i]), variance (channels[i],))]`."""
    outputs = []
    alpha = inverse_softplus(self.init_variance - self.eps)
    for i, (x, width, size) in enumerate(zip(features, self.channels,
                                             self.sizes, strict=True)):
      x = common.average_pool_to(x, size)
      for j in range(3):
        if j:
          x = nn.relu(x)
        x = nn.Conv(width, (1, 1), use_bias=False, name=f'pair{i}_conv{j}')(x)
      log_scale = self.param(f'pair{i}_alpha', nn.initializers.constant(alpha),
                             (width,), jnp.float32)
      outputs.append((x, jax.nn.softplus(log_scale) + self.eps))
    return outputs


def regressors(section: ml_collections.ConfigDict,
               student_shapes: Sequence[tuple[int, ...]],
               teacher_shapes: Sequence[tuple[int, ...]]) -> VIDRegressors:
  """The record's `module`: `VIDRegressors` for the section's layer pairs,
  from their shapes (batch axis dropped).

  Raises:
    ValueError: a layer that is not an `(H, W, C)` map, or a pair whose
      spatial sizes do not divide (the message names both layers).
  """
  sizes = common.paired_map_sizes(section, student_shapes, teacher_shapes)
  return VIDRegressors(tuple(shape[-1] for shape in teacher_shapes),
                       tuple(sizes), init_variance=section.init_pred_var,
                       eps=section.eps)


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  teacher_layers = common.teacher_layers(section)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return multi_layer_vid_loss(
        student.modules['vid'],
        [teacher.features[layer] for layer in teacher_layers],
        weights=objective.batch_weights(batch))
  return term


def _problems(section: ml_collections.ConfigDict,
              flat: Mapping[str, Any]) -> list[str]:
  problems = common.paired_layers_problems('vid')(section, flat)
  if section.init_pred_var <= section.eps:
    problems.append(
        f'config.distill.vid.init_pred_var = {section.init_pred_var} must be '
        f'larger than config.distill.vid.eps = {section.eps} (the variances '
        'start at init_pred_var and never go below eps)')
  return problems


METHOD = objective.Method(
    name='vid',
    reference='Ahn et al., CVPR 2019',
    description='intermediate feature maps, as the likelihood of the '
                "teacher's under a Gaussian predicted from the student's",
    settings={
        # RepDistiller's `-b 1` (scripts/run_cifar_distill.sh).
        'weight': objective.term_weight(1.0),
        **common.layer_settings('conv2', 'conv2'),
        # RepDistiller's VIDLoss defaults (also mdistiller's VID.INIT_PRED_VAR
        # and VID.EPS).
        'init_pred_var': objective.Setting(
            5.0, fields.positive_float(),
            'Initial variance sigma_c^2 of every teacher channel. Number > '
            '0, larger than eps.'),
        'eps': objective.Setting(
            1e-5, fields.positive_float(),
            'Lower bound of the variances: sigma_c^2 = softplus(alpha_c) + '
            'eps. Number > 0.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'vid'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=regressors,
    check=_problems,
    zoo_settings=common.zoo_shared_stages,
)
