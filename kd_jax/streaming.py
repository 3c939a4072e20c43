"""Splits streamed from disk through grain, for datasets too large for memory.

A `StreamingSplit` plays the role of `data.Split` without holding the images:
its batches are read on demand from a random-access source (`IdxSource` over
uncompressed IDX files, or `ArraySource`/`SubsetSource`) by a grain pipeline
whose threads read ahead while the model computes. Batch i of an epoch holds
exactly the examples of `data.train_batches`' batch i, converted to float32
the same way, so training is identical whichever path feeds it.

IDX files are read with `os.pread`, not a memory map: recent Linux kernels map
whole large page-cache folios (up to 2 MiB) for each 784-byte image touched
through a map, so random reads grow the process's RSS towards the file's size
(here, 512 random images of a 470 MB file: 400 MB). Reading just the rows
keeps memory flat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import gzip
import hashlib
import math
import os
import shutil
import struct
import tempfile
from typing import Any, Protocol
import weakref
import zlib

import grain
import numpy as np

from kd_jax import data
from kd_jax import errors
from kd_jax import parallel

# This module shares kd_jax.data's private helpers for finding IDX files and
# preparing TFDS data, so that both paths find and report data alike.
# pylint: disable=protected-access

Batch = dict[str, np.ndarray]

_IDX_UINT8 = 0x08
_LABEL_SCAN_BYTES = 1 << 20
_COPY_BUFFER_BYTES = 1 << 20


class Source(Protocol):
  """A random-access source of examples (grain's RandomAccessDataSource).

  `read(indices)` returns `{'image': (n, H, W, C) uint8 or float32 in [0, 1],
  'label': (n,) int32}` for the examples at `indices` (n,) in that order;
  `source[i]` is one such record without the leading axis.
  """

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Batch:
    ...

  def read(self, indices: np.ndarray) -> Batch:
    ...


class _RecordsFromRead:
  """`__getitem__` for sources that define `__len__` and a batched `read`."""

  def __getitem__(self, index: int) -> Batch:
    """One record: {'image': (H, W, C), 'label': () int32}."""
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} examples')
    batch = self.read(np.array([index % len(self)]))
    return {key: value[0] for key, value in batch.items()}


def _check_indices(indices: np.ndarray, size: int) -> np.ndarray:
  """`indices` as (n,) int64, checked to lie in [0, size)."""
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= size):
    raise IndexError(f'indices {indices.min()}..{indices.max()} out of range '
                     f'for {size} examples')
  return indices


# ------------------------------------------------------------------- sources


class ArraySource(_RecordsFromRead):
  """In-memory arrays as a source.

  Attributes:
    images: (N, H, W, C) uint8 pixels, or float32 in [0, 1].
    labels: (N,) integers.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype not in (np.uint8, np.float32):
      raise data.DataError(
          'ArraySource images must be (N, H, W, C) uint8 or float32, got '
          f'{images.shape} {images.dtype}')
    if labels.shape != images.shape[:1]:
      raise data.DataError(f'ArraySource has {len(images)} images but labels '
                           f'of shape {labels.shape}')
    self.images, self.labels = images, labels

  def __repr__(self) -> str:
    return f'ArraySource({len(self)} examples)'

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> Batch:
    """Examples `indices` (n,): {'image': (n, H, W, C), 'label': (n,) int32}."""
    indices = _check_indices(indices, len(self))
    return {'image': self.images[indices],
            'label': self.labels[indices].astype(np.int32)}


class SubsetSource(_RecordsFromRead):
  """Examples `indices` of another source, as a source of their own.

  Attributes:
    source: the source viewed.
    indices: (M,) int64; record i is `source[indices[i]]`.
  """

  def __init__(self, source: Source, indices: np.ndarray):
    self.source = source
    self.indices = _check_indices(indices, len(source))

  def __repr__(self) -> str:
    return f'SubsetSource({self.source!r}, {len(self)} examples)'

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, indices: np.ndarray) -> Batch:
    """Examples `indices` (n,) of the subset, as `Source.read`."""
    return self.source.read(self.indices[_check_indices(indices, len(self))])


