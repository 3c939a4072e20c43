"""Flow of solution procedure (Yim et al., "A Gift from Knowledge
Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017).

The FSP matrix of two layers of one network, `F1` (`h x w x m`) and `F2`
(`h x w x n`), is `G[i, j] = sum_{s, t} F1[s, t, i] F2[s, t, j] / (h w)`
(the paper's Eq. 1): how the features flow from one layer to the next. The
student's FSP matrices of consecutive listed layers are matched to the
teacher's: layers `l_0, ..., l_L` give the `L` matrices `G(l_k, l_{k+1})`.
Following RepDistiller's `FSP` (the code behind the CRD benchmark): where the
two maps of a matrix differ in size, the larger is average-pooled to the
smaller's; each matrix's loss is the mean over its entries (and the batch)
of `(G_s - G_t)^2`, and the pairs' losses are summed. (The paper sums the
squared entries, `||G_s - G_t||_2^2`, with equal weights over the pairs:
RepDistiller's value times the `m n` entries of each matrix.)

The matrices must have the same shape in both networks, so the paired
layers must have the same channel counts (spatial sizes may differ):
RepDistiller raises "num of channels not equal" otherwise, and the CRD
table has no FSP result for such pairs. Here the term raises a ValueError
naming the layers and channel counts when the distil step is first traced
(at the start of the distil stage: validation sees no shapes). Among the
CIFAR pairs, the channels match for resnet56/resnet110 -> resnet20/resnet32,
resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2 and vgg13 -> vgg8; on the
seed protocol the student's conv1, conv2 (16, 32 channels) match the strong
teacher bn_cnn's block1, block2 (not the seed teacher's 64, 256).

In the paper and in RepDistiller, FSP is a first training phase of its own
(the student's layers fitted to the teacher's matrices, 30 epochs in
RepDistiller's `init`, with no classification loss), followed by training
on the labels alone. Here it is a joint term, `ce, fsp`, like the other
feature methods, with weight 1 (RepDistiller's init phase minimises the
unweighted sum; its `-b 50` multiplies a term that is 0 in its second
phase). Layers: the zoo's `stem, stage1, ..., stageK` (RepDistiller's
`feat[:-1]`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def fsp_matrix(first: ArrayLike, second: ArrayLike) -> Array:
  """`[B, m, n]` FSP matrices of two maps of one network.

  Args:
    first: `[B, H, W, m]`, the lower layer.
    second: `[B, H', W', n]`, the upper layer; the larger map is first
      average-pooled to the smaller's `(h, w)` (`common.smaller_size`).

  Returns:
    `G[b, i, j] = sum_{s, t} first[b, s, t, i] second[b, s, t, j] / (h w)`.

  Raises:
    ValueError: maps that are not `[B, H, W, C]` of one batch size, or
      sizes that are not whole multiples of each other.
  """
  first, second = losses.as_float(first), losses.as_float(second)
  if first.ndim != 4 or second.ndim != 4 or first.shape[0] != second.shape[0]:
    raise ValueError(f'expected [B, H, W, C] maps of one batch, got '
                     f'{first.shape} and {second.shape}')
  size = common.smaller_size(first.shape[1:3], second.shape[1:3])
  first = common.average_pool_to(first, size)
  second = common.average_pool_to(second, size)
  return jnp.einsum('bhwi,bhwj->bij', first, second,
                    precision=common.PRECISION) / (size[0] * size[1])


def fsp_loss(student_maps: Sequence[ArrayLike],
             teacher_maps: Sequence[ArrayLike],
             *,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """FSP loss: `sum_k mean((G_s^k - G_t^k)^2)` over consecutive layers.

  Args:
    student_maps: `L + 1 >= 2` student maps `[B, H_k, W_k, C_k]`, in order
      (lower layers first).
    teacher_maps: as many teacher maps, under `stop_gradient`; map `k` must
      have the student's channel count `C_k`, any spatial size.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); rows
      of weight 0 reach neither the value nor any gradient.

  Returns:
    `(loss, {})`: the sum over the `L` matrices `G^k = G(map_k, map_{k+1})`
    of the weighted batch mean of each example's mean over the `C_k x
    C_{k+1}` entries of the squared difference; 0 when the matrices agree.

  Raises:
    ValueError: fewer than 2 maps, different counts, or matrices of
      different shapes (the message names the pair's position and shapes).
  """
  if len(student_maps) < 2 or len(student_maps) != len(teacher_maps):
    raise ValueError(
        f'{len(student_maps)} student and {len(teacher_maps)} teacher maps: '
        'FSP needs as many of each, at least 2 (consecutive maps make a '
        'matrix).')
  student = [losses.mask_rows(m, weights) for m in student_maps]
  teacher = [jax.lax.stop_gradient(losses.mask_rows(m, weights))
             for m in teacher_maps]
  total = 0.0
  for k in range(len(student) - 1):
    try:
      g_s = fsp_matrix(student[k], student[k + 1])
      g_t = fsp_matrix(teacher[k], teacher[k + 1])
    except ValueError as e:
      raise ValueError(f'FSP matrix {k}: {e}') from e
    if g_s.shape != g_t.shape:
      raise ValueError(
          f'FSP matrix {k}: student {g_s.shape[1:]} and teacher '
          f'{g_t.shape[1:]} (channels of maps {k} and {k + 1}) differ; FSP '
          'needs equal channel counts at every paired layer.')
    per_example = jnp.mean(jnp.square(g_s - g_t), axis=(1, 2))
    total += losses.weighted_mean(per_example, weights)
  return total, {}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  student_layers = common.student_layers(section)
  teacher_layers = common.teacher_layers(section)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    try:
      return fsp_loss([student.features[layer] for layer in student_layers],
                      [teacher.features[layer] for layer in teacher_layers],
                      weights=objective.batch_weights(batch))
    except ValueError as e:
      channels = lambda outputs, layers: ', '.join(
          f'{layer} {jnp.shape(outputs.features[layer])[-1]}'
          for layer in layers)
      raise ValueError(
          f'config.distill.fsp: {e} Student layers (channels): '
          f'{channels(student, student_layers)}; teacher layers: '
          f'{channels(teacher, teacher_layers)}.') from e
  return term


def _problems(section: ml_collections.ConfigDict,
              flat: Mapping[str, Any]) -> list[str]:
  problems = common.paired_layers_problems('fsp')(section, flat)
  if len(common.student_layers(section)) < 2:
    problems.append(
        'config.distill.fsp.student_layers: FSP matrices join consecutive '
        'layers; give at least 2 of each network, lower layers first')
  return problems


def _zoo_layers(teacher: tuple[str, ...], student: tuple[str, ...]
                ) -> dict[str, str]:
  """`stem, stage1, ..., stageK` of both networks, K the fewer stages
  (RepDistiller's `feat[:-1]`, which needs as many of each)."""
  count = min(len(teacher), len(student)) - 2  # Without stem and embedding.
  names = ','.join(['stem'] + [f'stage{k}' for k in range(1, count + 1)])
  return {'student_layers': names, 'teacher_layers': names}


METHOD = objective.Method(
    name='fsp',
    reference='Yim et al., CVPR 2017',
    description='the flow between consecutive layers: FSP (Gram) matrices '
                'of their channels',
    settings={
        # A joint term here: RepDistiller's FSP phase minimises the
        # unweighted sum alone (see the module docstring).
        'weight': objective.term_weight(1.0),
        # The seed student's conv1, conv2 (16, 32 channels) and bn_cnn's
        # block1, block2 (16, 32): the seed teacher's (64, 256) do not fit.
        **common.layer_settings('conv1,conv2', 'block1,block2'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'fsp'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    check=_problems,
    zoo_settings=_zoo_layers,
)
