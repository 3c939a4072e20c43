"""Batches of an in-memory split, the same shapes every step.

Batches are dicts of numpy arrays, `{'image', 'label'}` for training and
`{'image', 'label', 'mask'}` for evaluation, with the same shapes every step so
that a jitted step compiles once. The order of an epoch is a function of the
seed and the epoch alone, so that a resumed run sees the batches it would have.
Callers know these functions as `kd_jax.data.<name>`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np

from kd_jax import errors
from kd_jax.errors import DataError


class InMemorySplit(Protocol):
  """What batching needs of a split (`data.Split` is one).

  Attributes:
    images: (N, H, W, C) float32.
    labels: (N,) int32.
    num_examples: N.
  """

  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    ...


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in one epoch: a function of (seed, epoch) only.

  Args:
    seed: >= 0.
    epoch: >= 0.
    num_examples: N.

  Returns:
    (N,) int64: a permutation of range(N).
  """
  if seed < 0 or epoch < 0:
    raise errors.UserInputError(
        f'seed and epoch must be >= 0, got seed={seed}, epoch={epoch}')
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def num_train_batches(num_examples: int, batch_size: int) -> int:
  """Full batches per training epoch (the remainder is dropped)."""
  _check_batch_size(batch_size)
  return num_examples // batch_size


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Batches covering every example once (the last one padded)."""
  _check_batch_size(batch_size)
  return -(-num_examples // batch_size)


def _check_batch_size(batch_size: int) -> None:
  if batch_size < 1:
    raise errors.UserInputError(f'batch_size must be >= 1, got {batch_size}')


def epoch_batch_indices(seed: int, epoch: int, num_examples: int,
                        batch_size: int) -> np.ndarray:
  """Which examples make up each training batch of one epoch.

  Args:
    seed: shuffling seed.
    epoch: epoch number.
    num_examples: N.
    batch_size: B, at most N.

  Returns:
    `(N // B, B)` int32: row i holds the indices of batch i, taken in order
    from `epoch_permutation(seed, epoch, N)`; the remainder is dropped.
  """
  num_batches = num_train_batches(num_examples, batch_size)
  if not num_batches:
    raise DataError(f'The training split has {num_examples} examples, '
                    f'fewer than one batch of {batch_size}; lower batch_size '
                    'or raise train_limit')
  order = epoch_permutation(seed, epoch, num_examples)
  return order[:num_batches * batch_size].reshape(
      num_batches, batch_size).astype(np.int32)


def train_batches(split: InMemorySplit, batch_size: int, *, seed: int,
                  epoch: int, start_batch: int = 0,
                  extras: Mapping[str, np.ndarray] | None = None,
                  rows: slice = slice(None)
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One shuffled training epoch of full batches; the remainder is dropped.

  Args:
    split: the training split (N examples).
    batch_size: B, at most N.
    seed: shuffling seed; batch i is `epoch_batch_indices(seed, epoch, N,
      B)[i]`.
    epoch: epoch number.
    start_batch: skip this many batches, to resume an epoch part-way.
    extras: more per-example arrays with N rows (e.g. `'teacher_logits'`
      `(N, K)`), batched alongside the images under their own keys.
    rows: which rows of every batch to read (a process's share of a global
      batch, `parallel.local_rows`); all by default.

  Yields:
    {'image': (R, H, W, C) float32, 'label': (R,) int32, **extras batched},
    R = B with all rows; each example at most once per epoch.
  """
  if start_batch < 0:
    raise errors.UserInputError(f'start_batch must be >= 0, got {start_batch}')
  batches = epoch_batch_indices(seed, epoch, split.num_examples, batch_size)
  arrays = {'image': split.images, 'label': split.labels, **(extras or {})}
  for indices in batches[start_batch:, rows]:
    yield {key: array[indices] for key, array in arrays.items()}


def eval_batches(split: InMemorySplit,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order, in batches of one shape.

  Args:
    split: N examples.
    batch_size: B.

  Yields:
    {'image': (B, H, W, C) float32, 'label': (B,) int32, 'mask': (B,) float32}.
    `mask` is 1 for real examples and 0 for the zero padding that fills the
    last batch when B does not divide N.
  """
  _check_batch_size(batch_size)
  for start in range(0, split.num_examples, batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(labels) < batch_size:
      mask[len(labels):] = 0
      images = pad_to(images, batch_size)
      labels = pad_to(labels, batch_size)
    yield {'image': images, 'label': labels, 'mask': mask}


def pad_to(array: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads `array` along axis 0 to `size` rows.

  Args:
    array: (n, ...) with n <= size.
    size: S.

  Returns:
    (S, ...) of `array`'s dtype: `array`, then zeros.
  """
  padded = np.zeros((size,) + array.shape[1:], array.dtype)
  padded[:len(array)] = array
  return padded