def _idx_header(path: str, ndims: tuple[int, ...],
                what: str) -> tuple[tuple[int, ...], int]:
  """Reads and checks the header of an uncompressed uint8 IDX file.

  Args:
    path: the file.
    ndims: the numbers of dimensions accepted.
    what: what the file should hold, e.g. 'images', for messages.

  Returns:
    (shape, header size in bytes); the file's size matches them.

  Raises:
    DataError: unreadable, gzip-compressed, not a uint8 IDX file with one of
      `ndims` dimensions, or of the wrong size, naming the file.
  """
  try:
    with open(path, 'rb') as f:
      magic = f.read(4)
      ndim = magic[3] if len(magic) == 4 else 0
      dims = f.read(4 * ndim)
      size = os.fstat(f.fileno()).st_size
  except OSError as e:
    raise data.DataError(f'{path}: cannot read: {e.strerror or e}') from e
  if magic[:2] == data._GZIP_MAGIC:
    raise data.DataError(
        f'{path}: is gzip-compressed; streaming needs uncompressed IDX files '
        '(streaming.prepare_idx_dir decompresses them into a cache)')
  if len(magic) < 4 or magic[:3] != bytes([0, 0, _IDX_UINT8]) or (
      ndim not in ndims):
    expected = ' or '.join(f'0x000008{n:02x}' for n in ndims)
    raise data.DataError(
        f'{path}: not an IDX file of uint8 {what}: magic number '
        f'0x{magic.hex()}, expected {expected} (uint8, {ndims} dims)')
  if len(dims) < 4 * ndim:
    raise data.DataError(f'{path}: truncated IDX file: {size} bytes, shorter '
                         f'than its {4 + 4 * ndim}-byte header')
  shape = struct.unpack(f'>{ndim}I', dims)
  header_size = 4 + 4 * ndim
  if size != header_size + math.prod(shape):
    problem = 'truncated' if size < header_size + math.prod(shape) else (
        'over-long')
    raise data.DataError(
        f'{path}: {problem} IDX file: {size} bytes, but its header says shape '
        f'{shape} of uint8, which is {header_size + math.prod(shape)} bytes')
  return shape, header_size


