"""Distillation from several teachers: KD from the mixture of their tempered
distributions (ensemble distillation; e.g. Hinton et al. 2015, section 4, and
You et al., "Learning from Multiple Teacher Networks", KDD 2017).

The target is `q = sum_m w_m softmax(teacher_m / T)`, the loss
`T^2 * KL(q || softmax(student / T))`; with the labels' cross-entropy the
method's terms are `ce, multi_teacher`. The teachers are trained here
(`num_teachers`, differing only in initialisation) or loaded
(`config.teacher.checkpoint`, comma-separated); their logits are always
cached, stacked `[N, M, K]` (examples first, then teachers).
"""

from collections.abc import Mapping
from typing import Any

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
Scalar = common.Scalar


def _teacher_log_weights(teacher_weights: ArrayLike | None,
                         num_teachers: int) -> Array:
  """`[M]` log of the normalised teacher weights."""
  if teacher_weights is None:
    return jnp.full((num_teachers,), -np.log(num_teachers), jnp.float32)
  if np.shape(teacher_weights) != (num_teachers,):
    raise ValueError(
        f'teacher_weights must have shape ({num_teachers},), one per teacher, '
        f'got {np.shape(teacher_weights)}.')
  try:
    concrete = np.asarray(teacher_weights, np.float64)
  except jax.errors.TracerArrayConversionError:
    concrete = None  # Traced: values cannot be checked.
  if concrete is not None and not (np.all(concrete >= 0)
                                   and concrete.sum() > 0):
    raise ValueError('teacher_weights must be >= 0 with a positive sum, got '
                     f'{concrete.tolist()}.')
  teacher_weights = losses.as_float(teacher_weights)
  # A teacher of weight 0 gets log-weight -inf and adds nothing.
  return jnp.log(teacher_weights) - jnp.log(jnp.sum(teacher_weights))


def multi_teacher_distillation_loss_per_example(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: Scalar,
    *,
    teacher_weights: ArrayLike | None = None,
    t2_scaling: bool = True) -> Array:
  """Per-example KD from the mixture of several teachers' distributions.

  The target is `q = sum_m w_m softmax(teacher_m / T)` (weights normalised to
  sum to 1) and the loss `KL(q || softmax(student / T))`, times `T**2` if
  `t2_scaling`. `log q` is the log-sum-exp over teachers of `log p_m + log
  w_m`, so it stays finite where each `p_m` underflows. The mixture of
  distributions is not the distribution of the averaged logits.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., M, K]`, `M` teachers' logits for the same
      examples (teachers on the second-to-last axis, as a batch gathers
      them); the whole target (and `teacher_weights`) is under
      `stop_gradient`.
    temperature: `T > 0`, shared by the student and every teacher.
    teacher_weights: `None` (uniform) or `[M]` non-negative weights with a
      positive sum; they are normalised to sum to 1.
    t2_scaling: multiply by `T**2` (Hinton et al., 2015).

  Returns:
    `[...]` losses, `student_logits.shape[:-1]`.

  Raises:
    ValueError: `teacher_logits` not `[..., M, K]` for `student_logits`
      `[..., K]`, or `teacher_weights` of the wrong shape or (when concrete)
      with negative values or a zero sum.
  """
  student_shape = jnp.shape(student_logits)
  teacher_shape = jnp.shape(teacher_logits)
  if len(teacher_shape) != len(student_shape) + 1 or (
      teacher_shape[:-2] != student_shape[:-1]
      or teacher_shape[-1:] != student_shape[-1:]) or teacher_shape[-2] < 1:
    raise ValueError(
        f'teacher_logits {teacher_shape} must be [..., M, K] with M >= 1 '
        f'teachers for student_logits [..., K] = {student_shape}.')
  log_weights = _teacher_log_weights(teacher_weights, teacher_shape[-2])
  teacher_log_probs = losses.tempered_log_softmax(teacher_logits, temperature)
  target_log_probs = jax.lax.stop_gradient(
      jax.nn.logsumexp(teacher_log_probs + log_weights[:, None], axis=-2))
  student_log_probs = losses.tempered_log_softmax(student_logits, temperature)
  loss = common.kl_from_log_probs(target_log_probs, student_log_probs)
  return loss * temperature**2 if t2_scaling else loss


