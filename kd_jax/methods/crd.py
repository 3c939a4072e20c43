"""Contrastive representation distillation (Tian et al., "Contrastive
Representation Distillation", ICLR 2020).

CRD maximises a lower bound of the mutual information between the
teacher's and the student's representations with noise-contrastive
estimation (NCE). Embedding heads (`CRDHeads`, a trained module the method
adds to the student: a linear map to `feat_dim` dimensions, then unit
length, one for each network) give `v_s` and `v_t`. A memory bank holds,
for every training example `i`, a student embedding `m_s[i]` and a teacher
embedding `m_t[i]` (`[N, feat_dim]` each). For an example `i` and its
contrast set `c = (i, n_1, ..., n_K)` (itself, then `K` negatives: other
training examples),

  h_s[k] = exp(<m_t[c_k], v_s> / T) / Z_s    (the student as anchor)
  h_t[k] = exp(<m_s[c_k], v_t> / T) / Z_t    (the teacher as anchor)

and each part's NCE loss (the paper's Eq. 18, the authors' `ContrastLoss`),
with the noise probability `P_n = 1 / N`,

  -log(h[0] / (h[0] + K P_n + eps)) - sum_{k >= 1} log(K P_n / (h[k] + K
  P_n + eps)),   eps = 1e-7,

averaged over the batch; the term is the student part plus the teacher
part. After each step the bank rows of the batch's examples move towards
the new embeddings: `m[i] <- normalise(momentum * m[i] + (1 - momentum) *
v)`.

This follows the authors' code (RepDistiller's `crd/`, also mdistiller's
`CRD`): `feat_dim` 128, `K` = 16384 negatives, `T` = 0.07, momentum 0.5;
the bank starts uniform in `+-1 / sqrt(feat_dim / 3)`; `Z_s`, `Z_t` are
fixed at the first step to the mean of that step's unnormalised `h` times
`N` (their `params[2:4]`); the negatives of an example are drawn without
replacement from the training examples of *other* classes (their
dataset's default `mode='exact'`; the positive is the example itself).
The heads read the penultimate features (RepDistiller's `feat[-1]`, the
zoo's `embedding`), flattened; the linear maps have PyTorch's default
initialisation. Weight 0.8 with CE at 1 (their `-r 1 -a 0 -b 0.8`); terms
`ce, crd` (add `kd` for CRD+KD).

The bank, `Z_s`, `Z_t` and the training labels are the term's memory
(`objective.Method.memory`): part of the train state, checkpointed with
it, so a resumed run continues bit-exactly; the negatives of a step are a
function of (seed, stage, step) (`batch['rng']`). The term needs each
example's position in the training split (`batch['index']`, which the
loop adds for a term with memory). The draw finds each row's `K`
smallest random keys without a sort, and the scores come from the
anchors' dot products with the whole bank where that is cheaper than
gathering `[B, K + 1, D]` rows (`contrast_indices`, `contrast_scores`;
`benchmarks/crd_step.py`). Differences from the authors' code:
where a class has fewer than `K` examples of other classes the authors
sample with replacement; here that is an error naming `nce_k` when the
distil stage starts (lower `nce_k`). Rows of weight 0 (padding) neither
enter the loss nor move the bank.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

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
from kd_jax.zoo import layers as zoo_layers

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Memory = dict[str, Array]

# The authors' eps of the NCE loss.
NCE_EPS = 1e-7
# `fold_in` of a step's key for the negatives.
_NEGATIVES_STREAM = 0x43524400


# --- The pieces, as pure functions. -------------------------------------------


def initial_memory(key: Array, labels: ArrayLike, feat_dim: int) -> Memory:
  """The bank before training: `'student'` and `'teacher'` `[N, feat_dim]`
  uniform in `+-1 / sqrt(feat_dim / 3)` (the authors'), `'normalizers'`
  `[2]` at -1 (not yet set) and `'labels'` `[N]` int32 (the training
  labels, for the negatives)."""
  labels = jnp.asarray(labels, jnp.int32)
  bound = 1.0 / math.sqrt(feat_dim / 3)
  student_key, teacher_key = jax.random.split(key)
  shape = (labels.shape[0], feat_dim)
  return {
      'student': jax.random.uniform(student_key, shape, jnp.float32, -bound,
                                    bound),
      'teacher': jax.random.uniform(teacher_key, shape, jnp.float32, -bound,
                                    bound),
      'normalizers': -jnp.ones(2, jnp.float32),
      'labels': labels,
  }


def fewest_negatives(labels: np.ndarray) -> int:
  """The fewest examples of other classes any example of `labels` ([N]) has:
  how many negatives can be drawn without replacement."""
  counts = np.bincount(np.asarray(labels))
  return int(len(labels) - counts[counts > 0].max())


def kth_smallest(keys: ArrayLike, k: int) -> Array:
  """`[B]` uint32: the `k`-th smallest (1-based) of each row of `keys`
  (`[B, N]` uint32, `1 <= k <= N`), built bit by bit from the top: the
  largest `t` with fewer than `k` keys below it. 32 compare-and-count passes
  over `keys`, where a sort or `top_k` of the row costs `O(N log N)`."""
  keys = jnp.asarray(keys, jnp.uint32)

  def set_bit_if_fewer(bit, threshold):
    candidate = threshold | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
    below = jnp.sum(keys < candidate[:, None], axis=1, dtype=jnp.int32)
    return jnp.where(below < k, candidate, threshold)

  return jax.lax.fori_loop(0, 32, set_bit_if_fewer,
                           jnp.zeros(keys.shape[:1], jnp.uint32))


def smallest_keys(keys: ArrayLike, k: int) -> Array:
  """`[B, N]` bool: exactly `k` true per row, at the row's `k` smallest
  `keys` (`[B, N]` uint32, `1 <= k <= N`); of keys tied with the `k`-th
  smallest, those at lower positions first."""
  keys = jnp.asarray(keys, jnp.uint32)
  threshold = kth_smallest(keys, k)[:, None]
  at_most = keys <= threshold

  def without_surplus_ties():
    below = keys < threshold
    tied = keys == threshold
    missing = k - jnp.sum(below, axis=1, keepdims=True, dtype=jnp.int32)
    return below | (tied & (_running_count(tied) <= missing))

  return jax.lax.cond(
      jnp.all(jnp.sum(at_most, axis=1, dtype=jnp.int32) == k),
      lambda: at_most, without_surplus_ties)


def contrast_indices(key: Array, index: ArrayLike, label: ArrayLike,
                     labels: ArrayLike, num_negatives: int) -> Array:
  """Each example's contrast set: itself, then negatives of other classes.

  Args:
    key: a PRNG key (one per step).
    index: `[B]` int: the examples' positions in the training split.
    label: `[B]` int: their labels.
    labels: `[N]` int: the labels of the whole training split.
    num_negatives: `K`, at most the fewest examples of other classes.

  Returns:
    `[B, K + 1]` int32: column 0 is `index`; columns 1..K are `K` distinct
    examples whose label differs from the row's, uniformly without
    replacement, in increasing order: each example of another class gets
    an independent random 31-bit key (same-class examples the largest
    key, 2^32 - 1) and those with the `K` smallest keys are drawn
    (`smallest_keys`; where another key ties with the `K`-th, about one
    row in `2^31 / N`, the lower position wins). `O(B N)` work: no sort.
  """
  num_data = jnp.shape(labels)[0]
  batch = jnp.shape(index)[0]
  bits = jax.random.bits(key, (batch, num_data), jnp.uint32)
  same_class = jnp.asarray(label)[:, None] == jnp.asarray(labels)[None, :]
  keys = jnp.where(same_class, jnp.uint32(0xFFFFFFFF), bits >> 1)
  chosen = smallest_keys(keys, num_negatives)
  # Each chosen position goes to column (how many chosen up to it) - 1.
  column = jnp.where(chosen, _running_count(chosen) - 1, num_negatives)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], column.shape)
  positions = jnp.broadcast_to(jnp.arange(num_data, dtype=jnp.int32),
                               column.shape)
  negatives = jnp.zeros((batch, num_negatives), jnp.int32).at[
      rows, column].set(positions, mode='drop', unique_indices=True)
  return jnp.concatenate([jnp.asarray(index, jnp.int32)[:, None], negatives],
                         axis=1)


def _running_count(flags: Array) -> Array:
  """`[B, N]` int32: the cumulative count of true `flags` along each row (an
  associative scan: XLA:CPU's `cumsum` is 2-3x slower at this size)."""
  return jax.lax.associative_scan(jnp.add, flags.astype(jnp.int32), axis=1)


# Up to this many bank rows per contrast row, `contrast_scores` multiplies
# the anchors by the whole bank and picks the contrast set's dot products:
# a `[B, N]` matmul is cheaper than gathering `[B, K + 1, D]` bank rows (on a
# CPU or a GPU) unless the bank is much larger than the contrast set.
WHOLE_BANK_RATIO = 8


def contrast_scores(bank: ArrayLike, contrast: ArrayLike, anchor: ArrayLike,
                    temperature: float) -> Array:
  """`[B, K + 1]` unnormalised `exp(<bank[contrast[b, k]], anchor[b]> / T)`.

  Args:
    bank: `[N, D]` memory rows (constants).
    contrast: `[B, K + 1]` int rows of `bank`.
    anchor: `[B, D]` embeddings.
    temperature: `T > 0`.

  The dot products come from `anchor @ bank.T` (`[B, N]`) where `N <=
  WHOLE_BANK_RATIO * (K + 1)`, else from the gathered rows; the two agree
  to float32 rounding.
  """
  bank = jax.lax.stop_gradient(jnp.asarray(bank))
  if bank.shape[0] <= WHOLE_BANK_RATIO * jnp.shape(contrast)[1]:
    dots = jnp.take_along_axis(
        jnp.einsum('nd,bd->bn', bank, anchor, precision=common.PRECISION),
        jnp.asarray(contrast), axis=1)
  else:
    dots = jnp.einsum('bkd,bd->bk', jnp.take(bank, contrast, axis=0), anchor,
                      precision=common.PRECISION)
  return jnp.exp(dots / temperature)


def nce_loss_per_example(probabilities: ArrayLike, num_data: int) -> Array:
  """`[B]` NCE loss of `[B, K + 1]` normalised scores, positive in column 0:
  `-log(h_0 / (h_0 + K / N + eps)) - sum_k log((K / N) / (h_k + K / N +
  eps))` (the authors' `ContrastLoss`, per example)."""
  probabilities = losses.as_float(probabilities)
  noise = (probabilities.shape[1] - 1) / num_data
  positive, negatives = probabilities[:, 0], probabilities[:, 1:]
  log_positive = jnp.log(positive / (positive + noise + NCE_EPS))
  log_negatives = jnp.log(noise / (negatives + noise + NCE_EPS))
  return -(log_positive + jnp.sum(log_negatives, axis=1))


def momentum_update(bank: ArrayLike, index: ArrayLike, embeddings: ArrayLike,
                    momentum: float, weights: ArrayLike | None = None
                    ) -> Array:
  """`bank` `[N, D]` with rows `index` (`[B]`, distinct) replaced by
  `normalise(momentum * bank[i] + (1 - momentum) * v)` for the embeddings
  `v` (`[B, D]`, constants); rows of weight 0 are left as they were."""
  bank = jnp.asarray(bank)
  old = bank[index]
  _, moved = common.norm_and_unit(
      momentum * old + (1 - momentum) * jax.lax.stop_gradient(embeddings))
  if weights is not None:
    moved = jnp.where((jnp.asarray(weights) > 0)[:, None], moved, old)
  return bank.at[index].set(moved)


def crd_loss(student_embedding: ArrayLike, teacher_embedding: ArrayLike,
             memory: Memory, index: ArrayLike, contrast: ArrayLike, *,
             temperature: float = 0.07, momentum: float = 0.5,
             weights: ArrayLike | None = None
             ) -> tuple[Array, dict[str, Array], Memory]:
  """The CRD loss of one batch and the memory after it.

  Args:
    student_embedding: `[B, D]` unit vectors `v_s` (the student's head).
    teacher_embedding: `[B, D]` unit vectors `v_t` (the teacher's head; it
      trains, the teacher network does not).
    memory: `initial_memory`'s structure, `N` rows.
    index: `[B]` int positions of the examples in the training split.
    contrast: `[B, K + 1]` int (`contrast_indices`).
    temperature: `T`.
    momentum: of the bank update.
    weights: `None` or `[B]` per-example weights; rows of weight 0 reach
      neither the value nor any gradient, and do not move the bank.

  Returns:
    `(loss, aux, new memory)`: the weighted batch means of the student and
    teacher parts summed; `aux` holds each part (`'student'`, `'teacher'`);
    the memory with the batch's rows moved and, at the first step, the
    normalisers `Z` set.
  """
  num_data = memory['student'].shape[0]
  student_embedding = losses.mask_rows(
      losses.as_float(student_embedding), weights)
  teacher_embedding = losses.mask_rows(
      losses.as_float(teacher_embedding), weights)
  row_weights = (jnp.ones(student_embedding.shape[:1]) if weights is None
                 else jnp.asarray(weights, jnp.float32))

  def part(scores, normalizer):
    mean = jnp.sum(jnp.mean(scores, axis=1) * row_weights) / jnp.maximum(
        jnp.sum(row_weights), 1.0)
    normalizer = jnp.where(normalizer < 0,
                           jax.lax.stop_gradient(mean) * num_data, normalizer)
    return losses.weighted_mean(
        nce_loss_per_example(scores / normalizer, num_data), weights), normalizer

  z = memory['normalizers']
  student_part, z_student = part(contrast_scores(
      memory['teacher'], contrast, student_embedding, temperature), z[0])
  teacher_part, z_teacher = part(contrast_scores(
      memory['student'], contrast, teacher_embedding, temperature), z[1])
  new_memory = {
      'student': momentum_update(memory['student'], index, student_embedding,
                                 momentum, weights),
      'teacher': momentum_update(memory['teacher'], index, teacher_embedding,
                                 momentum, weights),
      'normalizers': jax.lax.stop_gradient(jnp.stack([z_student, z_teacher])),
      'labels': memory['labels'],
  }
  return (student_part + teacher_part,
          {'student': student_part, 'teacher': teacher_part}, new_memory)


# --- The heads, the term and the record. --------------------------------------


class CRDHeads(nn.Module):
  """The embedding heads: per network, flatten -> linear to `feat_dim` ->
  unit length (the authors' `Embed`; PyTorch's default `nn.Linear`
  initialisation). Parameters `student_embed`, `teacher_embed`."""
  feat_dim: int = 128

  @nn.compact
  def __call__(self, student: Sequence[ArrayLike],
               teacher: Sequence[ArrayLike]) -> tuple[Array, Array]:
    """`([s (B, ...)], [t (B, ...)])` -> `(v_s (B, feat_dim), v_t (B,
    feat_dim))`."""
    embeddings = []
    for name, (features,) in (('student_embed', student),
                              ('teacher_embed', teacher)):
      x = common.flat(losses.as_float(features))
      x = nn.Dense(self.feat_dim, kernel_init=zoo_layers.TORCH_DEFAULT,
                   bias_init=zoo_layers.torch_bias_init(x.shape[-1]),
                   name=name)(x)
      embeddings.append(common.norm_and_unit(x)[1])
    return embeddings[0], embeddings[1]


def heads(section: ml_collections.ConfigDict,
          student_shapes: Sequence[tuple[int, ...]],
          teacher_shapes: Sequence[tuple[int, ...]]) -> CRDHeads:
  """The record's `module`: `CRDHeads` for one student and one teacher
  layer (any shapes; they are flattened)."""
  del student_shapes, teacher_shapes
  return CRDHeads(section.feat_dim)


def memory(section: ml_collections.ConfigDict, labels: np.ndarray,
           key: Array) -> Memory:
  """The record's `memory`: `initial_memory` for the training labels `[N]`.

  Raises:
    ValueError: `nce_k` more than the fewest examples of other classes.
  """
  available = fewest_negatives(labels)
  if section.nce_k > available:
    raise ValueError(
        f'nce_k = {section.nce_k} negatives, but some examples of the '
        f'training split ({len(labels)} examples) have only {available} '
        'examples of other classes to draw from without replacement; lower '
        'nce_k')
  return initial_memory(key, labels, section.feat_dim)


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  settings = (section.nce_k, section.nce_t, section.nce_m)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    del teacher  # The teacher's head is the module's second output.
    num_negatives, temperature, momentum = settings
    state = batch['memory']['crd']
    contrast = contrast_indices(
        jax.random.fold_in(batch['rng'], _NEGATIVES_STREAM), batch['index'],
        batch['label'], state['labels'], num_negatives)
    student_embedding, teacher_embedding = student.modules['crd']
    loss, aux, new_memory = crd_loss(
        student_embedding, teacher_embedding, state, batch['index'], contrast,
        temperature=temperature, momentum=momentum,
        weights=objective.batch_weights(batch))
    return loss, {**aux, objective.NEW_MEMORY: new_memory}
  return term


def _problems(section: ml_collections.ConfigDict,
              flat: Mapping[str, Any]) -> list[str]:
  del flat
  problems = []
  for role in ('student', 'teacher'):
    layers = fields.parse_list(section[f'{role}_layers'])
    if len(layers) != 1:
      problems.append(
          f'config.distill.crd.{role}_layers = {section[f"{role}_layers"]!r}: '
          'CRD reads exactly one layer of each network (the penultimate '
          'features)')
  return problems


METHOD = objective.Method(
    name='crd',
    reference='Tian et al., ICLR 2020',
    description='the penultimate representation, by noise-contrastive '
                'estimation against a memory bank of both networks\' '
                'embeddings of every training example',
    settings={
        # RepDistiller's `-b 0.8` with `-r 1` (CE) and `-a 0` (no KD).
        'weight': objective.term_weight(0.8),
        # The seed CNNs' last feature maps (flattened by the heads).
        **common.layer_settings('conv2', 'conv2'),
        'feat_dim': objective.Setting(
            128, fields.int_at_least(1),
            'Dimension of the embedding heads\' unit vectors (and of the '
            'memory bank rows). Integer >= 1.'),
        'nce_k': objective.Setting(
            16384, fields.int_at_least(1),
            'Negatives per example, drawn without replacement from the '
            'training examples of other classes. Integer >= 1.'),
        'nce_t': objective.Setting(
            0.07, fields.positive_float(),
            'Temperature of the contrast scores exp(<m, v> / T). Number > 0.'),
        'nce_m': objective.Setting(
            0.5, fields.float_in(0.0, 1.0),
            'Momentum of the memory bank update m <- normalise(momentum * m '
            '+ (1 - momentum) * v). Number in [0, 1].'),
    },
    loss=_term,
    terms=(ce.TERM.name, 'crd'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=heads,
    module_reads_teacher=True,
    memory=memory,
    check=_problems,
    zoo_settings=common.zoo_layer('embedding'),
)
