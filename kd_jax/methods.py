"""Losses of the knowledge-distillation method family beyond Hinton's KD.

Logit methods:
  * `dkd_loss`: Decoupled KD (Zhao et al., "Decoupled Knowledge
    Distillation", CVPR 2022).
  * `multi_teacher_distillation_loss`: KD from the mixture of several
    teachers' tempered distributions.

Feature methods:
  * `hint_loss`: FitNets hints (Romero et al., "FitNets: Hints for Thin Deep
    Nets", ICLR 2015).
  * `attention_map`, `attention_transfer_loss`,
    `multi_layer_attention_transfer_loss`: attention transfer (Zagoruyko &
    Komodakis, "Paying More Attention to Attention", ICLR 2017).

Relational methods (losses over the pairs and triplets of a batch):
  * `rkd_loss`, `rkd_distance_loss`, `rkd_angle_loss`: relational KD (Park et
    al., "Relational Knowledge Distillation", CVPR 2019).
  * `pkt_loss`: probabilistic knowledge transfer (Passalis & Tefas, "Learning
    Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018).

Conventions, as in `kd_jax.losses`: every function is pure, jit-able and
vmap-able; inputs in half precision are upcast to float32; the teacher's
inputs are under `jax.lax.stop_gradient`, so no gradient ever reaches them;
log-probabilities come from `log_softmax`; `weights` is `None` or a `[B]`
non-negative per-example weight (e.g. a 0/1 mask that is 0 on padded rows),
and a row of weight 0 changes neither the loss nor any gradient. Features and
embeddings have the batch on axis 0.

`LOGIT_METHODS` maps a method's name to a total training objective over
logits with one signature, `fn(student_logits, teacher_logits, labels, *,
weights=None, **hparams) -> (loss, aux)` (big_vision's `distance.py` in
spirit: a dict of small functions, no class hierarchy).
"""

from collections.abc import Callable, Mapping, Sequence
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import losses

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Scalar = float | Array

# Cosine similarities are matrix products; TPUs and recent GPUs run float32
# matmuls at reduced precision by default (bfloat16 passes, TF32), which costs
# ~1e-3 in a cosine. The relational losses ask for full float32.
_PRECISION = jax.lax.Precision.HIGHEST


# --- helpers. -----------------------------------------------------------------


def _as_float(x: ArrayLike) -> Array:
  """`x` as an array of at least float32 precision (same shape)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_non_negative(name: str, value: Scalar) -> None:
  # Only Python / NumPy numbers can be checked; traced values pass unchecked.
  if isinstance(value, numbers.Real) and not value >= 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def _check_same_shape(student_name: str, student: ArrayLike,
                      teacher_name: str, teacher: ArrayLike) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(
        f'{student_name} {jnp.shape(student)} and {teacher_name} '
        f'{jnp.shape(teacher)} must have the same shape.')


def _kl_from_log_probs(teacher_log_probs: Array,
                       student_log_probs: Array) -> Array:
  """`KL(teacher || student)` over the last axis, from log-probabilities.

  Classes of teacher probability exactly 0 (log-probability -inf) add 0, also
  where the student's log-probability is -inf too (the excluded target class
  of NCKD), and pass no NaN into the gradient.
  """
  return optax.losses.kl_divergence_with_log_targets(
      student_log_probs, teacher_log_probs,
      where=teacher_log_probs > -jnp.inf)


def _norm_and_unit(x: Array) -> tuple[Array, Array]:
  """Euclidean norm and unit vector over the last axis, safe at zero.

  Args:
    x: `[..., D]`.

  Returns:
    `([...] norms, [..., D] unit vectors)`. A zero vector has norm 0 and unit
    vector 0, with finite gradients (0 for the norm), where `sqrt` alone
    would give an infinite derivative. Dividing by the largest |element|
    first avoids overflow and underflow of the squares; that scale is under
    `stop_gradient` because both results are exactly invariant to it.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  nonzero = scale > 0
  safe_scale = jnp.where(nonzero, scale, 1.0)
  scaled = x / safe_scale
  # Where `x` is nonzero, its largest scaled element is +-1, so the sum of
  # squares is >= 1 and `sqrt` is far from its singularity at 0.
  scaled_norm = jnp.sqrt(jnp.where(
      nonzero, jnp.sum(scaled * scaled, axis=-1, keepdims=True), 1.0))
  norm = jnp.where(nonzero, safe_scale * scaled_norm, 0.0)
  return norm[..., 0], scaled / scaled_norm


