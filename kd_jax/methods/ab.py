"""Activation boundaries (Heo et al., "Knowledge Transfer via Distillation
of Activation Boundaries Formed by Hidden Neurons", AAAI 2019), as
RepDistiller runs it.

AB transfers where the teacher's neurons switch on and off: the sign
pattern of its pre-ReLU maps. It does so before training on labels, as an
initialisation: the method's preparation stage (`objective.Preparation`
'ab_init', its one term `INIT_TERM`) trains the student's feature layers
(all of its parameters but the classifier) and a connector per level
(`ABConnectors`, a module added to the student for that stage only), from
the teacher, with the alternative (hinge-like, squared) loss of the paper,
per element of the connector's output `s` and the teacher's pre-ReLU map
`t`, margin `m`:

  (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0],

summed over positions and channels, averaged over the batch, level `i` of
`L` (shallow to deep) weighted `2^(i - L + 1)`, and the total times 3 /
1000. The distil stage then starts from those student parameters and trains
on the labels' cross-entropy alone (terms `ce`): RepDistiller's run script
gives AB `-a 0` and its loop `loss_kd = 0`, so the record has no term of its
own (`loss=None`). The connectors are dropped after the preparation stage.

This follows RepDistiller (`distiller_zoo/AB.py` `ABLoss`, `models/util.py`
`Connector` and `ConvReg(use_relu=False)`, `train_student.py` and
`helper/pretrain.py`: `init_epochs` = 30, the student's feature modules and
the connector train, `margin` 1.0), which follows the authors' loss
(bhheo/AB_distillation, `criterion_alternative_L2`, `/ batch_size / 1000 *
3` and the halving per shallower level). Where they differ:
  * Connectors. The authors' are conv1x1 (no bias) + batch norm where the
    channel counts differ; RepDistiller's (and these) are the identity
    where the student's map has the teacher's (H, C), else its `ConvReg`
    without ReLU: a conv3x3 stride 2 (padding 1) when the student's map is
    twice the teacher's size, a transposed conv4x4 stride 2 (padding 1)
    when half, else a VALID conv of kernel `(1 + s_H - t_H, 1 + s_W -
    t_W)`, with biases and PyTorch's default initialisation, then batch
    norm. Other shapes are an error naming the layers before any training.
    The batch norm is `common.BatchStatsNorm` (the batch's own statistics,
    as PyTorch's in training mode throughout the stage; no running
    averages, which nothing would use: the connectors run only in the
    preparation stage's loss).
  * After the initialisation the authors train with KD alone (T = 3,
    without T^2, no CE); RepDistiller, and the record's `terms`, with CE
    alone. `config.distill.terms` may name other terms (e.g. `kd`).
  * The teacher runs in inference mode (running BN statistics), as in
    RepDistiller; the authors' initialisation runs it in training mode.
  * The preparation stage trains with `config.student.optimizer` at its
    base learning rate, held constant (`objective.Preparation`), as
    RepDistiller (SGD at its learning rate); its epochs are `init_epochs`
    (RepDistiller's 30 of its 240; the seed experiment takes the same 1/8).
  * Identity needs the whole `(H, W, C)` to match (RepDistiller compares C
    and H only, the same for its square maps).

The layers are pre-ReLU maps (the paper's activation boundaries; RepDistiller
`preact=True`, its `feat[1:-1]`): on a CIFAR pair every stage's
`stageK_preact`; on the seed protocol the student's conv1 and conv2 outputs
(14x14x16 and 7x7x32, before its LeakyReLU, whose boundary is 0 as a ReLU's,
and before nothing) against bn_cnn's block1_preact and block2_preact (the
same shapes: identity connectors).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common
from kd_jax.zoo import layers as zoo_layers

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# RepDistiller's (and the authors') scale of the summed loss: / 1000 * 3.
LOSS_SCALE = 3 / 1000


# --- The loss. ----------------------------------------------------------------


def ab_loss_per_example(source: ArrayLike, target: ArrayLike,
                        margin: float) -> Array:
  """Per-example alternative loss of activation boundaries.

  Args:
    source: `[B, ...]`, the connector's output (the student's pre-ReLU map
      mapped to the teacher's shape).
    target: the teacher's pre-ReLU map, same shape, under `stop_gradient`.
    margin: `m > 0`.

  Returns:
    `[B]`: the sum over each example's elements of `(s + m)^2` where `s >
    -m` and `t <= 0` plus `(s - m)^2` where `s <= m` and `t > 0`
    (RepDistiller's `criterion_alternative_l2`, per example). Elements left
    out add 0 to the value and every gradient, whatever they hold.

  Raises:
    ValueError: different shapes, no batch axis, or a margin <= 0.
  """
  common.check_same_shape('source', source, 'target', target)
  if jnp.ndim(source) < 1:
    raise ValueError('source must have a batch axis, got a scalar.')
  if isinstance(margin, (int, float)) and not margin > 0:
    raise ValueError(f'margin must be > 0, got {margin}.')
  source = losses.as_float(source)
  target = jax.lax.stop_gradient(losses.as_float(target))
  off = (source > -margin) & (target <= 0)
  on = (source <= margin) & (target > 0)
  # Left-out differences are 0 before squaring: no inf * 0 in value or grad.
  below = jnp.where(off, source + margin, 0.0)
  above = jnp.where(on, source - margin, 0.0)
  squares = jnp.square(below) + jnp.square(above)
  return jnp.sum(squares.reshape(squares.shape[0], -1), axis=-1)


def ab_loss(source: ArrayLike, target: ArrayLike, margin: float, *,
            weights: ArrayLike | None = None) -> Array:
  """AB loss of one level, unscaled: the weighted batch mean of
  `ab_loss_per_example` (`weights`: `None` or `[B]`, e.g. a padding mask;
  rows of weight 0 reach neither the value nor any gradient)."""
  return losses.weighted_mean(ab_loss_per_example(
      losses.mask_rows(source, weights), losses.mask_rows(target, weights),
      margin), weights)


def multi_level_ab_loss(
    students: Sequence[ArrayLike], teachers: Sequence[ArrayLike], *,
    margin: float, weights: ArrayLike | None = None
) -> tuple[Array, dict[str, Array]]:
  """RepDistiller's `sum(ABLoss(L, margin)(students, teachers))`.

  Args:
    students: per level, the connector's output `[B, H, W, C]`.
    teachers: per level, the teacher's pre-ReLU map, the same shape.
    margin: `m > 0`.
    weights: `None` or `[B]` per-example weights.

  Returns:
    `(3 / 1000 * sum_i 2^(i - L + 1) ab_loss(s_i, t_i), {})`: the deepest
    level at weight 1, each shallower one at half the next one's.

  Raises:
    ValueError: no levels, different counts, or a level whose shapes do not
      match (the message names the level's position).
  """
  count = len(students)
  if not count or len(teachers) != count:
    raise ValueError(f'{count} student and {len(teachers)} teacher maps: '
                     'give one of each per level, at least one.')
  total = 0.0
  for level, (student, teacher) in enumerate(zip(students, teachers)):
    try:
      total += ab_loss(student, teacher, margin,
                       weights=weights) * 2.0**(level - count + 1)
    except ValueError as e:
      raise ValueError(f'level {level}: {e}') from e
  return total * LOSS_SCALE, {}


# --- The connectors. ----------------------------------------------------------

IDENTITY, DOWN, UP, VALID = 'identity', 'down', 'up', 'valid'


def connector_kind(student_shape: Sequence[int],
                   teacher_shape: Sequence[int]) -> str:
  """Which connector maps an `(H, W, C)` student map to the teacher's shape.

  Returns:
    `'identity'` (same shape), `'down'` (conv3x3 stride 2, padding 1: `s_H
    = 2 t_H`), `'up'` (transposed conv4x4 stride 2, padding 1: `2 s_H =
    t_H`) or `'valid'` (VALID conv of kernel `(1 + s_H - t_H, 1 + s_W -
    t_W)`: `s_H >= t_H`), in RepDistiller's order.

  Raises:
    ValueError: shapes that are not `(H, W, C)`, or that none of these maps
      to exactly the teacher's shape.
  """
  if len(student_shape) != 3 or len(teacher_shape) != 3:
    raise ValueError('expected (H, W, C) feature maps')
  (s_h, s_w, _), (t_h, t_w, _) = student_shape, teacher_shape
  if tuple(student_shape) == tuple(teacher_shape):
    return IDENTITY
  if s_h == 2 * t_h:
    kind, size = DOWN, ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
  elif 2 * s_h == t_h:
    kind, size = UP, (2 * s_h, 2 * s_w)
  elif s_h >= t_h:
    kind, size = VALID, (t_h, t_w) if s_w >= t_w else None
  else:
    kind, size = None, None
  if kind is None or size != (t_h, t_w):
    raise ValueError(
        'no connector maps it to the teacher\'s shape (RepDistiller\'s: the '
        'same shape, or a student map of twice, half, or at least the '
        'teacher\'s height and a width to match)')
  return kind


class ABConnectors(nn.Module):
  """Per level, RepDistiller's AB connector (`Connector`).

  Level `i` is the identity where `kinds[i]` is `'identity'`, else
  RepDistiller's `ConvReg(use_relu=False)` to `channels[i]` channels (see
  `connector_kind`; `connector{i}_conv`, with a bias, PyTorch's default
  initialisation), then `common.BatchStatsNorm` (`connector{i}_bn`).
  """
  kinds: tuple[str, ...]
  channels: tuple[int, ...]
  kernels: tuple[tuple[int, int], ...]

  @nn.compact
  def __call__(self, features: Sequence[ArrayLike]) -> list[Array]:
    """Student maps `[(B, H_i, W_i, Cs_i)]` -> maps of the teacher's shapes."""
    outputs = []
    for i, (x, kind, width, kernel) in enumerate(zip(
        features, self.kinds, self.channels, self.kernels, strict=True)):
      x = losses.as_float(x)
      if kind == IDENTITY:
        outputs.append(x)
        continue
      fan_in = x.shape[-1] * kernel[0] * kernel[1]
      if kind == UP:
        # PyTorch's ConvTranspose2d(Cs, Ct, 4, 2, 1): its weight (Cs, Ct, 4,
        # 4) is this kernel (4, 4, Ct, Cs) transposed; padding 1 is 4 - 1 -
        # 1 = 2 on each side of the dilated input; its fan_in is Ct * 16.
        layer = nn.ConvTranspose(
            width, kernel, strides=(2, 2), padding=((2, 2), (2, 2)),
            transpose_kernel=True, kernel_init=zoo_layers.TORCH_DEFAULT,
            bias_init=zoo_layers.torch_bias_init(
                width * kernel[0] * kernel[1]),
            name=f'connector{i}_conv')
      else:
        strides, padding = ((2, 2), ((1, 1), (1, 1))) if kind == DOWN else (
            (1, 1), 'VALID')
        layer = nn.Conv(width, kernel, strides=strides, padding=padding,
                        kernel_init=zoo_layers.TORCH_DEFAULT,
                        bias_init=zoo_layers.torch_bias_init(fan_in),
                        name=f'connector{i}_conv')
      outputs.append(common.BatchStatsNorm(name=f'connector{i}_bn')(layer(x)))
    return outputs


def connectors(section: ml_collections.ConfigDict,
               student_shapes: Sequence[tuple[int, ...]],
               teacher_shapes: Sequence[tuple[int, ...]]) -> ABConnectors:
  """`INIT_TERM`'s `module`: `ABConnectors` for the section's layer pairs,
  from their shapes (batch axis dropped).

  Raises:
    ValueError: a pair no connector maps (the message names both layers).
  """
  kinds, kernels = [], []
  for s_layer, t_layer, s_shape, t_shape in zip(
      common.student_layers(section), common.teacher_layers(section),
      student_shapes, teacher_shapes, strict=True):
    try:
      kind = connector_kind(s_shape, t_shape)
    except ValueError as e:
      raise ValueError(
          f'student layer {s_layer!r} {tuple(s_shape)} and teacher layer '
          f'{t_layer!r} {tuple(t_shape)}: {e}; choose layers of matching '
          'sizes') from e
    kinds.append(kind)
    kernels.append({IDENTITY: (1, 1), DOWN: (3, 3), UP: (4, 4)}.get(
        kind, (1 + s_shape[0] - t_shape[0], 1 + s_shape[1] - t_shape[1])))
  return ABConnectors(tuple(kinds), tuple(s[-1] for s in teacher_shapes),
                      tuple(kernels))


# --- The term and the records. ------------------------------------------------


def _init_term(section: ml_collections.ConfigDict) -> objective.TermFn:
  """The preparation stage's term: the AB loss of the connectors' outputs
  against the teacher's layers."""
  teacher_layers = common.teacher_layers(section)
  margin = section.margin

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return multi_level_ab_loss(
        student.modules[INIT_NAME],
        [teacher.features[layer] for layer in teacher_layers], margin=margin,
        weights=objective.batch_weights(batch))
  return term


def _zoo_layers(teacher: tuple[str, ...], student: tuple[str, ...]
                ) -> dict[str, str]:
  """Every stage's pre-ReLU map (RepDistiller's `feat[1:-1]` with
  `preact=True`; `feature_names` are stem, stage1..K, embedding). Where
  the stage counts differ (RepDistiller's `Connector` refuses them), the
  deepest `min(K_t, K_s)` of each."""
  count = min(len(teacher), len(student)) - 2

  def preacts(names: tuple[str, ...]) -> str:
    return ','.join(f'{name}_preact' for name in names[1:-1][-count:])

  return {'student_layers': preacts(student),
          'teacher_layers': preacts(teacher)}


INIT_NAME = 'ab_boundary'

SETTINGS = {
    'init_epochs': objective.Setting(
        30, fields.int_at_least(1),
        'Epochs of the initialisation stage that transfers the activation '
        'boundaries (RepDistiller\'s init_epochs, 30 of its 240). Integer '
        '>= 1.'),
    'margin': objective.Setting(
        1.0, fields.positive_float(),
        'Margin m of the alternative loss: a student response counts until '
        'it is m beyond the boundary on the teacher\'s side. Number > 0.'),
    # Pre-ReLU maps: the seed student's conv outputs, bn_cnn's
    # blocks before their last ReLU (the same shapes).
    **common.layer_settings('conv1,conv2', 'block1_preact,block2_preact'),
}

# The preparation stage's one term. It reads the `ab` section (its layers
# and margin; the pipeline adds its weight, 1): `settings` are the
# method's, for `objective.default_section`; it has no section of its own.
INIT_TERM = objective.Method(
    name=INIT_NAME,
    reference='Heo et al., AAAI 2019',
    description="pre-ReLU feature maps' activation boundaries, by a "
                'margin-based alternative loss through connectors',
    settings=SETTINGS,
    loss=_init_term,
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=connectors,
)


def _problems(section: ml_collections.ConfigDict,
              flat: Mapping[str, Any]) -> list[str]:
  return common.paired_layers_problems('ab')(section, flat)


METHOD = objective.Method(
    name='ab',
    reference='Heo et al., AAAI 2019',
    description="the teacher's activation boundaries (pre-ReLU signs), "
                'transferred in an initialisation stage before training on '
                'the labels',
    settings=SETTINGS,
    loss=None,
    terms=(ce.TERM.name,),
    preparation=objective.Preparation(
        name='ab_init',
        title='student, AB initialisation',
        term=INIT_TERM,
        trains='features',
        epochs=lambda config: config.distill.ab.init_epochs),
    check=_problems,
    zoo_settings=_zoo_layers,
)
