"""Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge
Distillation", CVPR 2022).

KD's loss splits into target-class KD (TCKD, the binary target vs rest
distribution) and non-target-class KD (NCKD, the distribution among the
other classes); DKD weighs them independently. The paper's objective is
`CE + warmup * (tckd_weight * TCKD + nckd_weight * NCKD) * T^2`, terms
`ce, dkd`; the defaults are its CIFAR-100 setting (ImageNet: `nckd_weight =
0.5`, `T = 1`), including the reference code's linear warm-up of the DKD
term, `min(epoch / warmup_epochs, 1)` with epochs counted from 1, over the
first 20 epochs (0 turns it off).
"""

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


def _target_mask(labels: ArrayLike,
                 logits_shape: tuple[int, ...]) -> tuple[Array, Array]:
  """`[..., K]` one-hot bool mask of the target class and `[...]` validity."""
  labels = jnp.asarray(labels)
  num_classes = logits_shape[-1]
  if (labels.shape != logits_shape[:-1]
      or not jnp.issubdtype(labels.dtype, jnp.integer)):
    raise ValueError(
        f'labels must be integer class ids of shape {logits_shape[:-1]}, got '
        f'shape {labels.shape} and dtype {labels.dtype}.')
  losses.check_labels(labels, num_classes)
  valid = (labels >= 0) & (labels < num_classes)
  return labels[..., None] == jnp.arange(num_classes), valid


def dkd_terms_per_example(student_logits: ArrayLike,
                          teacher_logits: ArrayLike,
                          labels: ArrayLike,
                          temperature: Scalar) -> tuple[Array, Array]:
  """Per-example TCKD and NCKD of Decoupled KD, without `T**2`.

  Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, section
  "Reformulating KD". With
  `p = softmax(z / T)` and target class `t`:

  * TCKD `= KL(b_teacher || b_student)` over the binary distribution
    `b = [p_t, 1 - p_t]` (target vs. all non-target classes);
  * NCKD `= KL(p_hat_teacher || p_hat_student)` over the non-target classes,
    `p_hat_i = exp(z_i / T) / sum_{j != t} exp(z_j / T)` for `i != t`.

  Classical KD decomposes as `KL(p_teacher || p_student) = TCKD + (1 -
  p_t_teacher) * NCKD`.

  Both are computed in log space: `log(1 - p_t)` is a log-sum-exp of the
  non-target log-probabilities, and `log p_hat` is an exact masked
  log-softmax (the target logit set to -inf), where the official code
  subtracts 1000 from the target logit.

  Args:
    student_logits: `[..., K]`, `K >= 2`.
    teacher_logits: `[..., K]`, under `stop_gradient`.
    labels: `[...]` integer target ids in `[0, K)`; other ids are an error
      outside `jit` and give NaN inside it (padded rows need a 0 weight in
      the reduced form, not just a sentinel id).
    temperature: `T > 0`.

  Returns:
    `(tckd, nckd)`, each `[...]` (`student_logits.shape[:-1]`), >= 0 up to
    rounding.

  Raises:
    ValueError: logits of different shapes or with fewer than 2 classes,
      labels that are not integer ids in `[0, K)` of the batch shape, or a
      Python `temperature` <= 0.
  """
  common.check_same_shape('student_logits', student_logits,
                    'teacher_logits', teacher_logits)
  logits_shape = jnp.shape(student_logits)
  if len(logits_shape) < 1 or logits_shape[-1] < 2:
    raise ValueError(
        f'DKD needs logits [..., K] with K >= 2, got shape {logits_shape}.')
  is_target, valid = _target_mask(labels, logits_shape)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)

  def log_distributions(logits):
    log_probs = losses.tempered_log_softmax(logits, temperature)
    log_p_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
    log_p_rest = jax.nn.logsumexp(
        jnp.where(is_target, -jnp.inf, log_probs), axis=-1)
    log_binary = jnp.stack([log_p_target, log_p_rest], axis=-1)
    log_non_target = losses.tempered_log_softmax(
        jnp.where(is_target, -jnp.inf, losses.as_float(logits)), temperature)
    return log_binary, log_non_target

  student_binary, student_non_target = log_distributions(student_logits)
  teacher_binary, teacher_non_target = log_distributions(teacher_logits)
  tckd = common.kl_from_log_probs(teacher_binary, student_binary)
  nckd = common.kl_from_log_probs(teacher_non_target, student_non_target)
  # Invalid ids were computed with an all-False mask (finite, so the
  # gradient through `where` stays 0) and are reported as NaN.
  return jnp.where(valid, tckd, jnp.nan), jnp.where(valid, nckd, jnp.nan)


