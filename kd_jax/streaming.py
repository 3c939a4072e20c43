"""Splits streamed from disk through grain, for datasets too large for memory.

A `StreamingSplit` plays the role of `data.Split` without holding the images:
its batches are read on demand from a random-access source (see `sources`:
`IdxSource` over uncompressed IDX files, or `ArraySource`/`SubsetSource`) by a
grain pipeline whose threads read ahead while the model computes. Batch i of an
epoch holds exactly the examples of `data.train_batches`' batch i, converted
to float32 the same way, so training is identical whichever path feeds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import dataclasses
import functools
import os
from typing import TYPE_CHECKING

import numpy as np

from kd_jax import batching
from kd_jax import data
from kd_jax import errors
from kd_jax import idx
from kd_jax import parallel
from kd_jax import tfds_io
# Callers also use these as kd_jax.streaming.<name>.
# pylint: disable=g-importing-member
from kd_jax.sources import ArraySource
from kd_jax.sources import Batch
from kd_jax.sources import IdxSource
from kd_jax.sources import prepare_idx_dir
from kd_jax.sources import Source
from kd_jax.sources import SubsetSource
from kd_jax.sources import TfdsSource
# pylint: enable=g-importing-member

if TYPE_CHECKING:
  import grain  # pylint: disable=g-bad-import-order


# --------------------------------------------------------- validation subset


def split_indices(n: int, size: int, *, name: str = 'the dataset'
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The examples `data.hold_out_validation` keeps and holds out, in order.

  Args:
    n: training examples, N.
    size: held out, 0 <= size < N.
    name: the dataset's name, for the message.

  Returns:
    `((N - size,) training, (size,) validation)` int64 indices, each in
    increasing order.

  Raises:
    DataError: `size` out of range.
  """
  held_out = data.held_out_mask(n, size, name=name)
  return np.flatnonzero(~held_out), np.flatnonzero(held_out)


# ---------------------------------------------------------------- the split


def _to_float(images: np.ndarray) -> np.ndarray:
  """(n, H, W, C) float32 in [0, 1], exactly as `data.load_dataset` converts
  (float32 images, already converted, pass through)."""
  return data.unit_float(images) if images.dtype == np.uint8 else images


def _train_batch(source: Source, extras: Mapping[str, np.ndarray],
                 indices: np.ndarray) -> Batch:
  """Examples `indices` (b,): {'image': (b, H, W, C) float32, 'label': (b,)
  int32, **extras rows}."""
  batch = source.read(indices)
  return {'image': _to_float(batch['image']), 'label': batch['label'],
          **{key: array[indices] for key, array in extras.items()}}


def _eval_batch(source: Source, batch_size: int, share: slice,
                batch: int) -> Batch:
  """This process' share of eval batch `batch`, zero-padded past the end.

  Returns:
    {'image': (b, H, W, C) float32, 'label': (b,) int32, 'mask': (b,)
    float32}, b = share's length; mask 0 marks padding.
  """
  positions = batch * batch_size + np.arange(share.start, share.stop)
  mask = (positions < len(source)).astype(np.float32)
  real = source.read(positions[positions < len(source)])
  return {'image': batching.pad_to(_to_float(real['image']), len(positions)),
          'label': batching.pad_to(real['label'], len(positions)),
          'mask': mask}


def _grain():
  # Imported on first use: grain adds 0.5 s to the start of every command,
  # and only streamed splits need it.
  import grain  # pylint: disable=g-import-not-at-top
  return grain