def _flat_embeddings(name: str, embeddings: ArrayLike) -> Array:
  """`[B, ...]` embeddings as float `[B, D]`, trailing axes flattened."""
  embeddings = _as_float(embeddings)
  if embeddings.ndim < 2:
    raise ValueError(f'{name} must be [B, D] (or [B, ...]), got shape '
                     f'{embeddings.shape}.')
  return embeddings.reshape(embeddings.shape[0], -1)


def _relational_inputs(
    student_embeddings: ArrayLike, teacher_embeddings: ArrayLike,
    weights: ArrayLike | None) -> tuple[Array, Array, Array]:
  """Checked `[B, Ds]` and `[B, Dt]` embeddings (teacher frozen), `[B]` weights.

  Rows of weight 0 are set to 0, so that whatever padding they hold (even
  inf or NaN) cannot reach a value or a gradient through the pairs they are
  part of (their pairs get weight 0 as well).
  """
  student = _flat_embeddings('student_embeddings', student_embeddings)
  teacher = jax.lax.stop_gradient(
      _flat_embeddings('teacher_embeddings', teacher_embeddings))
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(
        f'student_embeddings {jnp.shape(student_embeddings)} and '
        f'teacher_embeddings {jnp.shape(teacher_embeddings)} must have the '
        'same batch size.')
  if weights is None:
    return student, teacher, jnp.ones(student.shape[:1], student.dtype)
  weights = jnp.broadcast_to(
      jnp.asarray(weights, student.dtype), student.shape[:1])
  keep = (weights != 0)[:, None]
  return (jnp.where(keep, student, 0.0), jnp.where(keep, teacher, 0.0),
          weights)


# --- Decoupled KD. ------------------------------------------------------------


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
  valid = (labels >= -num_classes) & (labels < num_classes)
  labels = jnp.where(labels < 0, labels + num_classes, labels)
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
    labels: `[...]` integer target ids in `[0, K)`; ids in `[-K, 0)` count
      from the end as in NumPy; other ids give NaN (padded rows need a 0
      weight in the reduced forms, not just a sentinel id).
    temperature: `T > 0`.

  Returns:
    `(tckd, nckd)`, each `[...]` (`student_logits.shape[:-1]`), >= 0 up to
    rounding.

  Raises:
    ValueError: logits of different shapes or with fewer than 2 classes,
      labels that are not integer ids of the batch shape, or a Python
      `temperature` <= 0.
  """
  _check_same_shape('student_logits', student_logits,
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
        jnp.where(is_target, -jnp.inf, _as_float(logits)), temperature)
    return log_binary, log_non_target

  student_binary, student_non_target = log_distributions(student_logits)
  teacher_binary, teacher_non_target = log_distributions(teacher_logits)
  tckd = _kl_from_log_probs(teacher_binary, student_binary)
  nckd = _kl_from_log_probs(teacher_non_target, student_non_target)
  # Invalid ids were computed with an all-False mask (finite, so the
  # gradient through `where` stays 0) and are reported as NaN.
  return jnp.where(valid, tckd, jnp.nan), jnp.where(valid, nckd, jnp.nan)


def dkd_loss(student_logits: ArrayLike,
             teacher_logits: ArrayLike,
             labels: ArrayLike,
             *,
             alpha: Scalar = 1.0,
             beta: Scalar = 8.0,
             temperature: Scalar = 4.0,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Decoupled KD loss `(alpha * TCKD + beta * NCKD) * T**2`, batch mean.

  Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, section
  "Decoupled Knowledge Distillation"; the defaults are the paper's CIFAR-100
  setting (ImageNet: `beta = 0.5`, `T = 1`). The paper's full objective adds
  the cross-entropy with the labels (`LOGIT_METHODS['dkd']`); its code also
  ramps this term in linearly over the first 20 epochs, a schedule left to
  the caller (scale the loss).

  Args:
    student_logits: `[..., K]`, `K >= 2`.
    teacher_logits: `[..., K]`, under `stop_gradient`.
    labels: `[...]` integer target ids (see `dkd_terms_per_example`).
    alpha: weight >= 0 of TCKD.
    beta: weight >= 0 of NCKD.
    temperature: `T > 0`.
    weights: `None` or `[...]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, aux)`: the scalar loss, and `aux` with the scalar batch means
    `'tckd'` and `'nckd'`, each multiplied by `T**2` (so that `loss = alpha *
    aux['tckd'] + beta * aux['nckd']`).
  """
  _check_non_negative('alpha', alpha)
  _check_non_negative('beta', beta)
  tckd, nckd = dkd_terms_per_example(
      student_logits, teacher_logits, labels, temperature)
  scale = temperature**2
  tckd = losses.weighted_mean(tckd, weights) * scale
  nckd = losses.weighted_mean(nckd, weights) * scale
  return alpha * tckd + beta * nckd, {'tckd': tckd, 'nckd': nckd}


