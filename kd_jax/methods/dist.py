"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022): Pearson correlations of the tempered class probabilities.

Exact match of the probabilities (KL) is relaxed to a match of their
relations: the inter-class relation is `1 - ` the mean Pearson correlation
between the student's and the teacher's `softmax(z / T)` row of each
example, the intra-class relation the same over the columns (each class's
probabilities across the batch). The term is `T^2 * (beta * inter + gamma *
intra)`; it reads logits only, so the teacher's logits may be cached. With
the labels' cross-entropy (weight 1, as in the paper) the terms are `ce,
dist`.

Defaults are the official CIFAR-100 setting (hunto/image_classification_sota,
`configs/strategies/distill/dist_cifar.yaml`: `kd: dist_t4`, i.e. the loss
with beta = gamma = 1 and tau = 4, times `kd_loss_weight: 2.`, plus the CE at
`ori_loss_weight: 1.`), written here as beta = gamma = 2, T = 4 and a term
weight of 1: the same objective. (Its ImageNet setting, `resnet_dist.yaml`,
is `kd: dist`, tau = 1, with the same weight 2.) mdistiller-based copies of
the loss (e.g. `mdistiller/distillers/DIST.py` of ZaberKo/GDKD) compute the
same `T^2 * (beta * inter + gamma * intra)`.
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


def pearson_correlation(x: Array, y: Array,
                        weights: Array | None = None) -> Array:
  """Pearson correlation of `x` and `y` over their last axis.

  `corr = <x - mean(x), y - mean(y)> / (||x - mean(x)|| ||y - mean(y)||)`,
  each mean and inner product weighted by `weights` when given. A constant
  `x` or `y` (zero after centring) has correlation 0, with finite
  gradients; the official code divides by `norms + 1e-8`, which gives 0
  there too and otherwise differs by that 1e-8.

  Args:
    x: `[..., N]`.
    y: `[..., N]`.
    weights: `None` or `[N]` non-negative weights of the `N` entries.

  Returns:
    `[...]` correlations in `[-1, 1]`.
  """
  if weights is None:
    weights = jnp.ones(x.shape[-1:], x.dtype)
  total = jnp.sum(weights)
  safe_total = jnp.where(total > 0, total, 1.0)
  root = jnp.sqrt(weights)

  def unit(v):
    mean = jnp.sum(v * weights, axis=-1, keepdims=True) / safe_total
    _, u = common.norm_and_unit((v - mean) * root)
    return u

  return jnp.sum(unit(x) * unit(y), axis=-1)


def dist_loss(student_logits: ArrayLike,
              teacher_logits: ArrayLike,
              *,
              temperature: Scalar = 4.0,
              beta: Scalar = 2.0,
              gamma: Scalar = 2.0,
              weights: ArrayLike | None = None
              ) -> tuple[Array, dict[str, Array]]:
  """DIST: `T^2 * (beta * inter + gamma * intra)`.

  With `Y = softmax(Z / T)` row-wise (`[B, K]`), and `rho` the Pearson
  correlation:

  * inter `= 1 - (1/B) sum_i rho(Y_s[i, :], Y_t[i, :])` (each example's
    class distribution; the paper's inter-class relation);
  * intra `= 1 - (1/K) sum_k rho(Y_s[:, k], Y_t[:, k])` (each class's
    probabilities over the batch; the paper's intra-class relation).

  Args:
    student_logits: `[B, K]`, `K >= 2`.
    teacher_logits: `[B, K]`, under `stop_gradient`.
    temperature: `T > 0`.
    beta: weight >= 0 of the inter-class relation.
    gamma: weight >= 0 of the intra-class relation.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask): the
      weight of example `i` in the mean over rows and in each column's
      correlation (mean and inner products); rows of weight 0 reach neither
      the value nor any gradient.

  Returns:
    `(loss, aux)`: the scalar loss (0 when the student's probabilities
    equal the teacher's), and `aux` with `'inter'` and `'intra'`, each times
    `T^2` (so `loss = beta * aux['inter'] + gamma * aux['intra']`). With one
    example the columns are constant and intra is `T^2`, without gradient,
    as in the official code.

  Raises:
    ValueError: logits of different shapes, not `[B, K]` with `K >= 2`, or
      a Python `temperature` <= 0 or weight < 0.
  """
  common.check_same_shape('student_logits', student_logits,
                          'teacher_logits', teacher_logits)
  shape = jnp.shape(student_logits)
  if len(shape) != 2 or shape[-1] < 2:
    raise ValueError(
        f'DIST needs logits [B, K] with K >= 2, got shape {shape}.')
  common.check_non_negative('beta', beta)
  common.check_non_negative('gamma', gamma)
  student = losses.tempered_softmax(
      losses.mask_rows(student_logits, weights), temperature)
  teacher = jax.lax.stop_gradient(losses.tempered_softmax(
      losses.mask_rows(teacher_logits, weights), temperature))
  if weights is None:
    weights = jnp.ones(shape[:1], student.dtype)
  weights = jnp.broadcast_to(jnp.asarray(weights, student.dtype), shape[:1])
  inter = losses.weighted_mean(
      1.0 - pearson_correlation(student, teacher), weights)
  intra = jnp.mean(1.0 - pearson_correlation(student.T, teacher.T, weights))
  scale = temperature**2
  inter, intra = scale * inter, scale * intra
  return beta * inter + gamma * intra, {'inter': inter, 'intra': intra}


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  settings = dict(temperature=section.temperature, beta=section.beta,
                  gamma=section.gamma)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    return dist_loss(student.logits, teacher.logits,
                     weights=objective.batch_weights(batch), **settings)
  return term


METHOD = objective.Method(
    name='dist',
    reference='Huang et al., NeurIPS 2022',
    description='Pearson correlations of the tempered class probabilities, '
                'per example and per class',
    settings={
        # The official CIFAR-100 objective is CE + 2 * DIST(beta=1, gamma=1,
        # tau=4) (dist_cifar.yaml); the 2 is folded into beta and gamma.
        'weight': objective.term_weight(1.0),
        'beta': objective.Setting(
            2.0, fields.non_negative_float(),
            'Weight of the inter-class relation (per example, over the '
            'classes); the paper\'s beta. Number >= 0.'),
        'gamma': objective.Setting(
            2.0, fields.non_negative_float(),
            'Weight of the intra-class relation (per class, over the batch); '
            'the paper\'s gamma. Number >= 0.'),
        'temperature': objective.Setting(
            4.0, fields.positive_float(),
            'Softmax temperature T (tau); the loss is scaled by T**2. '
            'Number > 0.'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'dist'),
)