def _stream(dataset: grain.MapDataset, num_threads: int,
            prefetch: int) -> Iterator[Batch]:
  """`dataset`'s elements in order, read ahead by `num_threads` threads."""
  grain = _grain()
  iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch)))
  try:
    yield from iterator
  finally:
    iterator.close()


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingSplit:
  """A split read from `source` batch by batch; never held in memory.

  Attributes:
    source: N examples (see `Source`).
  """

  source: Source

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @classmethod
  def from_split(cls, split: data.Split) -> StreamingSplit:
    """Streams an in-memory split (its arrays are not copied)."""
    return cls(ArraySource(split.images, split.labels))

  def train_batches(self, batch_size: int, *, seed: int, epoch: int,
                    start_batch: int = 0, process_index: int = 0,
                    process_count: int = 1,
                    extras: Mapping[str, np.ndarray] | None = None,
                    num_threads: int = 2, prefetch: int = 4
                    ) -> Iterator[Batch]:
    """One shuffled epoch, batch for batch as `data.train_batches`.

    Global batch i holds the examples `data.epoch_batch_indices(seed, epoch,
    N, batch_size)[i]`; this process reads its contiguous share, positions
    `[p * b, (p + 1) * b)` with b = batch_size / process_count.

    Args:
      batch_size: B, the global batch, at most N.
      seed: shuffling seed.
      epoch: epoch number.
      start_batch: skip this many batches, to resume an epoch part-way.
      process_index: p, this process.
      process_count: P, processes sharing each batch; must divide B.
      extras: more in-memory per-example arrays with N rows (e.g.
        `'teacher_logits'` (N, K)), batched alongside under their own keys.
      num_threads: grain threads reading batches ahead; 0 reads each batch
        when it is asked for (on a CPU-only host with few cores, where the
        threads compete with XLA's, measured a little faster: see
        benchmarks/streaming.py).
      prefetch: batches read ahead.

    Returns:
      An iterator of {'image': (b, H, W, C) float32 in [0, 1], 'label': (b,)
      int32, **extras batched}.

    Raises:
      UserInputError: bad start_batch, process index or count, or B not
        divisible by P (raised here, not at the first batch).
    """
    if start_batch < 0:
      raise errors.UserInputError(
          f'start_batch must be >= 0, got {start_batch}')
    share = parallel.process_rows(batch_size, process_index, process_count)
    rows = batching.epoch_batch_indices(seed, epoch, self.num_examples,
                                        batch_size)[start_batch:, share]
    read = functools.partial(_train_batch, self.source, dict(extras or {}))
    return _stream(_grain().MapDataset.source(rows).map(read), num_threads,
                   prefetch)

  def head(self, limit: int | None) -> StreamingSplit:
    """The first `limit` examples (all for None or 0), as
    `data.load_dataset`'s train_limit / test_limit take them."""
    if not limit or limit >= self.num_examples:
      return self
    return StreamingSplit(SubsetSource(self.source, np.arange(limit)))

  def load(self) -> data.Split:
    """Reads the whole split into memory: `data.Split` of N examples, the
    same arrays as `data.load_dataset` gives (for the small evaluation
    splits of a streamed dataset)."""
    batch = self.source.read(np.arange(self.num_examples))
    return data.Split(_to_float(batch['image']), batch['label'])

  def eval_batches(self, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1, num_threads: int = 2,
                   prefetch: int = 4) -> Iterator[Batch]:
    """Every example once, in order, as `data.eval_batches`.

    Args:
      batch_size: B, the global batch.
      process_index: p, this process.
      process_count: P, processes sharing each batch; must divide B.
      num_threads: grain threads reading batches ahead.
      prefetch: batches read ahead.

    Returns:
      An iterator of {'image': (b, H, W, C) float32, 'label': (b,) int32,
      'mask': (b,) float32} with b = B / P: this process' share of each
      global batch, the last global batch zero-padded with mask 0.
    """
    share = parallel.process_rows(batch_size, process_index, process_count)
    num_batches = batching.num_eval_batches(self.num_examples, batch_size)
    read = functools.partial(_eval_batch, self.source, batch_size, share)
    return _stream(_grain().MapDataset.range(num_batches).map(read),
                   num_threads, prefetch)


# ------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingDataset:
  """A dataset's splits as `StreamingSplit`s; the fields of `data.Dataset`."""

  name: str
  train: StreamingSplit
  test: StreamingSplit
  num_classes: int
  source: str
  validation: StreamingSplit | None = None


def _idx_directory(info: data.DatasetInfo, data_dir: str | None) -> str:
  """The IDX directory `data.load_dataset(source='idx')` would read."""
  if data_dir:
    directory = os.path.expanduser(data_dir)
    if not os.path.isdir(directory):
      raise data.DataError(f'data_dir {directory} is not a directory; it must '
                           'hold the IDX files of data.IDX_FILES (each may be '
                           '.gz)')
    return directory
  return data.known_idx_dir(info)


def _open_idx_split(directory: str, split: str,
                    info: data.DatasetInfo) -> IdxSource:
  """The checked source of `split` ('train' or 'test') in `directory`."""
  images_name, labels_name = idx.IDX_FILES[split]
  source = IdxSource(os.path.join(directory, images_name),
                     os.path.join(directory, labels_name))
  if source.image_shape != info.image_shape:
    raise data.DataError(
        f'{source.images_path}: expected {info.title} images of shape '
        f'(N, {", ".join(map(str, info.image_shape))}), got '
        f'(N, {", ".join(map(str, source.image_shape))})')
  if not len(source):
    raise data.DataError(f'{source.labels_path}: holds no examples')
  source.check_labels(info.num_classes, info.title)
  return source