def multi_teacher_distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: Scalar,
    *,
    teacher_weights: ArrayLike | None = None,
    t2_scaling: bool = True,
    weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
  """Mean KD loss from the mixture of `M` teachers' tempered distributions.

  With one teacher (`M = 1`) it equals `kd_jax.losses.distillation_loss`.

  Args:
    student_logits: `[B, K]`.
    teacher_logits: `[B, M, K]`, under `stop_gradient`.
    temperature: `T > 0`.
    teacher_weights: `None` (uniform) or `[M]` non-negative weights.
    t2_scaling: multiply by `T**2`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); rows
      of weight 0 reach neither the value nor any gradient.

  Returns:
    `(loss, {})`: the weighted mean of
    `multi_teacher_distillation_loss_per_example`.
  """
  per_example = multi_teacher_distillation_loss_per_example(
      losses.mask_rows(student_logits, weights),
      losses.mask_rows(teacher_logits, weights), temperature,
      teacher_weights=teacher_weights, t2_scaling=t2_scaling)
  return losses.weighted_mean(per_example, weights), {}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  weights = fields.parse_list(section.teacher_weights)
  teacher_weights = (np.asarray([float(w) for w in weights], np.float32)
                     if weights else None)
  temperature, t2_scaling = section.temperature, section.t2_scaling
  standardize = section.logit_standardization

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    example_weights = objective.batch_weights(batch)
    student_logits, teacher_logits = student.logits, teacher.logits
    if standardize:  # Each teacher's logits on their own.
      student_logits = common.standardized(student_logits, example_weights)
      teacher_logits = common.standardized(teacher_logits, example_weights)
    return multi_teacher_distillation_loss(
        student_logits, teacher_logits, temperature,
        teacher_weights=teacher_weights, t2_scaling=t2_scaling,
        weights=example_weights)
  return term


def _num_teachers(config: ml_collections.ConfigDict) -> int:
  return (len(fields.parse_list(config.teacher.checkpoint))
          or config.distill.multi_teacher.num_teachers)


def _problems(section: ml_collections.ConfigDict,
              flat: Mapping[str, Any]) -> list[str]:
  loaded = fields.parse_list(flat['teacher.checkpoint'])
  count = len(loaded) or section.num_teachers
  problems = []
  if count < 2:
    problems.append(
        'config.distill.multi_teacher distils from several teachers: set '
        'config.teacher.checkpoint to their checkpoint directories, '
        'comma-separated, or config.distill.multi_teacher.num_teachers >= 2 '
        'to train them here')
  weights = fields.parse_list(section.teacher_weights)
  if weights and len(weights) != count:
    problems.append(
        f'config.distill.multi_teacher.teacher_weights has {len(weights)} '
        f'weights for {count} teachers (' + (
            'config.teacher.checkpoint' if loaded else
            'config.distill.multi_teacher.num_teachers') + ')')
  return problems


METHOD = objective.Method(
    name='multi_teacher',
    reference='ensemble distillation',
    description='the mixture of several teachers\' tempered distributions',
    settings={
        'weight': objective.term_weight(0.9),
        'temperature': objective.Setting(
            4.0, fields.positive_float(),
            'Softmax temperature T of student and teachers. Number > 0.'),
        't2_scaling': objective.Setting(
            True, fields.boolean(), 'Multiply the term by T**2.'),
        'teacher_weights': objective.Setting(
            '', fields.number_list(),
            'The teachers\' weights in the mixture, comma-separated in the '
            'order of teacher.checkpoint (or teacher, teacher2, ...); "" = '
            'equal.'),
        'num_teachers': objective.Setting(
            3, fields.int_at_least(1),
            'Without teacher.checkpoint: how many teachers the teacher stage '
            'trains (teacher, teacher2, ...: same model and data order, '
            'different initialisations). Integer >= 2.'),
        'logit_standardization': common.logit_standardization_setting(),
    },
    loss=_term,
    terms=(ce.TERM.name, 'multi_teacher'),
    several_teachers=True,
    num_teachers=_num_teachers,
    check=_problems,
)