# --- Several teachers. --------------------------------------------------------


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
  teacher_weights = _as_float(teacher_weights)
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
    teacher_logits: `[M, ..., K]`, `M` teachers' logits for the same
      examples; the whole target (and `teacher_weights`) is under
      `stop_gradient`.
    temperature: `T > 0`, shared by the student and every teacher.
    teacher_weights: `None` (uniform) or `[M]` non-negative weights with a
      positive sum; they are normalised to sum to 1.
    t2_scaling: multiply by `T**2` (Hinton et al., 2015).

  Returns:
    `[...]` losses, `student_logits.shape[:-1]`.

  Raises:
    ValueError: `teacher_logits` not `[M, *student_logits.shape]`, or
      `teacher_weights` of the wrong shape or (when concrete) with negative
      values or a zero sum.
  """
  student_shape = jnp.shape(student_logits)
  teacher_shape = jnp.shape(teacher_logits)
  if len(teacher_shape) != len(student_shape) + 1 or (
      teacher_shape[1:] != student_shape) or teacher_shape[0] < 1:
    raise ValueError(
        f'teacher_logits {teacher_shape} must be [M, *student_logits.shape] '
        f'with M >= 1 teachers; student_logits is {student_shape}.')
  log_weights = _teacher_log_weights(teacher_weights, teacher_shape[0])
  teacher_log_probs = losses.tempered_log_softmax(teacher_logits, temperature)
  log_weights = log_weights.reshape((-1,) + (1,) * len(student_shape))
  target_log_probs = jax.lax.stop_gradient(
      jax.nn.logsumexp(teacher_log_probs + log_weights, axis=0))
  student_log_probs = losses.tempered_log_softmax(student_logits, temperature)
  loss = _kl_from_log_probs(target_log_probs, student_log_probs)
  return loss * temperature**2 if t2_scaling else loss


def multi_teacher_distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: Scalar,
    *,
    teacher_weights: ArrayLike | None = None,
    t2_scaling: bool = True,
    weights: ArrayLike | None = None) -> Array:
  """Mean KD loss from the mixture of `M` teachers' tempered distributions.

  With one teacher (`M = 1`) it equals `kd_jax.losses.distillation_loss`.

  Args:
    student_logits: `[..., K]`.
    teacher_logits: `[M, ..., K]`, under `stop_gradient`.
    temperature: `T > 0`.
    teacher_weights: `None` (uniform) or `[M]` non-negative weights.
    t2_scaling: multiply by `T**2`.
    weights: `None` or `[...]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar weighted mean of `multi_teacher_distillation_loss_per_example`.
  """
  per_example = multi_teacher_distillation_loss_per_example(
      student_logits, teacher_logits, temperature,
      teacher_weights=teacher_weights, t2_scaling=t2_scaling)
  return losses.weighted_mean(per_example, weights)


# --- FitNets hints. -----------------------------------------------------------


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
  _check_same_shape('student_features', student_features,
                    'teacher_features', teacher_features)
  if jnp.ndim(student_features) < 1:
    raise ValueError('features must have a batch axis, got a scalar.')
  diff = (_as_float(student_features)
          - jax.lax.stop_gradient(_as_float(teacher_features)))
  return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def hint_loss(student_features: ArrayLike,
              teacher_features: ArrayLike,
              *,
              weights: ArrayLike | None = None) -> Array:
  """Mean over the batch of `hint_loss_per_example` (FitNets, ICLR 2015).

  Args:
    student_features: `[B, ...]`, already through the regressor.
    teacher_features: `[B, ...]`, same shape, under `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar weighted mean squared error.
  """
  return losses.weighted_mean(
      hint_loss_per_example(student_features, teacher_features), weights)


# --- Attention transfer. ------------------------------------------------------


def _check_p(p: Scalar) -> None:
  # |a|^p has a finite derivative at a = 0 only for p >= 1.
  if isinstance(p, numbers.Real) and not p >= 1:
    raise ValueError(f'p must be >= 1, got {p}.')


def attention_map(features: ArrayLike, *, p: Scalar = 2) -> Array:
  """Activation-based spatial attention map, L2-normalised.

  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
  activation-based attention transfer: `F(A) = sum_c |A_c|^p` over channels,
  flattened over space and divided by its L2 norm. (The official code takes
  the mean over channels; after normalisation that is the same map.)

  Args:
    features: `[B, H, W, C]` activations (NHWC, as in Flax), or any
      `[B, ..., C]` with at least one spatial axis.
    p: exponent >= 1 (the paper uses 2).

  Returns:
    `[B, H * W]` maps of unit L2 norm; an all-zero example gives an all-zero
    map (not NaN), with finite gradients.

  Raises:
    ValueError: features of rank < 3, or a Python `p` < 1.
  """
  _check_p(p)
  features = _as_float(features)
  if features.ndim < 3:
    raise ValueError('features must be [B, H, W, C] (or [B, ..., C]), got '
                     f'shape {features.shape}.')
  energy = jnp.sum(jnp.abs(features)**p, axis=-1)
  _, unit = _norm_and_unit(energy.reshape(energy.shape[0], -1))
  return unit


def attention_transfer_loss_per_example(student_features: ArrayLike,
                                        teacher_features: ArrayLike,
                                        *,
                                        p: Scalar = 2) -> Array:
  """Per-example attention-transfer loss of one layer.

  The official code's form, `(at(s) - at(t)).pow(2).mean()`: the mean over
  spatial positions of the squared difference of the normalised maps. (The
  paper's Eq. for the loss writes the L2 norm of the difference, not its
  mean square, with a factor `beta / 2`; the official code and its
  `beta = 1000` use this form.)

  Args:
    student_features: `[B, H, W, Cs]`.
    teacher_features: `[B, H, W, Ct]`, under `stop_gradient`; the channel
      counts may differ, the spatial sizes must match.
    p: exponent >= 1 of `attention_map`.

  Returns:
    `[B]` losses, in `[0, 4 / (H * W)]`.

  Raises:
    ValueError: batch or spatial sizes that differ (the message names both
      shapes).
  """
  student_shape = jnp.shape(student_features)
  teacher_shape = jnp.shape(teacher_features)
  if student_shape[:-1] != teacher_shape[:-1]:
    raise ValueError(
        f'student_features {student_shape} and teacher_features '
        f'{teacher_shape} must have the same batch and spatial sizes (all but '
        'the last, channel, axis); resize one of them first.')
  student_map = attention_map(student_features, p=p)
  teacher_map = attention_map(jax.lax.stop_gradient(teacher_features), p=p)
  return jnp.mean(jnp.square(student_map - teacher_map), axis=-1)


def attention_transfer_loss(student_features: ArrayLike,
                            teacher_features: ArrayLike,
                            *,
                            p: Scalar = 2,
                            weights: ArrayLike | None = None) -> Array:
  """Attention-transfer loss of one layer, mean over the batch.

  Zagoruyko & Komodakis, ICLR 2017. See
  `attention_transfer_loss_per_example`.

  Args:
    student_features: `[B, H, W, Cs]`.
    teacher_features: `[B, H, W, Ct]`, under `stop_gradient`.
    p: exponent >= 1 of `attention_map`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar weighted mean.
  """
  return losses.weighted_mean(
      attention_transfer_loss_per_example(
          student_features, teacher_features, p=p), weights)


def multi_layer_attention_transfer_loss(
    feature_pairs: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    p: Scalar = 2,
    weights: ArrayLike | None = None) -> Array:
  """Attention-transfer loss summed over layers.

  The paper's objective adds `beta / 2` times this sum (`beta = 1000` in the
  official code) to the cross-entropy.

  Args:
    feature_pairs: `(student_features, teacher_features)` pairs, one per
      layer, each as in `attention_transfer_loss` (spatial sizes match within
      a pair and may differ between layers).
    p: exponent >= 1 of `attention_map`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    Scalar sum over layers of `attention_transfer_loss`.

  Raises:
    ValueError: no pairs, or a pair whose spatial sizes differ (the message
      names the layer and both shapes).
  """
  if not feature_pairs:
    raise ValueError('feature_pairs is empty; give at least one layer.')
  total = 0.0
  for layer, (student, teacher) in enumerate(feature_pairs):
    try:
      total += attention_transfer_loss(student, teacher, p=p, weights=weights)
    except ValueError as e:
      raise ValueError(f'layer {layer}: {e}') from e
  return total


# --- Relational KD. -----------------------------------------------------------


# Pairs whose squared distance is below this fraction of their squared norms
# (after centring) are coincident: the Gram matrix cannot tell them apart.
_COINCIDENT = 1e-6


def _centered_gram(embeddings: Array) -> Array:
  """`[B, B]` inner products of the embeddings `[B, D]`, centred and scaled.

  Distances and angles between examples do not change when the batch is
  translated, and their RKD potentials not when it is scaled: subtracting
  the mean keeps the products, and so the differences taken from them, as
  small as the spread of the batch (less cancellation), and dividing by the
  largest |element| (under `stop_gradient`) keeps their squares finite.
  """
  centered = embeddings - jnp.mean(embeddings, axis=0, keepdims=True)
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(centered)))
  centered = centered / jnp.where(scale > 0, scale, 1.0)
  return jnp.matmul(centered, centered.T, precision=_PRECISION)


def _distances_from_gram(gram: Array) -> tuple[Array, Array]:
  """`([B, B] distances, [B, B] bool apart)` from a Gram matrix.

  `||e_i - e_j||^2 = g_ii + g_jj - 2 g_ij`; pairs closer than `_COINCIDENT`
  allows are coincident (`apart` False, distance 0, gradient 0), as a zero
  difference is in `_norm_and_unit`.
  """
  norms = jnp.diagonal(gram)
  squared = norms[:, None] + norms[None, :] - 2.0 * gram
  apart = squared > _COINCIDENT * (norms[:, None] + norms[None, :])
  return jnp.where(apart, jnp.sqrt(jnp.where(apart, squared, 1.0)),
                   0.0), apart


def _off_diagonal(n: int) -> Array:
  return ~jnp.eye(n, dtype=bool)


def rkd_distance_loss(student_embeddings: ArrayLike,
                      teacher_embeddings: ArrayLike,
                      *,
                      weights: ArrayLike | None = None) -> Array:
  """RKD distance-wise distillation loss (Park et al., CVPR 2019).

  The distance potential of a pair is `||e_i - e_j||_2 / mu`, `mu` the mean
  distance over the batch's pairs of distinct examples `i != j`; the loss is
  the Huber loss (smooth L1, `delta = 1`) between the student's and the
  teacher's potentials, averaged over those pairs as in the paper's set
  `X^2`. (The official code averages over all `B^2` entries, diagonal
  included, i.e. this loss times `(B - 1) / B`, and takes `mu` over the
  pairs at nonzero distance.)

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`; `Dt` may differ
      from `Ds`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); a
      pair weighs the product of its examples' weights.

  Returns:
    Scalar loss, 0 for fewer than 2 examples. Invariant to scaling,
    translating and rotating either embedding; finite, with finite
    gradients, where examples coincide (distance 0).
  """
  student, teacher, weights = _relational_inputs(
      student_embeddings, teacher_embeddings, weights)
  pair_weights = (weights[:, None] * weights[None, :]
                  * _off_diagonal(weights.shape[0]))

  def potentials(embeddings):
    distances, _ = _distances_from_gram(_centered_gram(embeddings))
    mean_distance = losses.weighted_mean(distances, pair_weights)
    return distances / jnp.where(mean_distance > 0, mean_distance, 1.0)

  return losses.weighted_mean(
      optax.losses.huber_loss(potentials(student), potentials(teacher),
                              delta=1.0),
      pair_weights)


def rkd_angle_loss(student_embeddings: ArrayLike,
                   teacher_embeddings: ArrayLike,
                   *,
                   weights: ArrayLike | None = None) -> Array:
  """RKD angle-wise distillation loss (Park et al., CVPR 2019).

  The angle potential of a triplet `(i, j, k)` is the cosine of the angle at
  `e_j`, `<u_ij, u_kj>` with `u_ij = (e_i - e_j) / ||e_i - e_j||`; the loss is
  the Huber loss (`delta = 1`) between student and teacher potentials,
  averaged over the triplets of distinct examples, the paper's set `X^3`.
  (The official code averages over all `B^3` entries, degenerate triplets of
  potential 0 or 1 in both networks included, i.e. this loss times
  `(B - 1)(B - 2) / B^2`.)

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); a
      triplet weighs the product of its examples' weights.

  Returns:
    Scalar loss, 0 for fewer than 3 examples. The cosines come from the
    batch's Gram matrix, `<e_i - e_j, e_k - e_j> = g_ik - g_ij - g_jk +
    g_jj`: time `O(B^2 D + B^3)`, memory `O(B D + B^3)`, where forming the
    `[B, B, D]` differences would cost `O(B^3 D)` time and `O(B^2 D)`
    memory (the seed teacher's conv2, D = 12,544: 620 ms per step against
    ~1 ms). Pairs closer than 1e-3 of their norms after centring count as
    coincident (cosine 0), like exactly equal examples.
  """
  student, teacher, weights = _relational_inputs(
      student_embeddings, teacher_embeddings, weights)
  n = weights.shape[0]
  distinct = (_off_diagonal(n)[:, :, None] & _off_diagonal(n)[:, None, :]
              & _off_diagonal(n)[None, :, :])
  # Indexed [j, i, k], the vertex j first.
  triplet_weights = (weights[:, None, None] * weights[None, :, None]
                     * weights[None, None, :] * distinct)

  def potentials(embeddings):  # Indexed [j, i, k], the vertex j first.
    gram = _centered_gram(embeddings)
    distances, apart = _distances_from_gram(gram)
    norms = jnp.diagonal(gram)
    dots = (gram[None, :, :] - gram[:, :, None] - gram[:, None, :]
            + norms[:, None, None])
    both = apart[:, :, None] & apart[:, None, :]
    lengths = distances[:, :, None] * distances[:, None, :]
    cosines = jnp.where(both, dots / jnp.where(both, lengths, 1.0), 0.0)
    return jnp.clip(cosines, -1.0, 1.0)

  return losses.weighted_mean(
      optax.losses.huber_loss(potentials(student), potentials(teacher),
                              delta=1.0),
      triplet_weights)


def rkd_loss(student_embeddings: ArrayLike,
             teacher_embeddings: ArrayLike,
             *,
             distance_weight: Scalar = 25.0,
             angle_weight: Scalar = 50.0,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Relational KD: weighted distance-wise plus angle-wise losses.

  Park et al., "Relational Knowledge Distillation", CVPR 2019; the default
  weights are the paper's (`lambda_D = 25`, `lambda_A = 50`). See
  `rkd_distance_loss` and `rkd_angle_loss`.

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`.
    distance_weight: weight >= 0 of the distance-wise term.
    angle_weight: weight >= 0 of the angle-wise term.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask).

  Returns:
    `(loss, aux)`: the scalar `distance_weight * distance + angle_weight *
    angle`, and `aux` with the unweighted scalar terms `'distance'` and
    `'angle'`.
  """
  _check_non_negative('distance_weight', distance_weight)
  _check_non_negative('angle_weight', angle_weight)
  distance = rkd_distance_loss(
      student_embeddings, teacher_embeddings, weights=weights)
  angle = rkd_angle_loss(
      student_embeddings, teacher_embeddings, weights=weights)
  loss = distance_weight * distance + angle_weight * angle
  return loss, {'distance': distance, 'angle': angle}


# --- Probabilistic knowledge transfer. ----------------------------------------


def pkt_loss(student_embeddings: ArrayLike,
             teacher_embeddings: ArrayLike,
             *,
             eps: Scalar = 1e-7,
             weights: ArrayLike | None = None) -> Array:
  """Probabilistic knowledge transfer with the cosine kernel.

  Passalis & Tefas, "Learning Deep Representations with Probabilistic
  Knowledge Transfer", ECCV 2018, with the cosine kernel: the batch's
  embeddings are L2 normalised, their cosine similarities shifted to `[0, 1]`
  by `(cos + 1) / 2`, and each row normalised into a conditional distribution
  `p_{j|i}`; the loss is `sum_j p_{j|i}^teacher log((p_{j|i}^teacher + eps) /
  (p_{j|i}^student + eps))` for each row `i`, averaged over the rows.

  As in the official code, a row includes the example itself (`j = i`, a
  similarity of 1; the paper's kernel sum skips it) and `eps` smooths the
  log ratio. The official code divides by `B^2` (`torch.mean` of the matrix)
  where this divides by `B`, the number of rows: this loss is the official
  one times `B`. The normalisation of the embeddings is exact (safe at
  zero) where the official code divides by `norm + eps`.

  Args:
    student_embeddings: `[B, Ds]` (trailing axes are flattened).
    teacher_embeddings: `[B, Dt]`, under `stop_gradient`.
    eps: smoothing >= 0 of the log ratio.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask): the
      weight of row `i` in the mean and of example `j` in each row's kernel.

  Returns:
    Scalar loss, 0 where the student's and teacher's cosine similarities
    agree. Invariant to scaling either embedding.
  """
  _check_non_negative('eps', eps)
  student, teacher, weights = _relational_inputs(
      student_embeddings, teacher_embeddings, weights)

  def conditional_probs(embeddings):
    _, units = _norm_and_unit(embeddings)
    cosine = jnp.matmul(units, units.T, precision=_PRECISION)
    # Rounding can take a cosine just below -1.
    kernel = jnp.maximum((cosine + 1.0) / 2.0, 0.0) * weights[None, :]
    row_sums = jnp.sum(kernel, axis=-1, keepdims=True)
    return kernel / jnp.where(row_sums > 0, row_sums, 1.0)

  student_probs = conditional_probs(student)
  teacher_probs = conditional_probs(teacher)
  # Terms of teacher probability 0 (padded columns) add 0, also for eps = 0,
  # and pass no NaN into the gradient.
  positive = teacher_probs > 0
  log_ratio = (jnp.log(jnp.where(positive, teacher_probs + eps, 1.0))
               - jnp.log(jnp.where(positive, student_probs + eps, 1.0)))
  per_row = jnp.sum(jnp.where(positive, teacher_probs * log_ratio, 0.0),
                    axis=-1)
  return losses.weighted_mean(per_row, weights)


# --- Training objectives over logits, by name. --------------------------------


def _kd_objective(student_logits: ArrayLike,
                  teacher_logits: ArrayLike,
                  labels: ArrayLike,
                  *,
                  weights: ArrayLike | None = None,
                  alpha: Scalar,
                  temperature: Scalar,
                  t2_scaling: bool = True,
                  form: str = 'kl'
                  ) -> tuple[Array, dict[str, Array]]:
  """Hinton's KD: `kd_jax.losses.kd_loss`."""
  return losses.kd_loss(
      student_logits, teacher_logits, labels, alpha=alpha,
      temperature=temperature, t2_scaling=t2_scaling, form=form,
      weights=weights)