def dkd_loss(student_logits: ArrayLike,
             teacher_logits: ArrayLike,
             labels: ArrayLike,
             *,
             tckd_weight: Scalar = 1.0,
             nckd_weight: Scalar = 8.0,
             temperature: Scalar = 4.0,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Decoupled KD loss `(tckd_weight * TCKD + nckd_weight * NCKD) * T**2`.

  The batch mean of `dkd_terms_per_example`, without the warm-up (the
  `dkd` objective term applies it).

  Args:
    student_logits: `[B, K]` (or `[..., K]`), `K >= 2`.
    teacher_logits: same shape, under `stop_gradient`.
    labels: `[B]` integer target ids (see `dkd_terms_per_example`).
    tckd_weight: weight >= 0 of TCKD (the paper's alpha).
    nckd_weight: weight >= 0 of NCKD (the paper's beta).
    temperature: `T > 0`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); rows
      of weight 0 reach neither the value nor any gradient.

  Returns:
    `(loss, aux)`: the scalar loss, and `aux` with the scalar batch means
    `'tckd'` and `'nckd'`, each times `T**2` (so that `loss = tckd_weight *
    aux['tckd'] + nckd_weight * aux['nckd']`).
  """
  common.check_non_negative('tckd_weight', tckd_weight)
  common.check_non_negative('nckd_weight', nckd_weight)
  tckd, nckd = dkd_terms_per_example(
      losses.mask_rows(student_logits, weights),
      losses.mask_rows(teacher_logits, weights),
      losses.mask_rows(labels, weights), temperature)
  scale = temperature**2
  tckd = losses.weighted_mean(tckd, weights) * scale
  nckd = losses.weighted_mean(nckd, weights) * scale
  return tckd_weight * tckd + nckd_weight * nckd, {'tckd': tckd, 'nckd': nckd}


def warmup_factor(epoch: ArrayLike, warmup_epochs: int) -> Array | float:
  """`min(epoch / warmup_epochs, 1)` (epochs from 1); 1 when `warmup_epochs`
  is 0."""
  if warmup_epochs == 0:
    return 1.0
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  settings = dict(tckd_weight=section.tckd_weight,
                  nckd_weight=section.nckd_weight,
                  temperature=section.temperature)
  warmup_epochs = section.warmup_epochs
  standardize = section.logit_standardization

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    weights = objective.batch_weights(batch)
    student_logits, teacher_logits = student.logits, teacher.logits
    if standardize:
      student_logits = common.standardized(student_logits, weights)
      teacher_logits = common.standardized(teacher_logits, weights)
    loss, aux = dkd_loss(student_logits, teacher_logits, batch['label'],
                         weights=weights, **settings)
    if warmup_epochs:
      loss = warmup_factor(batch['epoch'], warmup_epochs) * loss
    return loss, aux
  return term


METHOD = objective.Method(
    name='dkd',
    reference='Zhao et al., CVPR 2022',
    description='target and non-target class probabilities, weighed apart',
    settings={
        'weight': objective.term_weight(1.0),
        'tckd_weight': objective.Setting(
            1.0, fields.non_negative_float(),
            'Weight of target-class KD (the paper\'s alpha). Number >= 0.'),
        'nckd_weight': objective.Setting(
            8.0, fields.non_negative_float(),
            'Weight of non-target-class KD (the paper\'s beta). Number >= 0.'),
        'temperature': objective.Setting(
            4.0, fields.positive_float(), 'Softmax temperature T. Number > 0.'),
        'warmup_epochs': objective.Setting(
            20, fields.int_at_least(0),
            'The DKD term is scaled by min(epoch / warmup_epochs, 1), epochs '
            'from 1, as in the reference code; 0 = no warm-up. Integer >= 0.'),
        # DKD + logit standardisation on CIFAR-100 (the official code's
        # --logit-stand --base-temp 2 --kd-weight 9): tckd_weight 9,
        # nckd_weight 72, temperature 2.
        'logit_standardization': common.logit_standardization_setting(),
    },
    loss=_term,
    terms=(ce.TERM.name, 'dkd'),
)
