"""Knowledge review (Chen et al., "Distilling Knowledge via Knowledge
Review", CVPR 2021).

ReviewKD lets each teacher layer be learned from the student's layer at the
same depth *and every deeper one*: a review module (`ReviewFusion`, added to
the student, trained and checkpointed with it, never counted as its
parameters) fuses the student's layers from the deepest to the shallowest
(attention based fusion, ABF) and maps each fused map to the teacher's layer
of that level; the term is the hierarchical context loss (HCL) of each
fused map against the teacher's map, summed over the levels,

  HCL(s, t) = (mse(s, t) + sum_k w_k mse(pool_k(s), pool_k(t)))
              / (1 + sum_k w_k)

where `pool_k` is an adaptive average pooling to `4x4`, `2x2`, `1x1`, only
the sizes below the map's height `H` (the authors' `if l >= h: continue`),
and the weights are `1/2, 1/4, 1/8` in that order over the sizes kept (a
`4x4` map has `2x2` at 1/2 and `1x1` at 1/4; a `1x1` map is its MSE).

Each level of the review module, deepest first (listed layers are shallow to
deep): conv1x1 (no bias) + batch norm from the student's channels to
`mid`; except at the deepest level, the deeper level's fused map (the
residual) is resized (nearest) to this level's size and fused with it,
`x * a_0 + residual * a_1` with `a = sigmoid(conv1x1([x, residual]))` (2
channels, with bias); the fused map is resized (nearest) to the teacher's
size of that level and becomes the next residual; conv3x3 (padding 1, no
bias) + batch norm to the teacher's channels gives the level's output. A
`[B, C]` layer (the pooled embedding) is a `1x1` map, in both networks.

This follows the authors' code (github.com/dvlab-research/ReviewKD,
`CIFAR-100/model/reviewkd.py`; mdistiller's `ReviewKD`, the same code):

* `mid = min(mid_channels, channels of the deepest student layer)`, 512 by
  default (their `min(512, in_channels[-1])`; mdistiller reads
  `MAX_MID_CHANNEL = 512` and uses the constant 512).
* On the CIFAR pairs (`zoo_settings`): the student's `stage1..stageK,
  embedding` (their `STU_PREACT = False`) and the teacher's
  `stage1_preact..stageK_preact, embedding` (their teacher features are
  always `preact=True`, without the stem); the stem is not used. Every
  CIFAR pair, as every pair of theirs, has as many stages in both
  networks; otherwise the first `min(K_t, K_s)` stages of each are paired
  (their `zip` from the shallowest).
* The fused map goes to the teacher's size by nearest upsampling (their
  `out_shapes`, e.g. 2x for ShuffleNet and MobileNetV2 students); here
  the teacher's size must be the student's or a whole multiple of it, any
  other pair is a ValueError naming both layers when the distil stage
  starts.
* Weight 1 (mdistiller's `REVIEWKD_WEIGHT`; their CIFAR scripts tune it per
  pair: 0.6 resnet56 -> resnet20, 1 resnet110 -> resnet32, 5 for the
  wrn_40_2 and resnet32x4 -> resnet8x4 / shufflenetv1 pairs, 8 resnet32x4
  -> shufflenetv2; set `reviewkd.weight`), the term scaled by
  `min(epoch / warmup_epochs, 1)` over 20 epochs (mdistiller's, epochs
  from 1; the authors' own `train.py` counts from 0, so its first epoch
  has no ReviewKD term at all). Terms `ce, reviewkd`.
* Initialisation: the 1x1 and 3x3 convolutions PyTorch's
  `kaiming_uniform_(a=1)` (`U(+-sqrt(3 / fan_in))`, as theirs), the
  attention convolution PyTorch's default (kernel and bias
  `U(+-1 / sqrt(fan_in))`), the batch norms scale 1 and bias 0.

Deviations: the batch norms always normalise with the batch's statistics
and keep no running averages (`common.BatchStatsNorm`): the module runs
only inside the training loss, where PyTorch uses the batch's statistics
too (its running averages are never used by their method). PyTorch's
adaptive pooling and nearest resizing are reimplemented exactly (window
`[floor(i n / m), ceil((i + 1) n / m))`, source pixel `floor(i n / m)`), so
the seed CNNs' 7x7 maps pool to 4x4 with overlapping windows, as PyTorch's
would. The paper describes HCL as a spatial pyramid pooling of the maps,
each level distilled with an L2 distance; the pyramid's sizes, weights and
normalisation here are the code's.
"""

