"""CIFAR-10 and CIFAR-100 from their official python archives.

The archives (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`) hold a
folder of batches (`cifar-10-batches-py/data_batch_1` .. `_5` and
`test_batch`; `cifar-100-python/train` and `test`), each a Python 2 pickle of
a dict with b'data', (N, 3072) uint8 rows of 32x32 images in CHW order
(1024 red, then 1024 green, then 1024 blue values, each row-major), and
b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100, its 100 classes), a list
of N ints. The archive or its extracted folder is read.

The batches are pickles, and unpickling can run code: they are read with an
unpickler that knows only the few numpy functions that rebuild an array
(`ALLOWED_GLOBALS`) and refuses any other global, so a malicious file can
fail but cannot execute anything.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import io
import os
import pickle
import tarfile
import zlib

import numpy as np

from kd_jax.errors import DataError

IMAGE_SHAPE = (32, 32, 3)
_ROW_SIZE = 32 * 32 * 3


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a CIFAR dataset's batches are, and which labels to read.

  Attributes:
    archive: the official archive's file name.
    folder: the folder the archive extracts to.
    batches: split ('train', 'test') -> batch file names in the folder.
    label_key: the key of the labels in each batch's dict.
    num_classes: labels lie in [0, num_classes).
  """

  archive: str
  folder: str
  batches: Mapping[str, tuple[str, ...]]
  label_key: bytes
  num_classes: int

  def members(self) -> list[str]:
    """Every batch's path inside the archive, e.g. 'cifar-100-python/train'."""
    return [f'{self.folder}/{name}' for names in self.batches.values()
            for name in names]

  def describe(self) -> str:
    """What a data directory must hold, for messages."""
    names = ', '.join(n for names in self.batches.values() for n in names)
    return (f'{self.archive}, or the folder {self.folder} it extracts to '
            f'(with {names})')


LAYOUTS: dict[str, Layout] = {
    'cifar10': Layout(
        archive='cifar-10-python.tar.gz', folder='cifar-10-batches-py',
        batches={'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
                 'test': ('test_batch',)},
        label_key=b'labels', num_classes=10),
    'cifar100': Layout(
        archive='cifar-100-python.tar.gz', folder='cifar-100-python',
        batches={'train': ('train',), 'test': ('test',)},
        label_key=b'fine_labels', num_classes=100),
}

# The globals a CIFAR batch's pickle may name: the numpy functions and types
# that rebuild an ndarray (pickles from numpy 1 name numpy.core, numpy 2's
# numpy._core; protocol 5 rebuilds from a buffer). Nothing else is loaded.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROM_BUFFER = np.zeros(1).__reduce_ex__(5)[0]
ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy.core.numeric', '_frombuffer'): _FROM_BUFFER,
    ('numpy._core.numeric', '_frombuffer'): _FROM_BUFFER,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only `ALLOWED_GLOBALS`."""

  def find_class(self, module: str, name: str):
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f'global {module}.{name} is not allowed in a CIFAR batch') from None


def restricted_loads(raw: bytes, what: str):
  """Unpickles `raw` as the CIFAR batches need, and nothing more.

  Args:
    raw: the pickle's bytes (Python 2 pickles are read with
      encoding='bytes': their str values become bytes).
    what: names the file in messages.

  Returns:
    The unpickled object (for a CIFAR batch, a dict).

  Raises:
    DataError: not a pickle, or it names a global outside `ALLOWED_GLOBALS`.
  """
  try:
    return _RestrictedUnpickler(io.BytesIO(raw), encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except
    # Unpickling a corrupt file can raise nearly anything; all mean "bad file".
    raise DataError(f'{what}: not a CIFAR batch pickle ({type(e).__name__}: '
                    f'{e})') from e


def parse_batch(raw: bytes, layout: Layout,
                what: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and checks one batch file.

  Args:
    raw: the batch file's bytes (a pickle).
    layout: the dataset's layout (label key, number of classes).
    what: names the batch in messages (a path, or archive and member).

  Returns:
    (N, 32, 32, 3) uint8 images (HWC, from the rows' CHW order) and (N,)
    int64 labels in [0, layout.num_classes).

  Raises:
    DataError: not the expected dict, arrays of the wrong shape or type,
      label count not N, or labels out of range; naming `what`.
  """
  batch = restricted_loads(raw, what)
  if not isinstance(batch, dict):
    raise DataError(f'{what}: expected a pickled dict, got '
                    f'{type(batch).__name__}')
  batch = {k.encode() if isinstance(k, str) else k: v
           for k, v in batch.items()}
  for key in (b'data', layout.label_key):
    if key not in batch:
      raise DataError(f'{what}: no key {key!r}; found '
                      f'{", ".join(sorted(map(repr, batch)))}')
  rows = batch[b'data']
  if (not isinstance(rows, np.ndarray) or rows.dtype != np.uint8
      or rows.ndim != 2 or rows.shape[1] != _ROW_SIZE):
    found = (f'{rows.shape} {rows.dtype}' if isinstance(rows, np.ndarray)
             else type(rows).__name__)
    raise DataError(f"{what}: expected b'data' of shape (N, {_ROW_SIZE}) "
                    f'uint8, got {found}')
  labels = _labels(batch[layout.label_key], len(rows), layout, what)
  images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def _labels(value, count: int, layout: Layout, what: str) -> np.ndarray:
  """`value` as (count,) int64 labels in [0, num_classes), or DataError."""
  key = layout.label_key
  try:
    labels = np.asarray(value)
  except (ValueError, TypeError) as e:
    raise DataError(f'{what}: {key!r} is not a list of ints ({e})') from e
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{what}: expected {key!r} to be a list of ints, got '
                    f'shape {labels.shape} of {labels.dtype}')
  if len(labels) != count:
    raise DataError(f"{what}: {count} rows in b'data' but {len(labels)} "
                    f'{key!r}; they must match')
  bad = np.flatnonzero((labels < 0) | (labels >= layout.num_classes))
  if bad.size:
    raise DataError(f'{what}: {key!r} must lie in [0, {layout.num_classes}),'
                    f' found {labels[bad[0]]} at index {bad[0]}')
  return labels.astype(np.int64)


