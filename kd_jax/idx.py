"""The IDX file format (MNIST's), and finding a dataset's four IDX files.

An IDX file is a 4-byte magic number `00 00 TT NN` (element type TT, NN
dimensions), NN big-endian uint32 dimensions, then the big-endian elements in
C order. Files may be gzip-compressed, as MNIST and Fashion-MNIST are
distributed; compression is recognised by its magic bytes, not by the name.
"""

from __future__ import annotations

from collections.abc import Mapping
import gzip
import math
import os
import struct
import zlib

import numpy as np

from kd_jax.errors import DataError

# split -> (images file, labels file), without the optional '.gz'.
IDX_FILES: dict[str, tuple[str, str]] = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# The four file names of a dataset directory, train first.
IDX_FILE_NAMES: tuple[str, ...] = IDX_FILES['train'] + IDX_FILES['test']

# The first two bytes of every gzip file.
GZIP_MAGIC = b'\x1f\x8b'

# IDX type code (third byte of the magic number) -> element type, big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the MNIST format), plain or gzip-compressed.

  Compression is detected from the file's first bytes, not its name.

  Args:
    path: the file.

  Returns:
    A read-only array with the shape and element type given by the file's
    header (uint8 for MNIST-style files, e.g. (N, 28, 28) images or (N,)
    labels), in native byte order.

  Raises:
    DataError: the file is missing, not gzip despite a '.gz' name, a corrupt
      gzip, has a bad magic number, or its size does not match its header.
  """
  return _parse_idx(_read_maybe_gzip(path), path)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` as an IDX file, gzip-compressed if `path` ends in '.gz'.

  Args:
    path: the file to create or overwrite.
    array: 1 to 255 dims, of dtype uint8, int8, int16, int32, float32 or
      float64 (MNIST files are uint8).

  Raises:
    ValueError: the array's dtype or rank has no IDX encoding.
  """
  array = np.asarray(array)
  header = idx_header(array.dtype, array.shape)
  payload = header + array.astype(_IDX_DTYPES[header[2]],
                                  copy=False).tobytes()
  if path.endswith('.gz'):
    payload = gzip.compress(payload, compresslevel=6, mtime=0)
  with open(path, 'wb') as f:
    f.write(payload)


def idx_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
  """The IDX header of an array of `dtype` and `shape`: magic number and
  dimensions, to be followed by the big-endian elements (see `write_idx`).

  Args:
    dtype: the elements' type, one `write_idx` accepts.
    shape: the array's shape, 1 to 255 dims.

  Returns:
    4 + 4 * len(shape) bytes.

  Raises:
    ValueError: the dtype or rank has no IDX encoding.
  """
  if not 1 <= len(shape) <= 255:
    raise ValueError(f'IDX needs 1 to 255 dims, got shape {tuple(shape)}')
  return bytes([0, 0, _idx_type_code(dtype), len(shape)]) + struct.pack(
      f'>{len(shape)}I', *shape)


def is_gzip(path: str) -> bool:
  """Whether the file `path` starts with the gzip magic bytes."""
  with open(path, 'rb') as f:
    return f.read(2) == GZIP_MAGIC


def find_idx_files(directory: str) -> dict[str, str]:
  """Maps each IDX file name present in `directory` to its path.

  A plain file is preferred to its '.gz' (no decompression to pay).

  Args:
    directory: where to look.

  Returns:
    {name of `IDX_FILE_NAMES`: path}, for the names found (maybe none).
  """
  found = {}
  for name in IDX_FILE_NAMES:
    for candidate in (name, name + '.gz'):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        found[name] = path
        break
  return found


def missing_files_message(directory: str, found: Mapping[str, str]) -> str:
  """The error message for `directory`, holding only the files `found` (as
  `find_idx_files` returns them) of the four a dataset needs."""
  missing = [n for n in IDX_FILE_NAMES if n not in found]
  return (f'{directory} lacks the IDX file(s) {", ".join(missing)} (each may '
          f'be .gz); a dataset directory needs all four: '
          f'{", ".join(IDX_FILE_NAMES)}')


def _idx_type_code(dtype: np.dtype) -> int:
  for code, idx_dtype in _IDX_DTYPES.items():
    if np.dtype(dtype).newbyteorder('>') == idx_dtype.newbyteorder('>'):
      return code
  known = ', '.join(str(d.newbyteorder('=')) for d in _IDX_DTYPES.values())
  raise ValueError(f'IDX cannot store dtype {dtype}; use one of {known}')


def _read_maybe_gzip(path: str) -> bytes:
  """Returns the (decompressed) bytes of `path`."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'{path}: cannot read: {e.strerror or e}') from e
  if raw[:2] == GZIP_MAGIC:
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f'{path}: corrupt gzip file ({e}); download or '
                      'install it again') from e
  if path.endswith('.gz'):
    raise DataError(f'{path}: corrupt gzip file: it does not start with the '
                    'gzip magic bytes 1f 8b')
  return raw


def _parse_idx(raw: bytes, path: str) -> np.ndarray:
  """Decodes IDX bytes (see `read_idx`); `path` is only for messages."""
  if len(raw) < 4:
    raise DataError(f'{path}: truncated IDX file: {len(raw)} bytes, shorter '
                    'than the 4-byte magic number')
  code, ndim = raw[2], raw[3]
  if raw[0] or raw[1] or code not in _IDX_DTYPES or ndim == 0:
    raise DataError(
        f'{path}: not an IDX file: magic number 0x{raw[:4].hex()}, expected '
        '0x0000TTNN with type code TT in '
        f'{{{", ".join(f"{c:02x}" for c in _IDX_DTYPES)}}} and NN >= 1 dims')
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise DataError(f'{path}: truncated IDX file: {len(raw)} bytes, shorter '
                    f'than its {header_size}-byte header')
  shape = struct.unpack(f'>{ndim}I', raw[4:header_size])
  dtype = _IDX_DTYPES[code]
  expected_size = header_size + math.prod(shape) * dtype.itemsize
  if len(raw) != expected_size:
    problem = 'truncated' if len(raw) < expected_size else 'over-long'
    raise DataError(
        f'{path}: {problem} IDX file: {len(raw)} bytes (uncompressed), but '
        f'its header says shape {shape} of {dtype.newbyteorder("=")}, which '
        f'is {expected_size} bytes')
  array = np.frombuffer(raw, dtype, count=math.prod(shape), offset=header_size)
  array = array.astype(dtype.newbyteorder('='), copy=False).reshape(shape)
  array.flags.writeable = False
  return array