from collections.abc import Sequence

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
from kd_jax.methods import dkd
from kd_jax.zoo import layers as zoo_layers

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# The pooled sizes of HCL, in order; those kept (below the map's height)
# weigh 1/2, 1/4, 1/8 in turn.
HCL_SIZES = (4, 2, 1)
# torch.nn.init.kaiming_uniform_(a=1): gain sqrt(2 / (1 + a^2)) = 1, so
# U(-sqrt(3 / fan_in), sqrt(3 / fan_in)).
KAIMING_UNIFORM_A1 = nn.initializers.variance_scaling(1.0, 'fan_in',
                                                      'uniform')


def as_map(features: ArrayLike) -> Array:
  """`[B, H, W, C]` as is, `[B, C]` as `[B, 1, 1, C]` (at least float32).

  Raises:
    ValueError: any other rank.
  """
  features = losses.as_float(features)
  if features.ndim == 2:
    return features[:, None, None, :]
  if features.ndim != 4:
    raise ValueError(f'expected [B, H, W, C] maps or [B, C] vectors, got '
                     f'shape {features.shape}')
  return features


def _pooling_matrix(size: int, out: int) -> np.ndarray:
  """`[out, size]`: row `i` averages `[floor(i size / out), ceil((i + 1) size
  / out))`, PyTorch's adaptive average pooling windows."""
  matrix = np.zeros((out, size))
  for i in range(out):
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_average_pool(maps: Array, size: tuple[int, int]) -> Array:
  """PyTorch's `adaptive_avg_pool2d` of `[B, H, W, C]` to `[B, h, w, C]`
  (for any sizes; overlapping windows where `h` does not divide `H`)."""
  rows = jnp.asarray(_pooling_matrix(maps.shape[1], size[0]), maps.dtype)
  cols = jnp.asarray(_pooling_matrix(maps.shape[2], size[1]), maps.dtype)
  return jnp.einsum('ih,bhwc,jw->bijc', rows, maps, cols,
                    precision=common.PRECISION)


def nearest_resize(maps: Array, size: tuple[int, int]) -> Array:
  """PyTorch's `interpolate(mode='nearest')` of `[B, H, W, C]` to `[B, h, w,
  C]`: output pixel `i` is input pixel `floor(i H / h)` (a repeat for whole
  upsampling factors); unchanged if already that size."""
  height, width = maps.shape[1:3]
  if (height, width) == tuple(size):
    return maps
  rows = (np.arange(size[0]) * height) // size[0]
  cols = (np.arange(size[1]) * width) // size[1]
  return maps[:, rows][:, :, cols]


def hcl_per_example(student: ArrayLike, teacher: ArrayLike) -> Array:
  """Per-example hierarchical context loss of one level.

  Args:
    student: `[B, H, W, C]` (or `[B, C]`, a `1x1` map): the fused map.
    teacher: the teacher's map of the same shape, under `stop_gradient`.

  Returns:
    `[B]`: `(mse + sum_k w_k mse_k) / (1 + sum_k w_k)`, the MSEs (means over
    positions and channels) of the maps and of their adaptive average pools
    to `k x k` for the `k` of `HCL_SIZES` below `H`, `w_k` 1/2, 1/4, 1/8 in
    that order over the sizes kept.

  Raises:
    ValueError: maps of different shapes or ranks other than 2 and 4.
  """
  common.check_same_shape('student', student, 'teacher', teacher)
  difference = as_map(student) - jax.lax.stop_gradient(as_map(teacher))
  total = jnp.mean(jnp.square(difference), axis=(1, 2, 3))
  weight, weight_sum = 1.0, 1.0
  for size in HCL_SIZES:
    if size >= difference.shape[1]:
      continue
    weight /= 2
    weight_sum += weight
    # Pooling is linear: the pools' difference is the difference's pool.
    pooled = adaptive_average_pool(difference, (size, size))
    total += weight * jnp.mean(jnp.square(pooled), axis=(1, 2, 3))
  return total / weight_sum