def _open_tfds_splits(info: data.DatasetInfo, data_dir: str | None
                      ) -> tuple[dict[str, TfdsSource], str]:
  """Both splits of TFDS data in array_record files, prepared if needed."""
  tfds = tfds_io.import_tfds()
  data_dir = data_dir or tfds_io.tfds_data_dir()
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    tfds_io.prepare_tfds(builder, info.tfds_name)
  where = f"TFDS '{info.tfds_name}' in {data_dir}"
  stored_as = tfds_io.file_format(builder)
  if stored_as != 'array_record':
    raise data.DataError(
        f'{where} is stored as {stored_as}; streaming needs random access, '
        "i.e. array_record files (prepare it with file_format='array_record')")
  features = builder.info.features
  found = (tuple(features['image'].shape), features['label'].num_classes)
  if found != (info.image_shape, info.num_classes):
    raise data.DataError(
        f'{where}: expected images of shape {info.image_shape} and '
        f'{info.num_classes} classes, found {found[0]} and {found[1]}')
  splits = {split: TfdsSource(builder.as_data_source(split=split),
                              info.image_shape, f"{where}, split '{split}'")
            for split in idx.IDX_FILES}
  return splits, f'TFDS {info.tfds_name} (data_dir={data_dir})'


def _open_idx_splits(info: data.DatasetInfo, data_dir: str | None,
                     cache_dir: str) -> tuple[dict[str, IdxSource], str]:
  """Both splits from IDX files, gzipped ones decompressed into `cache_dir`."""
  directory = prepare_idx_dir(_idx_directory(info, data_dir),
                              os.path.expanduser(cache_dir))
  splits = {split: _open_idx_split(directory, split, info)
            for split in idx.IDX_FILES}
  return splits, f'IDX files in {directory}'


STREAMING_SOURCES = ('idx', 'tfds')
DEFAULT_CACHE_DIR = '~/.cache/kd_jax/idx'


def load_streaming_dataset(name: str, *, data_dir: str | None = None,
                           cache_dir: str = DEFAULT_CACHE_DIR,
                           validation_size: int = 0,
                           source: str = 'idx',
                           train_limit: int | None = None,
                           test_limit: int | None = None
                           ) -> StreamingDataset:
  """Opens a dataset for streaming, found as `data.load_dataset` finds it.

  Sources:
    'idx': the four IDX files in `data_dir`, or else in the first of the
      dataset's known directories that has them; gzipped files are first
      decompressed into `cache_dir` (once; see `prepare_idx_dir`).
    'tfds': TFDS array_record data in `data_dir` (TFDS's data_dir),
      downloaded and prepared if needed (needs TensorFlow and a network).

  Args:
    name: a key of `data.DATASETS`.
    data_dir: the IDX directory ('idx') or TFDS's data_dir ('tfds'); None
      for the defaults above.
    cache_dir: where gzipped IDX files are decompressed ('idx' only).
    validation_size: training examples held out as `validation`, the same
      ones as `data.hold_out_validation`'s; 0 for none.
    source: 'idx' or 'tfds'.
    train_limit: use only the first N training examples (before the
      validation hold-out, as `data.load_dataset`); None = all.
    test_limit: likewise for the test split.

  Returns:
    A StreamingDataset whose splits yield (B, H, W, C) float32 images and
    (B,) int32 labels.

  Raises:
    DataError: unknown name or source, files missing or malformed (naming
      the file), labels out of range, or validation_size out of range.
  """
  if name not in data.DATASETS:
    raise data.DataError(f'Unknown dataset {name!r}; known datasets: '
                         f'{", ".join(sorted(data.DATASETS))}')
  if source not in STREAMING_SOURCES:
    raise data.DataError(f'Unknown streaming source {source!r}; expected one '
                         f'of {", ".join(STREAMING_SOURCES)}')
  data.check_limit('train_limit', train_limit)
  data.check_limit('test_limit', test_limit)
  info = data.DATASETS[name]
  if source == 'tfds':
    splits, description = _open_tfds_splits(info, data_dir)
  else:
    splits, description = _open_idx_splits(info, data_dir, cache_dir)
  train = StreamingSplit(splits['train']).head(train_limit).source
  training, held_out = split_indices(len(train), validation_size, name=name)
  validation = None
  if validation_size:
    validation = StreamingSplit(SubsetSource(train, held_out))
    train = SubsetSource(train, training)
  return StreamingDataset(
      name=name, train=StreamingSplit(train),
      test=StreamingSplit(splits['test']).head(test_limit),
      num_classes=info.num_classes,
      source=description, validation=validation)