def _multi_teacher_objective(student_logits: ArrayLike,
                             teacher_logits: ArrayLike,
                             labels: ArrayLike,
                             *,
                             weights: ArrayLike | None = None,
                             alpha: Scalar,
                             temperature: Scalar,
                             teacher_weights: ArrayLike | None = None,
                             t2_scaling: bool = True
                             ) -> tuple[Array, dict[str, Array]]:
  """Ensemble KD: `alpha * CE + (1 - alpha) * KL(teacher mixture || student)`.

  `teacher_logits` are `[B, M, K]` (examples first, as a batch gathers them).
  """
  student_loss = losses.hard_label_loss(student_logits, labels,
                                        weights=weights)
  soft_loss = multi_teacher_distillation_loss(
      student_logits, jnp.swapaxes(jnp.asarray(teacher_logits), 0, 1),
      temperature, teacher_weights=teacher_weights, t2_scaling=t2_scaling,
      weights=weights)
  loss = alpha * student_loss + (1 - alpha) * soft_loss
  return loss, {'student_loss': student_loss, 'distillation_loss': soft_loss}


def _dkd_objective(student_logits: ArrayLike,
                   teacher_logits: ArrayLike,
                   labels: ArrayLike,
                   *,
                   weights: ArrayLike | None = None,
                   ce_weight: Scalar = 1.0,
                   alpha: Scalar = 1.0,
                   beta: Scalar = 8.0,
                   temperature: Scalar = 4.0
                   ) -> tuple[Array, dict[str, Array]]:
  """DKD's objective `ce_weight * CE(labels, student) + dkd_loss`."""
  _check_non_negative('ce_weight', ce_weight)
  student_loss = losses.hard_label_loss(
      student_logits, labels, weights=weights)
  distillation, aux = dkd_loss(
      student_logits, teacher_logits, labels, alpha=alpha, beta=beta,
      temperature=temperature, weights=weights)
  loss = ce_weight * student_loss + distillation
  return loss, {'student_loss': student_loss,
                'distillation_loss': distillation, **aux}


