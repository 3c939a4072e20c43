"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024): KD between z-scored logits.

A shared temperature forces the student to match the teacher's logit range
as well as its relations; the paper z-scores each example's logits,
`Z(z) = (z - mean(z)) / std(z)` over the classes, for the student and the
teacher alike, before the (base) temperature. The term is KD's,

  T^2 * KL(softmax(Z(teacher) / T) || softmax(Z(student) / T)),

with the labels' cross-entropy the terms are `ce, lskd`. It is KD with its
`logit_standardization` switch on (the switch is also on `dkd` and
`multi_teacher`, the pre-process being plug-and-play); this record holds
the paper's CIFAR-100 setting for KD: the official code
(sunshangquan/logit-standardization-KD, README "KD+Ours": `tools/train.py
--logit-stand --base-temp 2 --kd-weight 9`; `mdistiller/engine/cfg.py`:
`KD.TEMPERATURE 2`, `KD.LOSS.CE_WEIGHT 0.1`, `KD.LOSS.KD_WEIGHT 9`) trains
`0.1 CE + 9 KD(Z(s), Z(t), T = 2)`, and its `normalize` divides by torch's
sample std plus 1e-7 (`kd_jax.losses.standardize_logits`).
"""

import jax
import ml_collections

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Scalar = common.Scalar


def lskd_loss(student_logits: ArrayLike,
              teacher_logits: ArrayLike,
              *,
              temperature: Scalar = 2.0,
              weights: ArrayLike | None = None
              ) -> tuple[Array, dict[str, Array]]:
  """KD of z-scored logits: batch mean of `T^2 KL(p_t || p_s)`.

  With `Z` the z-score over the classes (`losses.standardize_logits`: minus
  the mean, over the sample std + 1e-7), `p_s = softmax(Z(student) / T)`
  and `p_t = softmax(Z(teacher) / T)`. Since `Z` removes each example's
  shift and scale, the loss is invariant to `a_i * z_i + b_i` (per example
  `i`, `a_i > 0`) in either network.

  Args:
    student_logits: `[B, K]`, `K >= 2`.
    teacher_logits: `[B, K]`, under `stop_gradient`.
    temperature: the base temperature `T > 0` (the paper's `tau`).
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); rows
      of weight 0 reach neither the value nor any gradient.

  Returns:
    `(loss, {})`: the scalar weighted mean, >= 0 up to rounding.

  Raises:
    ValueError: logits of different shapes or with fewer than 2 classes, or
      a Python `temperature` <= 0.
  """
  common.check_same_shape('student_logits', student_logits,
                          'teacher_logits', teacher_logits)
  return losses.distillation_loss(
      common.standardized(student_logits, weights),
      common.standardized(teacher_logits, weights), temperature,
      weights=weights), {}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  temperature = section.temperature

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return lskd_loss(student.logits, teacher.logits, temperature=temperature,
                     weights=objective.batch_weights(batch))
  return term


METHOD = objective.Method(
    name='lskd',
    reference='Sun et al., CVPR 2024',
    description="the teacher's class probabilities from z-scored logits "
                '(logit standardisation)',
    settings={
        # The official CIFAR-100 KD+LS setting (--kd-weight 9, with
        # KD.LOSS.CE_WEIGHT 0.1 for the labels' term).
        'weight': objective.term_weight(9.0),
        'temperature': objective.Setting(
            2.0, fields.positive_float(),
            'Base temperature T, applied to the z-scored logits; the term is '
            'scaled by T**2 (official --base-temp 2). Number > 0.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'lskd'),
)