def hcl_loss(student_maps: Sequence[ArrayLike],
             teacher_maps: Sequence[ArrayLike],
             *,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """The ReviewKD loss: HCL summed over the levels (the authors' `hcl`).

  Args:
    student_maps: `L >= 1` fused maps `[B, H_l, W_l, C_l]` (or `[B, C_l]`),
      the output of `ReviewFusion`.
    teacher_maps: as many teacher maps of the same shapes (a `[B, C]`
      embedding matches a `[B, 1, 1, C]` map), under `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); rows
      of weight 0 reach neither the value nor any gradient.

  Returns:
    `(loss, {})`: the sum over levels of the weighted batch mean of
    `hcl_per_example`.

  Raises:
    ValueError: no maps, different counts, or a level whose shapes differ
      (the message names the level's position).
  """
  if not student_maps or len(student_maps) != len(teacher_maps):
    raise ValueError(f'{len(student_maps)} student and {len(teacher_maps)} '
                     'teacher maps: give one of each per level, at least one.')
  total = 0.0
  for level, (student, teacher) in enumerate(zip(student_maps, teacher_maps)):
    try:
      student, teacher = as_map(student), as_map(teacher)
      total += losses.weighted_mean(hcl_per_example(
          losses.mask_rows(student, weights),
          losses.mask_rows(teacher, weights)), weights)
    except ValueError as e:
      raise ValueError(f'level {level}: {e}') from e
  return total, {}


class ReviewFusion(nn.Module):
  """The review module: attention based fusion (ABF) of the student's levels.

  Level `i` (of the listed layers, shallowest first) is processed after
  every deeper one: conv1x1 + batch norm to `mid_channels`; fused with the
  deeper level's residual (resized, nearest, to this level's size) by
  `x * a_0 + residual * a_1`, `a = sigmoid(conv1x1([x, residual]))`,
  except at the deepest level; resized (nearest) to `sizes[i]`, which
  becomes the residual of level `i - 1`; conv3x3 + batch norm to
  `channels[i]`. Parameters `level{i}_conv1`, `level{i}_bn1`,
  `level{i}_attention` (not at the deepest level), `level{i}_conv2`,
  `level{i}_bn2`.
  """
  channels: tuple[int, ...]
  sizes: tuple[tuple[int, int], ...]
  mid_channels: int

  @nn.compact
  def __call__(self, features: Sequence[ArrayLike]) -> list[Array]:
    """Student layers `[(B, H_i, W_i, Cs_i) or (B, Cs_i)]`, shallowest first
    -> fused maps `[(B, *sizes[i], channels[i])]`, in the same order."""
    count = len(self.channels)
    if len(features) != count or len(self.sizes) != count:
      raise ValueError(f'{len(features)} student layers for {count} levels')
    outputs, residual = [None] * count, None
    for i in reversed(range(count)):
      x = nn.Conv(self.mid_channels, (1, 1), use_bias=False,
                  kernel_init=KAIMING_UNIFORM_A1,
                  name=f'level{i}_conv1')(as_map(features[i]))
      x = common.BatchStatsNorm(name=f'level{i}_bn1')(x)
      if residual is not None:
        residual = nearest_resize(residual, x.shape[1:3])
        attention = jax.nn.sigmoid(nn.Conv(
            2, (1, 1), kernel_init=zoo_layers.TORCH_DEFAULT,
            bias_init=zoo_layers.torch_bias_init(2 * self.mid_channels),
            name=f'level{i}_attention')(jnp.concatenate([x, residual], -1)))
        x = x * attention[..., :1] + residual * attention[..., 1:]
      residual = x = nearest_resize(x, self.sizes[i])
      x = nn.Conv(self.channels[i], (3, 3), padding=((1, 1), (1, 1)),
                  use_bias=False, kernel_init=KAIMING_UNIFORM_A1,
                  name=f'level{i}_conv2')(x)
      outputs[i] = common.BatchStatsNorm(name=f'level{i}_bn2')(x)
    return outputs


def _map_shape(shape: Sequence[int]) -> tuple[int, int, int]:
  """`(H, W, C)` as is, `(C,)` as `(1, 1, C)`; else a ValueError."""
  shape = tuple(shape)
  if len(shape) == 1:
    return (1, 1) + shape
  if len(shape) != 3:
    raise ValueError('expected (H, W, C) feature maps or (C,) vectors')
  return shape


def review_module(section: ml_collections.ConfigDict,
                  student_shapes: Sequence[tuple[int, ...]],
                  teacher_shapes: Sequence[tuple[int, ...]]) -> ReviewFusion:
  """The record's `module`: `ReviewFusion` for the section's layer pairs,
  from their shapes (batch axis dropped).

  Raises:
    ValueError: a layer that is neither an `(H, W, C)` map nor a `(C,)`
      vector, or a pair whose teacher size is not the student's times a
      whole number (the message names both layers and their shapes).
  """
  sizes, channels = [], []
  for s_layer, t_layer, s_shape, t_shape in zip(
      common.student_layers(section), common.teacher_layers(section),
      student_shapes, teacher_shapes, strict=True):
    try:
      (s_h, s_w, _), (t_h, t_w, t_c) = _map_shape(s_shape), _map_shape(t_shape)
      if t_h % s_h or t_w % s_w:
        raise ValueError(
            'the teacher\'s spatial size must be the student\'s or a whole '
            'multiple of it (the fused map is upsampled, nearest, to it)')
    except ValueError as e:
      raise ValueError(
          f'student layer {s_layer!r} {tuple(s_shape)} and teacher layer '
          f'{t_layer!r} {tuple(t_shape)}: {e}; choose layers of matching '
          'sizes') from e
    sizes.append((t_h, t_w))
    channels.append(t_c)
  mid = min(section.mid_channels, _map_shape(student_shapes[-1])[-1])
  return ReviewFusion(tuple(channels), tuple(sizes), mid)


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  teacher_layers = common.teacher_layers(section)
  warmup_epochs = section.warmup_epochs

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    loss, aux = hcl_loss(
        student.modules['reviewkd'],
        [teacher.features[layer] for layer in teacher_layers],
        weights=objective.batch_weights(batch))
    if warmup_epochs:
      loss = dkd.warmup_factor(batch['epoch'], warmup_epochs) * loss
    return loss, aux
  return term


def _zoo_layers(teacher: tuple[str, ...], student: tuple[str, ...]
                ) -> dict[str, str]:
  """The student's `stage1..stageK, embedding` and the teacher's
  `stage1_preact..stageK_preact, embedding`, K the fewer stages (the
  authors' features; see the module docstring)."""
  count = min(len(teacher), len(student)) - 2  # Without stem and embedding.
  stages = [f'stage{k}' for k in range(1, count + 1)]
  return {'student_layers': ','.join(stages + ['embedding']),
          'teacher_layers': ','.join([f'{s}_preact' for s in stages]
                                     + ['embedding'])}


METHOD = objective.Method(
    name='reviewkd',
    reference='Chen et al., CVPR 2021',
    description="every teacher layer from the student's layer at its depth "
                'and all deeper ones, fused by a trained review module',
    settings={
        # mdistiller's REVIEWKD_WEIGHT (the authors tune it per CIFAR pair,
        # 0.6 to 8; see the module docstring).
        'weight': objective.term_weight(1.0),
        # The seed CNNs' conv1, conv2 (14x14, 7x7) in both networks.
        **common.layer_settings('conv1,conv2', 'conv1,conv2'),
        'mid_channels': objective.Setting(
            512, fields.int_at_least(1),
            'Width of the fused maps, at most: min(mid_channels, channels '
            'of the last (deepest) student layer), the authors\' min(512, '
            'in_channels[-1]). Integer >= 1.'),
        'warmup_epochs': objective.Setting(
            20, fields.int_at_least(0),
            'The term is scaled by min(epoch / warmup_epochs, 1), epochs '
            'from 1, as in mdistiller; 0 = no warm-up. Integer >= 0.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'reviewkd'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=review_module,
    check=common.paired_layers_problems('reviewkd'),
    zoo_settings=_zoo_layers,
)