def _open_for_reads(owner: Any, path: str) -> int:
  """A read-only descriptor of `path`, closed when `owner` is collected."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError as e:
    raise data.DataError(f'{path}: cannot read: {e.strerror or e}') from e
  weakref.finalize(owner, os.close, fd)
  return fd


def _pread_rows(fd: int, offset: int, row_bytes: int, indices: np.ndarray,
                path: str) -> np.ndarray:
  """Rows `indices` (n,) of a file of fixed-size rows, as (n, row_bytes) uint8.

  A run of consecutive indices is one read; otherwise one read per row.
  """
  if len(indices) and indices[-1] - indices[0] + 1 == len(indices) and (
      np.all(np.diff(indices) == 1)):
    raw = os.pread(fd, row_bytes * len(indices),
                   offset + row_bytes * int(indices[0]))
  else:
    raw = b''.join([os.pread(fd, row_bytes, offset + row_bytes * i)
                    for i in indices.tolist()])
  if len(raw) != row_bytes * len(indices):
    raise data.DataError(f'{path}: shorter than when it was opened; was it '
                         'changed while training?')
  return np.frombuffer(raw, np.uint8).reshape(len(indices), row_bytes)


class IdxSource(_RecordsFromRead):
  """Examples read on demand from an uncompressed IDX images/labels pair.

  Memory does not grow with the files: each read fetches just its rows. The
  source pickles as its two paths (grain worker processes reopen the files).

  Attributes:
    images_path: (N, H, W) or (N, H, W, C) uint8 IDX file.
    labels_path: (N,) uint8 IDX file.
    image_shape: (H, W, C) of one image (C = 1 for 3-D image files).
  """

  def __init__(self, images_path: str, labels_path: str):
    self.images_path, self.labels_path = images_path, labels_path
    shape, self._images_offset = _idx_header(images_path, (3, 4), 'images')
    (num_labels,), self._labels_offset = _idx_header(labels_path, (1,),
                                                     'labels')
    if shape[0] != num_labels:
      raise data.DataError(
          f'{images_path} holds {shape[0]} images but {labels_path} holds '
          f'{num_labels} labels; they must match')
    self._size = num_labels
    self.image_shape = tuple(shape[1:]) + (1,) * (len(shape) == 3)
    self._images_fd = _open_for_reads(self, images_path)
    self._labels_fd = _open_for_reads(self, labels_path)

  def __reduce__(self):
    return IdxSource, (self.images_path, self.labels_path)

  def __repr__(self) -> str:
    return f'IdxSource({self.images_path!r}, {self.labels_path!r})'

  def __len__(self) -> int:
    return self._size

  def read(self, indices: np.ndarray) -> Batch:
    """Examples `indices` (n,): {'image': (n, H, W, C) uint8, 'label': (n,)
    int32}."""
    indices = _check_indices(indices, len(self))
    images = _pread_rows(self._images_fd, self._images_offset,
                         math.prod(self.image_shape), indices,
                         self.images_path)
    labels = _pread_rows(self._labels_fd, self._labels_offset, 1, indices,
                         self.labels_path)
    return {'image': images.reshape((-1,) + self.image_shape),
            'label': labels[:, 0].astype(np.int32)}

  def check_labels(self, num_classes: int, title: str) -> None:
    """Scans the labels file (constant memory) for labels >= num_classes.

    Raises:
      DataError: naming the file, the first bad label and its index.
    """
    with open(self.labels_path, 'rb') as f:
      f.seek(self._labels_offset)
      start = 0
      while chunk := f.read(_LABEL_SCAN_BYTES):
        labels = np.frombuffer(chunk, np.uint8)
        bad = np.flatnonzero(labels >= num_classes)
        if bad.size:
          raise data.DataError(
              f'{self.labels_path}: labels must lie in [0, {num_classes}) for '
              f'{title}, found {labels[bad[0]]} at index {start + bad[0]}')
        start += len(labels)


class TfdsSource(_RecordsFromRead):
  """A split of a prepared array_record TFDS dataset, decoded on demand.

  Attributes:
    data_source: `builder.as_data_source(split=...)` (it pickles).
    image_shape: (H, W, C) of one image.
    what: names the split in messages.
  """

  def __init__(self, data_source: Any, image_shape: tuple[int, int, int],
               what: str):
    self.data_source, self.image_shape, self.what = (data_source, image_shape,
                                                     what)

  def __repr__(self) -> str:
    return f'TfdsSource({self.what})'

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, indices: np.ndarray) -> Batch:
    """Examples `indices` (n,): {'image': (n, H, W, C) uint8, 'label': (n,)
    int32}."""
    indices = _check_indices(indices, len(self))
    try:
      records = [self.data_source[i] for i in indices.tolist()]
    except ImportError as e:
      raise data.DataError(f'Decoding the PNG images of {self.what} without '
                           'TensorFlow needs Pillow: pip install pillow') from e
    images = np.zeros((0,) + self.image_shape, np.uint8)
    if records:
      images = np.stack([record['image'] for record in records])
    return {'image': images,
            'label': np.array([record['label'] for record in records],
                              np.int32)}


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


# ------------------------------------------------------- decompression cache


def _is_gzip(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(2) == data._GZIP_MAGIC


def _gzip_size(path: str) -> int:
  """The uncompressed size modulo 2**32 from a gzip file's trailer."""
  with open(path, 'rb') as f:
    f.seek(-4, os.SEEK_END)
    return struct.unpack('<I', f.read(4))[0]


def _is_decompressed_copy(path: str, gz_path: str) -> bool:
  """Whether `path` is a whole uncompressed IDX file of `gz_path`'s size."""
  if not os.path.isfile(path) or (
      os.path.getsize(path) % 2**32 != _gzip_size(gz_path)):
    return False
  try:
    _idx_header(path, tuple(range(1, 256)), 'data')
  except data.DataError:
    return False
  return True