def locate(path: str, layout: Layout) -> str | None:
  """The CIFAR archive or extracted folder that `path` is or holds.

  Args:
    path: the archive itself, the extracted folder (holding the batches),
      or a directory holding the folder or the archive.
    layout: the dataset's layout.

  Returns:
    The folder or archive path (a folder is preferred: nothing to
    decompress), or None when `path` is none of those.
  """
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    return None
  if all(os.path.isfile(os.path.join(path, name))
         for names in layout.batches.values() for name in names):
    return path
  for candidate in (layout.folder, layout.archive):
    if os.path.exists(os.path.join(path, candidate)):
      return os.path.join(path, candidate)
  return None


def read_cifar(location: str, layout: Layout
               ) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
  """Reads both splits from an archive or extracted folder (see `locate`).

  Args:
    location: the .tar.gz archive or the folder of batch files.
    layout: the dataset's layout.

  Returns:
    {'train': ..., 'test': ...}, each (images, labels, what): (N, 32, 32, 3)
    uint8 images, (N,) int64 labels, and the files read, for messages.
    CIFAR-10's five training batches are concatenated in order.

  Raises:
    DataError: a batch is missing or malformed, or the archive is not a
      readable .tar.gz; naming the file (and member).
  """
  if os.path.isdir(location):
    batches = _read_folder(location, layout)
  else:
    batches = _read_archive(location, layout)
  splits = {}
  for split, names in layout.batches.items():
    parts = [batches[name] for name in names]
    images = (np.concatenate([p[0] for p in parts]) if len(parts) > 1
              else parts[0][0])
    labels = np.concatenate([p[1] for p in parts])
    splits[split] = (images, labels, ', '.join(p[2] for p in parts))
  return splits


_Batch = tuple[np.ndarray, np.ndarray, str]


def _read_folder(folder: str, layout: Layout) -> dict[str, _Batch]:
  """Batch name -> (images, labels, its path), from an extracted folder."""
  batches = {}
  for names in layout.batches.values():
    for name in names:
      path = os.path.join(folder, name)
      try:
        with open(path, 'rb') as f:
          raw = f.read()
      except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror or e}); expected '
                        f'{layout.describe()}') from e
      batches[name] = parse_batch(raw, layout, path) + (path,)
  return batches


def _read_archive(path: str, layout: Layout) -> dict[str, _Batch]:
  """Batch name -> (images, labels, 'archive member'), in one pass."""
  wanted = {m: m.rsplit('/', 1)[1] for m in layout.members()}
  batches = {}
  try:
    with tarfile.open(path, 'r:gz') as tar:
      for member in tar:
        name = member.name.removeprefix('./')
        if name in wanted and member.isfile():
          what = f'{path} member {name}'
          raw = tar.extractfile(member).read()
          batches[wanted[name]] = parse_batch(raw, layout, what) + (what,)
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: not a readable gzip-compressed tar archive '
                    f'({e}); expected the official {layout.archive} (if it '
                    'is truncated or corrupt, download it again)') from e
  missing = [m for m, name in wanted.items() if name not in batches]
  if missing:
    raise DataError(f'{path}: the archive lacks {", ".join(missing)}; '
                    f'expected the official {layout.archive} with '
                    f'{", ".join(wanted)}')
  return batches
