"""The knowledge-distillation loss family: pure functions over logits.

Shapes: logits are `[..., K]` (`K` classes, any number of leading batch axes);
per-example losses have the batch shape `[...]`; reduced losses are scalars.
Every function is pure, jit-able and vmap-able. `temperature` may be a Python
float or a traced scalar (a Python value is checked to be > 0).

Log-probabilities always come from `log_softmax`, never `log(softmax)`, so the
losses and their gradients stay finite for |logits| up to 1e4 and temperatures
from 0.05 to 100, also when the teacher's tempered probabilities underflow to
exactly 0. Logits in half precision are upcast to float32 first.

A distillation form is chosen by name from `DISTILLATION_FORMS` (big_vision's
`distance.py` in spirit: a dict of small functions, no class hierarchy).
"""

from collections.abc import Callable, Mapping
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Scalar = float | Array


def as_float(x: ArrayLike) -> Array:
  """`x` as an array of at least float32 precision (same shape)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_temperature(temperature: Scalar) -> None:
  # Only Python / NumPy numbers can be checked; traced values pass unchecked.
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')


def _check_alpha(alpha: Scalar) -> None:
  if isinstance(alpha, numbers.Real) and not 0 <= alpha <= 1:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}.')


def check_labels(labels: ArrayLike, num_classes: int) -> None:
  """Raises ValueError if concrete integer `labels` hold ids outside `[0, K)`.

  Traced labels (inside `jit`) cannot be checked: there an id outside
  `[0, K)` (e.g. a padding sentinel of -1) gives a meaningless loss, so
  padded rows need a 0 weight (see `mask_rows`), never a sentinel id alone.
  """
  if isinstance(labels, jax.core.Tracer):
    return
  ids = np.asarray(labels)
  if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
    raise ValueError(
        f'labels must be class ids in [0, {num_classes}), got ids from '
        f'{ids.min()} to {ids.max()}.')


def mask_rows(x: ArrayLike, weights: ArrayLike | None) -> Array:
  """`x` with the rows (leading axes) of weight 0 set to 0.

  A padded row may hold anything, even inf or NaN; zeroing it before the
  loss keeps it out of every value and gradient (a weight of 0 in the mean
  alone would not: its NaN derivatives times 0 are still NaN).

  Args:
    x: `[..., ...]` per-example values whose leading axes are the batch
      shape of `weights` (e.g. `[B, K]` logits, `[B]` labels).
    weights: `None` (no change) or `[...]` per-example weights.

  Returns:
    `x`'s shape and dtype.
  """
  x = jnp.asarray(x)
  if weights is None:
    return x
  keep = jnp.asarray(weights) != 0
  keep = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def tempered_log_softmax(logits: ArrayLike, temperature: Scalar) -> Array:
  """`log_softmax(logits / temperature)` over the last axis.

  Args:
    logits: `[..., K]` unnormalised log-probabilities.
    temperature: `T > 0`; larger is flatter.

  Returns:
    `[..., K]` log-probabilities, at least float32.
  """
  _check_temperature(temperature)
  return jax.nn.log_softmax(as_float(logits) / temperature, axis=-1)


def tempered_softmax(logits: ArrayLike, temperature: Scalar) -> Array:
  """`softmax(logits / temperature)` over the last axis.

  Args:
    logits: `[..., K]` unnormalised log-probabilities.
    temperature: `T > 0`; larger is flatter, with the same arg-max.

  Returns:
    `[..., K]` probabilities summing to 1 on the last axis, at least float32.
  """
  _check_temperature(temperature)
  return jax.nn.softmax(as_float(logits) / temperature, axis=-1)


def standardize_logits(logits: ArrayLike, eps: float = 1e-7) -> Array:
  """Z-score of the logits over the classes (logit standardisation).

  Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024:
  `Z(z) = (z - mean(z)) / (std(z) + eps)` over the last axis, applied to
  the student's and the teacher's logits before the temperature, so that
  the student matches the teacher's logit relations, not their range. As
  in the official code (`normalize` of sunshangquan/logit-standardization-KD)
  `std` is the sample standard deviation, `sqrt(sum_k (z_k - mean)^2 / (K -
  1))` (torch's `std`), and `eps` (its 1e-7) is added to it.

  Args:
    logits: `[..., K]`, `K >= 2`.
    eps: added to the standard deviation, > 0.

  Returns:
    `[..., K]`, at least float32: each row has mean 0 and sample standard
    deviation `std / (std + eps)` (1 up to `eps`); a constant row (e.g. a
    padded row of zeros) becomes zeros, with finite gradients.

  Raises:
    ValueError: fewer than 2 classes.
  """
  logits = as_float(logits)
  if logits.ndim < 1 or logits.shape[-1] < 2:
    raise ValueError('logit standardisation needs logits [..., K] with K >= '
                     f'2, got shape {logits.shape}.')
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  variance = (jnp.sum(jnp.square(centred), axis=-1, keepdims=True)
              / (logits.shape[-1] - 1))
  # sqrt has an infinite derivative at 0: a constant row gets std 0 through
  # a branch without it.
  positive = variance > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
  return centred / (std + eps)


def weighted_mean(values: ArrayLike,
                  weights: ArrayLike | None = None) -> Array:
  """Mean of all elements of `values`, optionally weighted.

  Args:
    values: any shape, e.g. `[B]` per-example losses.
    weights: `None`, or non-negative weights broadcastable to `values.shape`,
      e.g. a `[B]` 0/1 mask that is 0 on padded examples.

  Returns:
    Scalar `sum(w * v) / sum(w)`; 0 (not NaN, also in the gradient) when
    `sum(w) == 0`. Elements of weight 0 add nothing to the value, even if
    they are inf or NaN.
  """
  values = jnp.asarray(values)
  if weights is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(jnp.asarray(weights, values.dtype), values.shape)
  total = jnp.sum(jnp.where(weights != 0, weights * values, 0))
  weight_sum = jnp.sum(weights)
  # `total` is 0 when all weights are; dividing it by 1 keeps value and grad 0.
  return total / jnp.where(weight_sum == 0, 1, weight_sum)


def tempered_kl_divergence(student_logits: ArrayLike,
                           teacher_logits: ArrayLike,
                           temperature: Scalar) -> Array:
  """`KL(softmax(teacher / T) || softmax(student / T))`, without `T**2`.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., K]`; gradients flow to it (callers that freeze the
      teacher use `distillation_loss_per_example`).
    temperature: `T > 0`.

  Returns:
    `[...]` divergences, >= 0 up to rounding.
  """
  student_log_probs = tempered_log_softmax(student_logits, temperature)
  teacher_log_probs = tempered_log_softmax(teacher_logits, temperature)
  # optax computes exp(t) * (t - s), which is 0 * inf = NaN where a teacher
  # logit is -inf (a masked class); `where` drops those 0 * log 0 = 0 terms.
  return optax.losses.kl_divergence_with_log_targets(
      student_log_probs, teacher_log_probs,
      where=teacher_log_probs > -jnp.inf)


def tempered_cross_entropy(student_logits: ArrayLike,
                           teacher_logits: ArrayLike,
                           temperature: Scalar) -> Array:
  """`H(softmax(teacher / T), softmax(student / T))`, without `T**2`.

  Equals `tempered_kl_divergence` plus the teacher's tempered entropy, so it
  has the same gradient with respect to the student.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., K]`; gradients flow to it.
    temperature: `T > 0`.

  Returns:
    `[...]` cross-entropies.
  """
  teacher_probs = tempered_softmax(teacher_logits, temperature)
  # The "safe" variant takes 0 * log 0 = 0 where a student logit is -inf and
  # the teacher's probability is 0; otherwise it equals softmax_cross_entropy.
  return optax.losses.safe_softmax_cross_entropy(
      as_float(student_logits) / temperature, teacher_probs)


# A distillation term, by name: `fn(student_logits, teacher_logits,
# temperature) -> [...]` per-example loss, before `T**2` and with no
# stop-gradient (`distillation_loss_per_example` adds both). New methods
# (e.g. DKD) are one function and one entry here.
DistillationFn = Callable[[Array, Array, Scalar], Array]
DISTILLATION_FORMS: Mapping[str, DistillationFn] = {
    'kl': tempered_kl_divergence,
    'cross_entropy': tempered_cross_entropy,
}


def _distillation_fn(form: str) -> DistillationFn:
  try:
    return DISTILLATION_FORMS[form]
  except KeyError:
    raise ValueError(
        f'Unknown distillation form {form!r}; expected one of '
        f'{sorted(DISTILLATION_FORMS)}.') from None


def distillation_loss_per_example(student_logits: ArrayLike,
                                  teacher_logits: ArrayLike,
                                  temperature: Scalar,
                                  *,
                                  t2_scaling: bool = True,
                                  form: str = 'kl') -> Array:
  """Per-example distillation loss of a student from a frozen teacher.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., K]`, under `stop_gradient`: the teacher never
      receives a gradient, even when a caller differentiates with respect to
      these logits.
    temperature: `T > 0`.
    t2_scaling: multiply by `T**2` (Hinton et al., 2015) so gradient scale
      does not change with `T`.
    form: a key of `DISTILLATION_FORMS`: `'kl'` for `KL(p_teacher || p_student)`
      or `'cross_entropy'` for `H(p_teacher, p_student)`, both at temperature
      `T`.

  Returns:
    `[...]` losses, `student_logits.shape[:-1]`.

  Raises:
    ValueError: unknown `form`, logits of different shapes, or a Python
      `temperature` <= 0.
  """
  loss_fn = _distillation_fn(form)
  if jnp.shape(student_logits) != jnp.shape(teacher_logits):
    raise ValueError(
        f'student_logits {jnp.shape(student_logits)} and teacher_logits '
        f'{jnp.shape(teacher_logits)} must have the same shape.')
  loss = loss_fn(student_logits, jax.lax.stop_gradient(teacher_logits),
                 temperature)
  return loss * temperature**2 if t2_scaling else loss


def distillation_loss(student_logits: ArrayLike,
                      teacher_logits: ArrayLike,
                      temperature: Scalar,
                      *,
                      t2_scaling: bool = True,
                      form: str = 'kl',
                      weights: ArrayLike | None = None) -> Array:
  """Mean distillation loss over the examples.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., K]`, under `stop_gradient`.
    temperature: `T > 0`.
    t2_scaling: multiply by `T**2`.
    form: a key of `DISTILLATION_FORMS`.
    weights: `None` or `[...]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar weighted mean of `distillation_loss_per_example`; rows of weight
    0 reach neither the value nor any gradient, whatever they hold.
  """
  per_example = distillation_loss_per_example(
      mask_rows(student_logits, weights), mask_rows(teacher_logits, weights),
      temperature, t2_scaling=t2_scaling, form=form)
  return weighted_mean(per_example, weights)


def hard_label_loss_per_example(logits: ArrayLike,
                                labels: ArrayLike) -> Array:
  """Softmax cross-entropy (at `T = 1`) with ground-truth labels.

  Args:
    logits: `[..., K]`.
    labels: `[...]` integer class ids in `[0, K)`, or `[..., K]` one-hot or
      soft (rows summing to 1) targets; told apart by their shape. Ids
      outside `[0, K)` are an error where they can be checked (outside
      `jit`); see `check_labels` for inside it.

  Returns:
    `[...]` cross-entropies, `logits.shape[:-1]`.

  Raises:
    ValueError: labels whose shape or dtype fits neither kind, or concrete
      ids outside `[0, K)`.
  """
  logits = as_float(logits)
  labels = jnp.asarray(labels)
  if labels.shape == logits.shape[:-1]:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'labels of shape {labels.shape} must be integer class '
                       f'ids, got dtype {labels.dtype}.')
    check_labels(labels, logits.shape[-1])
    return optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, labels)
  if labels.shape == logits.shape:
    # "safe": a -inf logit with target 0 adds 0, not NaN.
    return optax.losses.safe_softmax_cross_entropy(
        logits, labels.astype(logits.dtype))
  raise ValueError(
      f'labels of shape {labels.shape} fit neither integer labels '
      f'{logits.shape[:-1]} nor one-hot/soft labels {logits.shape}.')


def hard_label_loss(logits: ArrayLike,
                    labels: ArrayLike,
                    *,
                    weights: ArrayLike | None = None) -> Array:
  """Mean softmax cross-entropy with ground-truth labels.

  Args:
    logits: `[..., K]`.
    labels: `[...]` integer ids or `[..., K]` one-hot/soft targets.
    weights: `None` or `[...]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar weighted mean of `hard_label_loss_per_example`; rows of weight 0
    (logits and labels) reach neither the value nor any gradient.
  """
  per_example = hard_label_loss_per_example(
      mask_rows(logits, weights), mask_rows(labels, weights))
  return weighted_mean(per_example, weights)


def kd_loss(student_logits: ArrayLike,
            teacher_logits: ArrayLike,
            labels: ArrayLike,
            *,
            alpha: Scalar,
            temperature: Scalar,
            t2_scaling: bool = True,
            form: str = 'kl',
            weights: ArrayLike | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """Knowledge-distillation objective `alpha * hard + (1 - alpha) * soft`.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[..., K]`, under `stop_gradient`.
    labels: `[...]` integer ids or `[..., K]` one-hot/soft targets.
    alpha: weight in `[0, 1]` of the hard-label loss.
    temperature: `T > 0` of the distillation term (the hard term uses 1).
    t2_scaling: multiply the distillation term by `T**2`.
    form: a key of `DISTILLATION_FORMS`.
    weights: `None` or `[...]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, aux)`: the scalar total, and `aux` with the scalar terms
    `'student_loss'` (hard) and `'distillation_loss'` (soft, `T**2`-scaled if
    `t2_scaling`).
  """
  _check_alpha(alpha)
  _distillation_fn(form)  # An unknown form fails before any work is done.
  student_loss = hard_label_loss(student_logits, labels, weights=weights)
  soft_loss = distillation_loss(
      student_logits, teacher_logits, temperature, t2_scaling=t2_scaling,
      form=form, weights=weights)
  loss = alpha * student_loss + (1 - alpha) * soft_loss
  return loss, {'student_loss': student_loss, 'distillation_loss': soft_loss}