def _atomic_create(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(temp)` on a temporary name next to `path`, then renames."""
  fd, temp = tempfile.mkstemp(dir=os.path.dirname(path),
                              prefix=f'.{os.path.basename(path)}.')
  os.close(fd)
  try:
    write(temp)
    os.replace(temp, path)
  except BaseException:
    if os.path.lexists(temp):
      os.remove(temp)
    raise


def _decompress(gz_path: str, temp: str) -> None:
  try:
    with gzip.open(gz_path, 'rb') as src, open(temp, 'wb') as dst:
      shutil.copyfileobj(src, dst, _COPY_BUFFER_BYTES)
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise data.DataError(f'{gz_path}: corrupt gzip file ({e}); download or '
                         'install it again') from e


def _link(target: str, temp: str) -> None:
  os.remove(temp)
  os.symlink(target, temp)


def prepare_idx_dir(directory: str, cache_dir: str) -> str:
  """A directory of the four IDX files of `directory`, all uncompressed.

  Gzipped files are decompressed (streaming, in constant memory) once into
  a subdirectory of `cache_dir` for `directory`; plain ones are linked there.
  Nothing is written into `directory`, and files already in the cache with
  the right size and header are kept.

  Args:
    directory: holds the files of `data.IDX_FILES`, each possibly '.gz'.
    cache_dir: where decompressed copies go; created if needed.

  Returns:
    `directory` itself if no file is compressed, else the cache directory.

  Raises:
    DataError: a file is missing or a gzip file is corrupt.
  """
  found = data._find_idx_files(directory)
  if len(found) < sum(map(len, data.IDX_FILES.values())):
    raise data.DataError(data._missing_files_message(directory, found))
  if not any(_is_gzip(path) for path in found.values()):
    return directory
  absolute = os.path.abspath(directory)
  key = hashlib.sha256(absolute.encode()).hexdigest()[:12]
  target = os.path.join(cache_dir,
                        f'{os.path.basename(absolute) or "root"}-{key}')
  os.makedirs(target, exist_ok=True)
  for name, path in found.items():
    cached = os.path.join(target, name)
    if not _is_gzip(path):
      path = os.path.abspath(path)
      if not (os.path.islink(cached) and os.readlink(cached) == path):
        _atomic_create(cached, functools.partial(_link, path))
    elif not _is_decompressed_copy(cached, path):
      _atomic_create(cached, functools.partial(_decompress, path))
  return target


# ---------------------------------------------------------------- the split


def _to_float(images: np.ndarray) -> np.ndarray:
  """(n, H, W, C) float32 in [0, 1], exactly as `data._make_split` converts
  (float32 images, already converted, pass through)."""
  return data._unit_float(images) if images.dtype == np.uint8 else images


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
  return {'image': data._pad_to(_to_float(real['image']), len(positions)),
          'label': data._pad_to(real['label'], len(positions)),
          'mask': mask}


def _stream(dataset: grain.MapDataset, num_threads: int,
            prefetch: int) -> Iterator[Batch]:
  """`dataset`'s elements in order, read ahead by `num_threads` threads."""
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
    rows = data.epoch_batch_indices(seed, epoch, self.num_examples,
                                    batch_size)[start_batch:, share]
    read = functools.partial(_train_batch, self.source, dict(extras or {}))
    return _stream(grain.MapDataset.source(rows).map(read), num_threads,
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
    num_batches = data.num_eval_batches(self.num_examples, batch_size)
    read = functools.partial(_eval_batch, self.source, batch_size, share)
    return _stream(grain.MapDataset.range(num_batches).map(read),
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
  for directory in map(os.path.expanduser, info.idx_dirs):
    if data._find_idx_files(directory):
      return directory
  raise data.DataError(data._how_to_get(
      info, [f'{d}    (IDX files)' for d in info.idx_dirs]))


def _open_idx_split(directory: str, split: str,
                    info: data.DatasetInfo) -> IdxSource:
  """The checked source of `split` ('train' or 'test') in `directory`."""
  images_name, labels_name = data.IDX_FILES[split]
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
  tfds = data._import_tfds()
  data_dir = data_dir or data._tfds_data_dir()
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    data._prepare_tfds(builder, info)
  where = f"TFDS '{info.tfds_name}' in {data_dir}"
  file_format = getattr(builder.info.file_format, 'value', None) or 'tfrecord'
  if file_format != 'array_record':
    raise data.DataError(
        f'{where} is stored as {file_format}; streaming needs random access, '
        "i.e. array_record files (prepare it with file_format='array_record')")
  features = builder.info.features
  found = (tuple(features['image'].shape), features['label'].num_classes)
  if found != (info.image_shape, info.num_classes):
    raise data.DataError(
        f'{where}: expected images of shape {info.image_shape} and '
        f'{info.num_classes} classes, found {found[0]} and {found[1]}')
  splits = {split: TfdsSource(builder.as_data_source(split=split),
                              info.image_shape, f"{where}, split '{split}'")
            for split in data.IDX_FILES}
  return splits, f'TFDS {info.tfds_name} (data_dir={data_dir})'


def _open_idx_splits(info: data.DatasetInfo, data_dir: str | None,
                     cache_dir: str) -> tuple[dict[str, IdxSource], str]:
  """Both splits from IDX files, gzipped ones decompressed into `cache_dir`."""
  directory = prepare_idx_dir(_idx_directory(info, data_dir),
                              os.path.expanduser(cache_dir))
  splits = {split: _open_idx_split(directory, split, info)
            for split in data.IDX_FILES}
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
  data._check_limit('train_limit', train_limit)
  data._check_limit('test_limit', test_limit)
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