# A training objective over logits, by name: `fn(student_logits,
# teacher_logits, labels, *, weights=None, **hparams) -> (loss, aux)`, `aux`
# holding at least the scalars 'student_loss' (hard) and 'distillation_loss'
# (soft). The teacher is frozen (`stop_gradient`) in every one.
LogitMethodFn = Callable[..., tuple[Array, dict[str, Array]]]
LOGIT_METHODS: Mapping[str, LogitMethodFn] = {
    # hparams: alpha, temperature, t2_scaling=True, form='kl'.
    'kd': _kd_objective,
    # hparams: ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0.
    'dkd': _dkd_objective,
    # teacher_logits [B, M, K]; hparams: alpha, temperature,
    # teacher_weights=None, t2_scaling=True.
    'multi_teacher': _multi_teacher_objective,
}


# --- Feature objectives for the training step, by name. ----------------------


def _flat(features: Array) -> Array:
  return features.reshape((features.shape[0], -1))


def _fitnets_objective(student_features, teacher_features, *,
                       weights=None) -> tuple[Array, dict[str, Array]]:
  """FitNets hints summed over the layer pairs; the student's features must
  already be through the regressor (`models.HintRegressor`)."""
  if len(student_features) != len(teacher_features):
    raise ValueError(f'FitNets pairs layers: got {len(student_features)} '
                     f'student and {len(teacher_features)} teacher layers')
  return sum(hint_loss(s, t, weights=weights)
             for s, t in zip(student_features, teacher_features)), {}


