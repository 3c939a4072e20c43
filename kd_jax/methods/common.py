"""Helpers shared by the method modules: checks, stable pieces, settings.

Conventions of every method's losses (as in `kd_jax.losses`): pure, jit-able
and vmap-able; inputs in half precision are upcast to float32; the teacher's
inputs are under `jax.lax.stop_gradient`; log-probabilities come from
`log_softmax`; `weights` is `None` or a `[B]` non-negative per-example weight
(e.g. a 0/1 mask that is 0 on padded rows), and a row of weight 0 changes
neither the loss nor any gradient, whatever it holds. Features and
embeddings have the batch on axis 0.
"""

from collections.abc import Callable, Mapping
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Scalar = float | Array

# Cosine similarities are matrix products; TPUs and recent GPUs run float32
# matmuls at reduced precision by default (bfloat16 passes, TF32), which costs
# ~1e-3 in a cosine. The relational losses ask for full float32.
PRECISION = jax.lax.Precision.HIGHEST


def check_non_negative(name: str, value: Scalar) -> None:
  # Only Python / NumPy numbers can be checked; traced values pass unchecked.
  if isinstance(value, numbers.Real) and not value >= 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def check_same_shape(student_name: str, student: ArrayLike,
                     teacher_name: str, teacher: ArrayLike) -> None:
  if jnp.shape(student) != jnp.shape(teacher):
    raise ValueError(
        f'{student_name} {jnp.shape(student)} and {teacher_name} '
        f'{jnp.shape(teacher)} must have the same shape.')


def kl_from_log_probs(teacher_log_probs: Array,
                      student_log_probs: Array) -> Array:
  """`KL(teacher || student)` over the last axis, from log-probabilities.

  Classes of teacher probability exactly 0 (log-probability -inf) add 0, also
  where the student's log-probability is -inf too (the excluded target class
  of NCKD), and pass no NaN into the gradient.
  """
  return optax.losses.kl_divergence_with_log_targets(
      student_log_probs, teacher_log_probs,
      where=teacher_log_probs > -jnp.inf)


def norm_and_unit(x: Array) -> tuple[Array, Array]:
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


def flat_embeddings(name: str, embeddings: ArrayLike) -> Array:
  """`[B, ...]` embeddings as float `[B, D]`, trailing axes flattened."""
  embeddings = losses.as_float(embeddings)
  if embeddings.ndim < 2:
    raise ValueError(f'{name} must be [B, D] (or [B, ...]), got shape '
                     f'{embeddings.shape}.')
  return embeddings.reshape(embeddings.shape[0], -1)


def relational_inputs(
    student_embeddings: ArrayLike, teacher_embeddings: ArrayLike,
    weights: ArrayLike | None) -> tuple[Array, Array, Array]:
  """Checked `[B, Ds]` and `[B, Dt]` embeddings (teacher frozen), `[B]` weights.

  Rows of weight 0 are set to 0, so that whatever padding they hold (even
  inf or NaN) cannot reach a value or a gradient through the pairs they are
  part of (their pairs get weight 0 as well).
  """
  student = flat_embeddings('student_embeddings', student_embeddings)
  teacher = jax.lax.stop_gradient(
      flat_embeddings('teacher_embeddings', teacher_embeddings))
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(
        f'student_embeddings {jnp.shape(student_embeddings)} and '
        f'teacher_embeddings {jnp.shape(teacher_embeddings)} must have the '
        'same batch size.')
  if weights is None:
    return student, teacher, jnp.ones(student.shape[:1], student.dtype)
  weights = jnp.broadcast_to(
      jnp.asarray(weights, student.dtype), student.shape[:1])
  return (losses.mask_rows(student, weights),
          losses.mask_rows(teacher, weights), weights)


def sum_over_layers(pair_loss: Callable[[Array, Array], Array],
                    feature_pairs) -> tuple[Array, dict[str, Array]]:
  """`(sum of pair_loss(student, teacher) over the layer pairs, {})`.

  Raises:
    ValueError: no pairs, or `pair_loss`'s ValueError for a pair, prefixed
      with the pair's position (`'layer k: ...'`).
  """
  if not feature_pairs:
    raise ValueError('feature_pairs is empty; give at least one layer.')
  total = 0.0
  for layer, (student, teacher) in enumerate(feature_pairs):
    try:
      total += pair_loss(student, teacher)
    except ValueError as e:
      raise ValueError(f'layer {layer}: {e}') from e
  return total, {}


def flat(features: Array) -> Array:
  """`[B, ...]` -> `[B, D]`, trailing axes flattened."""
  return features.reshape((features.shape[0], -1))


def standardized(logits: ArrayLike, weights: ArrayLike | None) -> Array:
  """`losses.standardize_logits` of `[B, ..., K]` logits whose rows of weight
  0 are first set to 0 (so that padding, even NaN, reaches no gradient)."""
  return losses.standardize_logits(losses.mask_rows(logits, weights))


def logit_standardization_setting() -> objective.Setting:
  """The `logit_standardization` switch of a logit method (kd, dkd,
  multi_teacher): off by default, so results stay the method's own."""
  return objective.Setting(
      False, fields.boolean(),
      'Z-score each example\'s student and teacher logits over the classes '
      '(minus the mean, over the std + 1e-7) before the temperature: logit '
      'standardisation, Sun et al., CVPR 2024, whose CIFAR-100 setting has '
      'T = 2 and the KD weights times 9.')


