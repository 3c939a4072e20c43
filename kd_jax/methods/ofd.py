"""Overhaul of feature distillation (Heo et al., "A Comprehensive Overhaul
of Feature Distillation", ICCV 2019).

OFD distils pre-ReLU feature maps. The student's map `s` goes through a
connector (conv1x1 without bias, then batch norm) to the teacher's
channels; the teacher's pre-ReLU map `t` through the margin ReLU
`t' = max(t, m_c)`, where the margin `m_c` of channel `c` is the
expectation of the teacher's negative responses, `E[x | x < 0]` for `x ~
N(beta_c, gamma_c^2)`, from the batch norm right before the teacher's
ReLU (scale `gamma`, bias `beta`):

  m_c = beta_c - |gamma_c| phi(beta_c / |gamma_c|) / Phi(-beta_c / |gamma_c|),

or `-3 |gamma_c|` where `Phi(-beta_c / |gamma_c|) <= 0.001` (a channel
almost never negative). The partial L2 distance counts `(s - t')^2` only
where `s > t'` or `t' > 0` (a student below a non-positive target is left
alone: the ReLU hides that difference), summed over positions and
channels. Level `i` of `L` (in the order of the layer lists, shallow to
deep) is weighted `1 / 2^(L - i - 1)`.

All of this follows the authors' CIFAR-100 code (clovaai/overhaul-
distillation, `CIFAR-100/distiller.py`: `distillation_loss`,
`build_feature_connector`, `get_margin_from_BN`, `Distiller.forward`;
`train_with_distillation.py`): their loss is `loss_CE + loss_distill.sum()
/ batch_size / 1000`, the sum running over the batch, positions and
channels. Here the term is the batch mean of each example's sum (the mean
over the batch's real rows, weighted by its mask), so that its default
weight 1e-3 with `ce` at weight 1 gives exactly the authors' loss
(mdistiller's `OFD.LOSS.FEAT_WEIGHT` 0.001 on the same batch mean).
Connector: the authors' init (conv N(0, sqrt(2 / out_channels)), i.e.
He-normal fan_out; BN scale 1, bias 0).

The margins need the teacher's trained parameters: the record's
`teacher_constants` reads the BN before each teacher layer's ReLU
(`kd_jax.models.bn_before_relu`, RepDistiller's `get_bn_before_relu`) when
the distil stage starts; a teacher layer that has none (a ShuffleNet, the
seed teacher without batch norm, a layer that is not a pre-activation) is
an error naming the layer and the model before any training. (Built
without margins, `loss(section)`, the term uses those of a batch norm at
its initialisation, `INITIAL_MARGIN` = -sqrt(2 / pi); the pipeline always
gives the teacher's.) Where a residual sum precedes the ReLU (ResNets,
MobileNetV2), the BN is the one on the residual branch, as the authors and
RepDistiller take it; `bn_cnn`'s `blockK_preact` is the max-pooled output
of block K's last BN, whose margins it gets. The layers on a CIFAR pair:
the zoo's `stageK_preact` of the last `min(K_t, K_s)` stages of both
networks (all of them: the authors' networks, and the CRD pairs, have as
many stages; mdistiller's `_align_list` keeps the deepest where counts
differ).

Differences from the authors' code:
  * The teacher runs in inference mode (running BN statistics), as for
    every method here; the authors' training loop (and mdistiller's OFD)
    put the teacher in train mode, so its features there are normalised
    with each batch's statistics.
  * The connector's batch norm always normalises with the batch's own
    statistics (`common.BatchStatsNorm`, over every row of the batch: the
    training batches are never padded) and keeps no running averages: it
    exists only in the training loss, where PyTorch's is in train mode too.
  * Maps of different sizes are allowed: the larger is average-pooled to
    the smaller's size (the student's before the connector, the teacher's
    before the margin), as mdistiller pools the teacher's; the authors'
    pairs have equal sizes.
  * A channel with `gamma = 0` (a constant `beta`; their code divides by
    zero) gets the margin `min(beta, 0)`.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import losses
from kd_jax import models
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common
from kd_jax.zoo import layers as zoo_layers

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# The authors' fallback: below this probability of a negative response, the
# margin is -3 |gamma|.
MIN_NEGATIVE_PROBABILITY = 0.001


def margin_from_batch_norm(scale: ArrayLike, bias: ArrayLike) -> Array:
  """OFD's margins `E[x | x < 0]`, `x ~ N(bias, scale^2)`, per channel.

  Args:
    scale: `[C]` the batch norm's scale `gamma` (its absolute value is used,
      as in the authors' code).
    bias: `[C]` its bias `beta`.

  Returns:
    `[C]` margins, all <= 0: `beta - |gamma| phi(z) / Phi(-z)`, `z = beta /
    |gamma|`, where `Phi(-z) > 0.001`; else `-3 |gamma|`; `min(beta, 0)`
    where `gamma = 0`. At least float32.
  """
  scale, bias = losses.as_float(scale), losses.as_float(bias)
  std = jnp.abs(scale)
  constant = std == 0
  z = bias / jnp.where(constant, 1.0, std)
  below = jax.scipy.special.ndtr(-z)
  usable = below > MIN_NEGATIVE_PROBABILITY
  density = jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
  closed_form = bias - std * density / jnp.where(usable, below, 1.0)
  margin = jnp.where(usable, closed_form, -3.0 * std)
  return jnp.where(constant, jnp.minimum(bias, 0.0), margin)


# The margin of a batch norm at its initialisation (scale 1, bias 0):
# -sqrt(2 / pi), the default of a term built without the teacher's margins.
INITIAL_MARGIN = -math.sqrt(2 / math.pi)


def ofd_loss_per_example(student: ArrayLike, teacher: ArrayLike,
                         margin: ArrayLike) -> Array:
  """Per-example partial L2 distance to the margin-ReLU'd teacher.

  Args:
    student: `[B, ..., C]`, the connector's output.
    teacher: the teacher's pre-ReLU map, same shape, under `stop_gradient`.
    margin: `[C]` per-channel margins (or a scalar), <= 0.

  Returns:
    `[B]`: the sum over positions and channels of `(s - t')^2` where `s >
    t'` or `t' > 0`, `t' = max(t, margin)`. Elements left out add 0 to the
    value and to every gradient, whatever they hold.

  Raises:
    ValueError: `student` and `teacher` of different shapes, or `margin`
      neither a scalar nor `[C]`.
  """
  common.check_same_shape('student', student, 'teacher', teacher)
  student, margin = losses.as_float(student), losses.as_float(margin)
  if margin.ndim and margin.shape != student.shape[-1:]:
    raise ValueError(f'margin {margin.shape} must be [C] (or a scalar) for '
                     f'maps {student.shape}.')
  target = jnp.maximum(jax.lax.stop_gradient(losses.as_float(teacher)),
                       margin)
  counted = (student > target) | (target > 0)
  # Left-out differences are 0 before squaring: no inf * 0 in value or grad.
  difference = jnp.where(counted, student - target, 0.0)
  return jnp.sum(jnp.square(difference).reshape(student.shape[0], -1),
                 axis=-1)


def ofd_loss(student: ArrayLike, teacher: ArrayLike, margin: ArrayLike, *,
             weights: ArrayLike | None = None) -> Array:
  """OFD loss of one level: the weighted batch mean of
  `ofd_loss_per_example` (`weights`: `None` or `[B]`, e.g. a padding mask;
  rows of weight 0 reach neither the value nor any gradient)."""
  return losses.weighted_mean(ofd_loss_per_example(
      losses.mask_rows(student, weights), losses.mask_rows(teacher, weights),
      margin), weights)


def multi_level_ofd_loss(
    students: Sequence[ArrayLike], teachers: Sequence[ArrayLike],
    margins: Sequence[ArrayLike] | None = None, *,
    weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
  """`sum_i ofd_loss(s_i, t_i, m_i) / 2^(L - i - 1)` over the `L` levels.

  Args:
    students: per level, the connector's output `[B, h, w, C]`.
    teachers: per level, the teacher's pre-ReLU map `[B, H, W, C]`; where
      the sizes differ, the larger map is average-pooled to the smaller's.
    margins: per level, `[C]` margins (`margin_from_batch_norm`); None: the
      `INITIAL_MARGIN` for every channel.
    weights: `None` or `[B]` per-example weights.

  Returns:
    `(loss, {})`.

  Raises:
    ValueError: no levels, different counts, or a level whose shapes do not
      fit (the message names the level's position).
  """
  count = len(students)
  if not count or len(teachers) != count:
    raise ValueError(f'{count} student and {len(teachers)} teacher maps: '
                     'give one of each per level, at least one.')
  if margins is None:
    margins = [INITIAL_MARGIN] * count
  if len(margins) != count:
    raise ValueError(f'{len(margins)} margins for {count} levels.')
  total = 0.0
  for level, (student, teacher, margin) in enumerate(
      zip(students, teachers, margins)):
    try:
      if jnp.ndim(student) != 4 or jnp.ndim(teacher) != 4:
        raise ValueError(f'expected [B, H, W, C] maps, got student '
                         f'{jnp.shape(student)} and teacher '
                         f'{jnp.shape(teacher)}')
      size = common.smaller_size(jnp.shape(student)[1:3],
                                 jnp.shape(teacher)[1:3])
      total += ofd_loss(
          common.average_pool_to(losses.as_float(student), size),
          common.average_pool_to(losses.as_float(teacher), size), margin,
          weights=weights) / 2**(count - level - 1)
    except ValueError as e:
      raise ValueError(f'level {level}: {e}') from e
  return total, {}


class OFDConnectors(nn.Module):
  """Per level, the authors' connector: conv1x1 (no bias) + batch norm.

  Level `i` average-pools the student's map to `sizes[i]`, then applies
  a 1x1 convolution to `channels[i]` (the teacher's) channels, He-normal
  fan_out init (`connector{i}_conv`), and `common.BatchStatsNorm`
  (`connector{i}_bn`: the batch's own statistics, eps 1e-5, scale 1 and
  bias 0 at init, no running averages).
  """
  channels: tuple[int, ...]
  sizes: tuple[tuple[int, int], ...]

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """Student maps `[(B, H_i, W_i, Cs_i)]` -> `[(B, *sizes[i],
    channels[i])]`."""
    outputs = []
    for i, (x, width, size) in enumerate(zip(features, self.channels,
                                             self.sizes, strict=True)):
      x = common.average_pool_to(losses.as_float(x), size)
      x = nn.Conv(width, (1, 1), use_bias=False,
                  kernel_init=zoo_layers.KAIMING_FAN_OUT,
                  name=f'connector{i}_conv')(x)
      outputs.append(common.BatchStatsNorm(name=f'connector{i}_bn')(x))
    return outputs


def connectors(section: ml_collections.ConfigDict,
               student_shapes: Sequence[tuple[int, ...]],
               teacher_shapes: Sequence[tuple[int, ...]]) -> OFDConnectors:
  """The record's `module`: `OFDConnectors` for the section's layer pairs,
  from their shapes (batch axis dropped).

  Raises:
    ValueError: a layer that is not an `(H, W, C)` map, or a pair whose
      spatial sizes do not divide (the message names both layers).
  """
  sizes = common.paired_map_sizes(section, student_shapes, teacher_shapes)
  return OFDConnectors(tuple(shape[-1] for shape in teacher_shapes),
                       tuple(sizes))


def teacher_margins(section: ml_collections.ConfigDict, teacher_model: str,
                    teacher_variables: Any) -> list[Array]:
  """The record's `teacher_constants`: per teacher layer, the `[C]` margins
  of the batch norm before its ReLU, from the teacher's variables.

  Raises:
    ValueError: a teacher layer has no batch norm right before a ReLU in
      `teacher_model` (the message names both).
  """
  margins = []
  for layer in common.teacher_layers(section):
    path = models.bn_before_relu(teacher_model, layer)
    node = teacher_variables['params']
    for key in path:
      if key not in node:
        raise ValueError(f'teacher model {teacher_model!r} has no batch norm '
                         f'{"/".join(path)} (before layer {layer!r}) in its '
                         'parameters')
      node = node[key]
    margins.append(margin_from_batch_norm(node['scale'], node['bias']))
  return margins


def _term(section: ml_collections.ConfigDict,
          margins: Sequence[ArrayLike] | None = None) -> objective.TermFn:
  """The term; `margins` from `teacher_margins` (None: `INITIAL_MARGIN`)."""
  teacher_layers = common.teacher_layers(section)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return multi_level_ofd_loss(
        student.modules['ofd'],
        [teacher.features[layer] for layer in teacher_layers], margins,
        weights=objective.batch_weights(batch))
  return term


def _zoo_layers(teacher: tuple[str, ...], student: tuple[str, ...]
                ) -> dict[str, str]:
  """The pre-ReLU maps of the last `min(K_t, K_s)` stages of each network
  (`feature_names` are stem, stage1..K, embedding)."""
  count = min(len(teacher), len(student)) - 2

  def preacts(names: tuple[str, ...]) -> str:
    return ','.join(f'{name}_preact' for name in names[1:-1][-count:])

  return {'student_layers': preacts(student),
          'teacher_layers': preacts(teacher)}


METHOD = objective.Method(
    name='ofd',
    reference='Heo et al., ICCV 2019',
    description="pre-ReLU feature maps through a connector, against the "
                "teacher's after a margin ReLU, by a partial L2 distance",
    settings={
        # The authors' loss_distill.sum() / batch_size / 1000 with CE at
        # weight 1 (mdistiller's FEAT_WEIGHT 0.001): the term is the batch
        # mean of each example's sum.
        'weight': objective.term_weight(1e-3),
        **common.layer_settings('conv1,conv2', 'block1_preact,block2_preact'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'ofd'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=connectors,
    teacher_constants=teacher_margins,
    check=common.paired_layers_problems('ofd'),
    zoo_settings=_zoo_layers,
)
