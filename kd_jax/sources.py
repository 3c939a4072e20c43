"""Random-access sources of examples, read on demand for streaming.

A source (see `Source`) returns the examples at any indices, in any order:
`ArraySource` over arrays in memory, `IdxSource` over an uncompressed IDX
images/labels pair, `TfdsSource` over array_record TFDS data, `SubsetSource`
over some examples of another source. `prepare_idx_dir` makes the uncompressed
copies that `IdxSource` needs of gzipped IDX files, once, in a cache.

IDX files are read with `os.pread`, not a memory map: recent Linux kernels map
whole large page-cache folios (up to 2 MiB) for each 784-byte image touched
through a map, so random reads grow the process's RSS towards the file's size
(here, 512 random images of a 470 MB file: 400 MB). Reading just the rows
keeps memory flat.
"""

from __future__ import annotations

from collections.abc import Callable
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

import numpy as np

from kd_jax import idx
from kd_jax import tfds_io
from kd_jax.errors import DataError

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
      raise DataError(
          'ArraySource images must be (N, H, W, C) uint8 or float32, got '
          f'{images.shape} {images.dtype}')
    if labels.shape != images.shape[:1]:
      raise DataError(f'ArraySource has {len(images)} images but labels '
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


def _read_uint8_header(path: str, ndims: tuple[int, ...],
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
    raise DataError(f'{path}: cannot read: {e.strerror or e}') from e
  if magic[:2] == idx.GZIP_MAGIC:
    raise DataError(
        f'{path}: is gzip-compressed; streaming needs uncompressed IDX files '
        '(streaming.prepare_idx_dir decompresses them into a cache)')
  if len(magic) < 4 or magic[:3] != bytes([0, 0, _IDX_UINT8]) or (
      ndim not in ndims):
    expected = ' or '.join(f'0x000008{n:02x}' for n in ndims)
    raise DataError(
        f'{path}: not an IDX file of uint8 {what}: magic number '
        f'0x{magic.hex()}, expected {expected} (uint8, {ndims} dims)')
  if len(dims) < 4 * ndim:
    raise DataError(f'{path}: truncated IDX file: {size} bytes, shorter '
                    f'than its {4 + 4 * ndim}-byte header')
  shape = struct.unpack(f'>{ndim}I', dims)
  header_size = 4 + 4 * ndim
  if size != header_size + math.prod(shape):
    problem = 'truncated' if size < header_size + math.prod(shape) else (
        'over-long')
    raise DataError(
        f'{path}: {problem} IDX file: {size} bytes, but its header says shape '
        f'{shape} of uint8, which is {header_size + math.prod(shape)} bytes')
  return shape, header_size


def _open_for_reads(owner: Any, path: str) -> int:
  """A read-only descriptor of `path`, closed when `owner` is collected."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError as e:
    raise DataError(f'{path}: cannot read: {e.strerror or e}') from e
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
    raise DataError(f'{path}: shorter than when it was opened; was it '
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
    shape, self._images_offset = _read_uint8_header(images_path, (3, 4),
                                                    'images')
    (num_labels,), self._labels_offset = _read_uint8_header(labels_path, (1,),
                                                            'labels')
    if shape[0] != num_labels:
      raise DataError(
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
          raise DataError(
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
    records = tfds_io.read_records(self.data_source, indices.tolist(),
                                   self.what)
    images = np.zeros((0,) + self.image_shape, np.uint8)
    if records:
      images = np.stack([record['image'] for record in records])
    return {'image': images,
            'label': np.array([record['label'] for record in records],
                              np.int32)}


# ------------------------------------------------------- decompression cache


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
    _read_uint8_header(path, tuple(range(1, 256)), 'data')
  except DataError:
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
    raise DataError(f'{gz_path}: corrupt gzip file ({e}); download or '
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
    directory: holds the files of `idx.IDX_FILES`, each possibly '.gz'.
    cache_dir: where decompressed copies go; created if needed.

  Returns:
    `directory` itself if no file is compressed, else the cache directory.

  Raises:
    DataError: a file is missing or a gzip file is corrupt.
  """
  found = idx.find_idx_files(directory)
  if len(found) < len(idx.IDX_FILE_NAMES):
    raise DataError(idx.missing_files_message(directory, found))
  if not any(idx.is_gzip(path) for path in found.values()):
    return directory
  absolute = os.path.abspath(directory)
  key = hashlib.sha256(absolute.encode()).hexdigest()[:12]
  target = os.path.join(cache_dir,
                        f'{os.path.basename(absolute) or "root"}-{key}')
  os.makedirs(target, exist_ok=True)
  for name, path in found.items():
    cached = os.path.join(target, name)
    if not idx.is_gzip(path):
      path = os.path.abspath(path)
      if not (os.path.islink(cached) and os.readlink(cached) == path):
        _atomic_create(cached, functools.partial(_link, path))
    elif not _is_decompressed_copy(cached, path):
      _atomic_create(cached, functools.partial(_decompress, path))
  return target