def smaller_size(first: tuple[int, ...], second: tuple[int, ...]
                 ) -> tuple[int, int]:
  """The `(H, W)` two feature maps are compared at: the smaller of each.

  Args:
    first: `(H, W)` of one map.
    second: `(H', W')` of the other.

  Returns:
    `(min(H, H'), min(W, W'))`, the size the larger map is average-pooled to
    (RepDistiller's `adaptive_avg_pool2d` of the larger map, which is this
    pooling when the sizes divide).

  Raises:
    ValueError: sizes that are not whole multiples of their minimum.
  """
  if len(first) != 2 or len(second) != 2:
    raise ValueError(f'expected (H, W) sizes, got {tuple(first)} and '
                     f'{tuple(second)}')
  size = tuple(min(a, b) for a, b in zip(first, second))
  if any(a % m or b % m for a, b, m in zip(first, second, size)):
    raise ValueError(
        f'spatial sizes {tuple(first)} and {tuple(second)} must be equal, or '
        'each a whole multiple of the other (the larger is average-pooled)')
  return size


def average_pool_to(features: Array, size: tuple[int, ...]) -> Array:
  """`[B, H, W, C]` average-pooled to `[B, h, w, C]` (`H / h` and `W / w`
  whole, see `smaller_size`); unchanged if already that size."""
  b, height, width, c = features.shape
  h, w = size
  if (height, width) == (h, w):
    return features
  return features.reshape(b, h, height // h, w, width // w, c).mean((2, 4))


# --- Settings of feature methods. ---------------------------------------------


def layer_settings(student: str, teacher: str) -> dict[str, objective.Setting]:
  """`student_layers` and `teacher_layers` settings with these defaults.

  Layers are submodule names (e.g. conv2 of the seed CNNs) or names a model
  sows (block1, block2, embedding of bn_cnn; stage1..3, embedding of the
  ResNets), comma-separated. The teacher then runs inside every distil step
  (features cannot come from a logit cache).
  """
  return {
      'student_layers': objective.Setting(
          student, fields.layer_list('student'),
          'Student layers the term reads, comma-separated.'),
      'teacher_layers': objective.Setting(
          teacher, fields.layer_list('teacher'),
          'Teacher layers the term reads, comma-separated.'),
  }


def zoo_layer(name: str) -> Callable[[tuple[str, ...], tuple[str, ...]],
                                     dict[str, str]]:
  """A record's `zoo_settings`: the feature `name` (e.g. 'embedding',
  'stage2') of both networks of a CIFAR benchmark pair."""
  return lambda teacher, student: {'student_layers': name,
                                   'teacher_layers': name}


def zoo_shared_stages(teacher: tuple[str, ...], student: tuple[str, ...]
                      ) -> dict[str, str]:
  """A record's `zoo_settings`: every stage the two networks of a pair
  both have, from the first (RepDistiller zips `feat[1:-1]`)."""
  count = min(len(teacher), len(student)) - 2  # Without stem and embedding.
  names = ','.join(f'stage{k}' for k in range(1, count + 1))
  return {'student_layers': names, 'teacher_layers': names}


def paired_map_sizes(section: ml_collections.ConfigDict,
                     student_shapes, teacher_shapes) -> list[tuple[int, int]]:
  """The `(H, W)` each (student, teacher) layer pair of `section` is
  compared at (`smaller_size`), from the layers' shapes (batch axis
  dropped).

  Raises:
    ValueError: a layer that is not an `(H, W, C)` map, or a pair whose
      spatial sizes do not divide (the message names both layers).
  """
  sizes = []
  for s_layer, t_layer, s_shape, t_shape in zip(
      student_layers(section), teacher_layers(section), student_shapes,
      teacher_shapes, strict=True):
    try:
      if len(s_shape) != 3 or len(t_shape) != 3:
        raise ValueError('expected (H, W, C) feature maps')
      sizes.append(smaller_size(s_shape[:2], t_shape[:2]))
    except ValueError as e:
      raise ValueError(
          f'student layer {s_layer!r} {tuple(s_shape)} and teacher layer '
          f'{t_layer!r} {tuple(t_shape)}: {e}; choose layers of matching '
          'sizes') from e
  return sizes


def student_layers(section: ml_collections.ConfigDict) -> tuple[str, ...]:
  return fields.parse_list(section.student_layers)


def teacher_layers(section: ml_collections.ConfigDict) -> tuple[str, ...]:
  return fields.parse_list(section.teacher_layers)


def paired_layers_problems(name: str):
  """A `Method.check` that needs as many student as teacher layers."""
  def check(section: ml_collections.ConfigDict,
            flat_config: Mapping[str, Any]) -> list[str]:
    del flat_config
    counts = len(student_layers(section)), len(teacher_layers(section))
    if counts[0] != counts[1]:
      return [f'config.distill.{name}: {counts[0]} student and {counts[1]} '
              f'teacher layers; {name} pairs them in order, so give as many '
              'of each']
    return []
  return check


# --- Layers of the trainable modules methods add. -----------------------------


class BatchStatsNorm(nn.Module):
  """Batch normalisation with the batch's own statistics, always.

  PyTorch's `nn.BatchNorm2d` in training mode (the authors' connectors of
  ReviewKD and OFD): per channel (the last axis), over the batch and every
  position, `(x - mean) / sqrt(var + epsilon) * scale + bias` with the
  biased variance; `scale` starts at 1 and `bias` at 0 (its defaults).

  A method's module is applied with its parameters only (no mutable
  `batch_stats` collection) and only inside the training loss, never at
  evaluation, where PyTorch's running averages would be used: so there are
  none. Every row it is given enters the statistics (training batches are
  never padded: the last partial batch of an epoch is dropped).
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: ArrayLike) -> Array:
    """`[B, ..., C]` -> `[B, ..., C]`, normalised per channel."""
    x = losses.as_float(x)
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,),
                       jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    axes = tuple(range(x.ndim - 1))
    centred = x - jnp.mean(x, axis=axes, keepdims=True)
    variance = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    return centred * jax.lax.rsqrt(variance + self.epsilon) * scale + bias