def _at_objective(student_features, teacher_features, *, weights=None,
                  p: int = 2) -> tuple[Array, dict[str, Array]]:
  """Attention transfer summed over the (student, teacher) layer pairs."""
  if len(student_features) != len(teacher_features):
    raise ValueError(f'attention transfer pairs layers: got '
                     f'{len(student_features)} student and '
                     f'{len(teacher_features)} teacher layers')
  return multi_layer_attention_transfer_loss(
      list(zip(student_features, teacher_features)), p=p,
      weights=weights), {}


def _rkd_objective(student_features, teacher_features, *, weights=None,
                   distance_weight: Scalar = 25.0,
                   angle_weight: Scalar = 50.0
                   ) -> tuple[Array, dict[str, Array]]:
  """RKD on the last listed layer of each network, flattened to `[B, D]`."""
  loss, aux = rkd_loss(_flat(student_features[-1]),
                       _flat(teacher_features[-1]),
                       distance_weight=distance_weight,
                       angle_weight=angle_weight, weights=weights)
  return loss, {'rkd_distance': aux['distance'], 'rkd_angle': aux['angle']}


def _pkt_objective(student_features, teacher_features, *,
                   weights=None) -> tuple[Array, dict[str, Array]]:
  """PKT on the last listed layer of each network, flattened to `[B, D]`."""
  return pkt_loss(_flat(student_features[-1]), _flat(teacher_features[-1]),
                  weights=weights), {}


# A feature objective, by name: `fn(student_features, teacher_features, *,
# weights=None, **hparams) -> (loss, aux)` over lists of per-layer outputs
# (`train.distill_step`'s `feature_loss`; the teacher's are constants there).
FEATURE_METHODS: Mapping[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    # Needs the student's features mapped by a trained regressor first.
    'fitnets': _fitnets_objective,
    'at': _at_objective,
    'rkd': _rkd_objective,
    'pkt': _pkt_objective,
}
