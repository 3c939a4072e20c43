"""Datasets as in-memory numpy arrays, and the batch iterators over them.

A dataset is resolved offline first: local IDX files (the MNIST file format, as
installed by Debian's `dataset-fashion-mnist`), then TFDS data already prepared
on disk. Only `source='tfds'` may download. Whatever the source, the result is a
`Dataset` of two `Split`s holding float32 NHWC images in [0, 1] and int32
labels, small enough (MNIST-sized) to keep in host memory.

Batches are dicts of numpy arrays, `{'image', 'label'}` for training and
`{'image', 'label', 'mask'}` for evaluation, with the same shapes every step so
that a jitted step compiles once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import dataclasses
import gzip
import importlib
import importlib.util
import math
import os
import struct
import zlib

import numpy as np

from kd_jax import errors


class DataError(errors.UserInputError):
  """Missing, malformed or inconsistent dataset files, or a bad data option."""


# eq=False: compare by identity; field-wise == on arrays is ambiguous.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset, held in memory.

  Attributes:
    images: (N, H, W, C) float32 in [0, 1].
    labels: (N,) int32 in [0, num_classes).
  """

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.float32:
      raise DataError(
          'Split.images must be (N, H, W, C) float32, got '
          f'{self.images.shape} {self.images.dtype}')
    if self.labels.ndim != 1 or self.labels.dtype != np.int32:
      raise DataError(
          f'Split.labels must be (N,) int32, got {self.labels.shape} '
          f'{self.labels.dtype}')
    if len(self.images) != len(self.labels):
      raise DataError(
          f'Split has {len(self.images)} images but {len(self.labels)} labels')

  @property
  def num_examples(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train and a test split, and where they were read from.

  Attributes:
    name: key of `DATASETS`, e.g. 'fashion_mnist'.
    train: the training split.
    test: the test split.
    num_classes: labels lie in [0, num_classes).
    source: human-readable origin, e.g. 'IDX files in /usr/share/...'.
    validation: examples held out of the training data (see
      `hold_out_validation`), or None.
  """

  name: str
  train: Split
  test: Split
  num_classes: int
  source: str
  validation: Split | None = None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What is known about a dataset before reading it.

  Attributes:
    title: display name, e.g. 'Fashion-MNIST'.
    num_classes: number of classes.
    image_shape: (H, W, C) of one image.
    idx_dirs: directories probed for the four IDX files, in order ('~' is
      expanded).
    tfds_name: the TFDS builder name.
    install_hint: a command that installs the IDX files into `idx_dirs[0]`, or
      None when there is none.
  """

  title: str
  num_classes: int
  image_shape: tuple[int, int, int]
  idx_dirs: tuple[str, ...]
  tfds_name: str
  install_hint: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    'fashion_mnist': DatasetInfo(
        title='Fashion-MNIST',
        num_classes=10,
        image_shape=(28, 28, 1),
        # Keras' `fashion_mnist.load_data()` caches the same four .gz files.
        idx_dirs=('/usr/share/datasets/fashion-mnist',
                  '~/.keras/datasets/fashion-mnist'),
        tfds_name='fashion_mnist',
        install_hint='apt-get install dataset-fashion-mnist',
    ),
    'mnist': DatasetInfo(
        title='MNIST',
        num_classes=10,
        image_shape=(28, 28, 1),
        # No Debian package ships MNIST; the directory follows the
        # fashion-mnist package's layout. (Keras caches MNIST as one .npz.)
        idx_dirs=('/usr/share/datasets/mnist',),
        tfds_name='mnist',
    ),
}

SOURCES = ('auto', 'idx', 'tfds')

# split -> (images file, labels file), without the optional '.gz'.
IDX_FILES: dict[str, tuple[str, str]] = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_FILE_NAMES = IDX_FILES['train'] + IDX_FILES['test']

# IDX type code (third byte of the magic number) -> element type, big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
_GZIP_MAGIC = b'\x1f\x8b'


# ------------------------------------------------------------------ IDX files


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the MNIST format), plain or gzip-compressed.

  Compression is detected from the file's first bytes, not its name.

  Args:
    path: the file.

  Returns:
    A read-only array with the shape and element type given by the file's
    header (uint8 for MNIST-style files), in native byte order.

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

  Raises:
    ValueError: the dtype or rank has no IDX encoding.
  """
  if not 1 <= len(shape) <= 255:
    raise ValueError(f'IDX needs 1 to 255 dims, got shape {tuple(shape)}')
  return bytes([0, 0, _idx_type_code(dtype), len(shape)]) + struct.pack(
      f'>{len(shape)}I', *shape)


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
  if raw[:2] == _GZIP_MAGIC:
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


def _find_idx_files(directory: str) -> dict[str, str]:
  """Maps each IDX file name present in `directory` to its path.

  A plain file is preferred to its '.gz' (no decompression to pay).
  """
  found = {}
  for name in _IDX_FILE_NAMES:
    for candidate in (name, name + '.gz'):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        found[name] = path
        break
  return found


def _missing_files_message(directory: str, found: Mapping[str, str]) -> str:
  missing = [n for n in _IDX_FILE_NAMES if n not in found]
  return (f'{directory} lacks the IDX file(s) {", ".join(missing)} (each may '
          f'be .gz); a dataset directory needs all four: '
          f'{", ".join(_IDX_FILE_NAMES)}')


def _load_idx_dir(directory: str, info: DatasetInfo,
                  limits: Mapping[str, int | None]) -> dict[str, Split]:
  """Reads both splits from the four IDX files in `directory`."""
  found = _find_idx_files(directory)
  if len(found) < len(_IDX_FILE_NAMES):
    raise DataError(_missing_files_message(directory, found))
  splits = {}
  for split, (images_name, labels_name) in IDX_FILES.items():
    images_path, labels_path = found[images_name], found[labels_name]
    images = read_idx(images_path)
    height, width, channels = info.image_shape
    if images.ndim != 3 or images.shape[1:] != (height, width):
      raise DataError(
          f'{images_path}: expected {info.title} images of shape '
          f'(N, {height}, {width}), got {images.shape}')
    labels = read_idx(labels_path)
    splits[split] = _make_split(
        images.reshape(images.shape + (channels,)), labels, info=info,
        limit=limits[split], images_what=images_path, labels_what=labels_path)
  return splits


# ----------------------------------------------------------- array -> Split


def _unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels (any shape) as float32 in [0, 1]."""
  return np.divide(images, np.float32(255), dtype=np.float32)


def _make_split(images: np.ndarray, labels: np.ndarray, *, info: DatasetInfo,
                limit: int | None, images_what: str,
                labels_what: str) -> Split:
  """Validates raw arrays and converts their first `limit` rows to a Split.

  Args:
    images: (N, H, W, C) uint8 pixels in [0, 255].
    labels: (N,) integers.
    info: the dataset's info (image shape, number of classes).
    limit: keep only the first `limit` examples; None or 0 keeps all.
    images_what: names the images' origin (a path) in messages.
    labels_what: names the labels' origin in messages.

  Returns:
    A Split: (n, H, W, C) float32 images in [0, 1], (n,) int32 labels.
  """
  if images.dtype != np.uint8:
    raise DataError(f'{images_what}: expected uint8 pixels, got '
                    f'{images.dtype}')
  if images.shape[1:] != info.image_shape:
    raise DataError(f'{images_what}: expected {info.title} images of shape '
                    f'(N, {", ".join(map(str, info.image_shape))}), got '
                    f'{images.shape}')
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{labels_what}: expected 1-D integer labels, got shape '
                    f'{labels.shape} of {labels.dtype}')
  if len(images) != len(labels):
    raise DataError(f'{images_what} holds {len(images)} images but '
                    f'{labels_what} holds {len(labels)} labels; they must '
                    'match')
  if not len(labels):
    raise DataError(f'{labels_what}: holds no examples')
  low, high = labels.min(), labels.max()
  if low < 0 or high >= info.num_classes:
    bad = int(np.flatnonzero((labels < 0) | (labels >= info.num_classes))[0])
    raise DataError(
        f'{labels_what}: labels must lie in [0, {info.num_classes}) for '
        f'{info.title}, found {labels[bad]} at index {bad} (range {low}..'
        f'{high})')
  if limit:
    images, labels = images[:limit], labels[:limit]
  return Split(images=_unit_float(images),
               labels=labels.astype(np.int32))


# ----------------------------------------------------------------------- TFDS


def _module_available(name: str) -> bool:
  """Whether `name` can be imported, without importing it."""
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def _tfds_data_dir() -> str:
  """TFDS's default data_dir, found without importing TFDS."""
  return os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def _import_tfds():
  try:
    return importlib.import_module('tensorflow_datasets')
  except ImportError as e:
    raise DataError('source=tfds needs tensorflow-datasets: '
                    'pip install tensorflow-datasets') from e


def _prepare_tfds(builder, info: DatasetInfo) -> None:
  """Downloads and prepares `builder`'s data; needs TensorFlow and a network."""
  where = f"TFDS '{info.tfds_name}' into {builder.data_dir}"
  problems = []
  # The TFDS MNIST builders read the IDX files with tf.io.gfile and encode
  # images with tf.image.encode_png, whatever the file format.
  if not _module_available('tensorflow'):
    problems.append(
        'TensorFlow, which is not installed: pip install tensorflow')
  # tensorflow-datasets 4.9.10 imports it in download_and_prepare but does not
  # declare it (tensorflow/datasets#11212).
  if not _module_available('importlib_resources'):
    problems.append('importlib_resources, which tensorflow-datasets uses but '
                    'does not install: pip install importlib_resources')
  if problems:
    raise DataError(f'Downloading and preparing {where} needs '
                    + '; and '.join(problems))
  try:
    builder.download_and_prepare()
  except OSError as e:
    raise DataError(f'Downloading and preparing {where} failed (is there a '
                    f'network?): {e}') from e


def _read_tfds_split(tfds, builder, split: str,
                     limit: int | None) -> dict[str, np.ndarray]:
  """Reads a prepared TFDS split as {'image': (N, H, W, C), 'label': (N,)}."""
  file_format = getattr(builder.info.file_format, 'value', None) or 'tfrecord'
  where = f"TFDS '{builder.name}' split '{split}' in {builder.data_dir}"
  if file_format == 'array_record':
    # Random-access reading works without TensorFlow.
    source = builder.as_data_source(split=split)
    count = min(limit, len(source)) if limit else len(source)
    try:
      examples = [source[i] for i in range(count)]
    except ImportError as e:
      raise DataError(f'Decoding the PNG images of {where} without '
                      'TensorFlow needs Pillow: pip install pillow') from e
    return {'image': np.stack([ex['image'] for ex in examples]),
            'label': np.array([ex['label'] for ex in examples])}
  if not _module_available('tensorflow'):
    raise DataError(f'{where} is stored as {file_format}, which only '
                    'TensorFlow reads: pip install tensorflow')
  split_spec = f'{split}[:{limit}]' if limit else split
  return tfds.as_numpy(builder.as_dataset(split=split_spec, batch_size=-1))


def _load_tfds(info: DatasetInfo, data_dir: str | None, *, download: bool,
               limits: Mapping[str, int | None]
               ) -> tuple[dict[str, Split], str] | None:
  """Loads both splits through TFDS.

  Args:
    info: the dataset.
    data_dir: TFDS data_dir; None for TFDS's default.
    download: whether data not yet prepared may be downloaded and prepared.
    limits: split -> first-N limit (None or 0 for all).

  Returns:
    (splits, source description), or None when the data is not prepared and
    `download` is False.
  """
  tfds = _import_tfds()
  data_dir = data_dir or _tfds_data_dir()
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    if not download:
      return None
    _prepare_tfds(builder, info)
  splits = {}
  for split in ('train', 'test'):
    arrays = _read_tfds_split(tfds, builder, split, limits[split])
    what = f"TFDS '{info.tfds_name}' split '{split}'"
    splits[split] = _make_split(
        np.asarray(arrays['image']), np.asarray(arrays['label']), info=info,
        limit=limits[split], images_what=what + ' images',
        labels_what=what + ' labels')
  return splits, f'TFDS {info.tfds_name} (data_dir={data_dir})'


# ----------------------------------------------------------------- resolving


def _check_limit(field: str, value: int | None) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise DataError(f'{field} must be an integer or None, got {value!r}')
  if value < 0:
    raise DataError(f'{field} must be >= 0 (None or 0 means all examples), '
                    f'got {value}')


def _how_to_get(info: DatasetInfo, searched: list[str]) -> str:
  """The message for 'nothing found': where we looked, and how to get it."""
  files = ', '.join(_IDX_FILE_NAMES)
  lines = [f'No {info.title} data found. Looked in:']
  lines += [f'  {s}' for s in searched]
  lines.append('Get the data in one of these ways:')
  if info.install_hint:
    lines.append(f'  {info.install_hint}    (installs the IDX files in '
                 f'{info.idx_dirs[0]})')
  lines.append(f'  --config.data_dir=DIR    where DIR holds the IDX files '
               f'{files} (each may be .gz)')
  lines.append('  --config.data_source=tfds    downloads with TFDS when a '
               'network is available (needs pip install tensorflow)')
  return '\n'.join(lines)


def _auto(info: DatasetInfo, limits: Mapping[str, int | None]
          ) -> tuple[dict[str, Split], str]:
  """Known local IDX dirs, then TFDS data on disk; never downloads."""
  searched = []
  for directory in info.idx_dirs:
    directory = os.path.expanduser(directory)
    found = _find_idx_files(directory)
    if found:  # A partial set is an error, not a reason to look elsewhere.
      return _load_idx_dir(directory, info, limits), _idx_source(directory)
    searched.append(f'{directory}    (IDX files)')
  tfds_dir = _tfds_data_dir()
  if (os.path.isdir(os.path.join(tfds_dir, info.tfds_name))
      and _module_available('tensorflow_datasets')):
    loaded = _load_tfds(info, None, download=False, limits=limits)
    if loaded is not None:
      return loaded
  searched.append(f'{tfds_dir}    (prepared TFDS data '
                  f"'{info.tfds_name}')")
  raise DataError(_how_to_get(info, searched))


def _idx_source(directory: str) -> str:
  return f'IDX files in {directory}'


def load_dataset(name: str, *, data_dir: str | None = None,
                 source: str = 'auto', train_limit: int | None = None,
                 test_limit: int | None = None) -> Dataset:
  """Loads a dataset's train and test splits into memory.

  Sources:
    'idx': the four IDX files in `data_dir`, or else in the first of the
      dataset's known directories that has them.
    'tfds': TFDS, in `data_dir` (TFDS's data_dir) if given; downloads and
      prepares the data if needed, which needs TensorFlow and a network.
    'auto': never downloads. The IDX files in `data_dir` if given (nothing
      else is tried then); else the known IDX directories; else TFDS data
      already prepared in TFDS's default data_dir.

  Args:
    name: a key of `DATASETS`, e.g. 'fashion_mnist' or 'mnist'.
    data_dir: a directory holding the IDX files ('auto', 'idx') or TFDS's
      data_dir ('tfds').
    source: 'auto', 'idx' or 'tfds'.
    train_limit: keep the first N training examples; None or 0 keeps all.
    test_limit: keep the first N test examples; None or 0 keeps all.

  Returns:
    A Dataset whose splits hold (N, H, W, C) float32 images in [0, 1] and (N,)
    int32 labels.

  Raises:
    DataError: unknown name or source, bad limits, data not found (with how
      to get it), or malformed files (naming the file).
  """
  if name not in DATASETS:
    raise DataError(f'Unknown dataset {name!r}; known datasets: '
                    f'{", ".join(sorted(DATASETS))}')
  if source not in SOURCES:
    raise DataError(f'Unknown data source {source!r}; expected one of '
                    f'{", ".join(SOURCES)}')
  _check_limit('train_limit', train_limit)
  _check_limit('test_limit', test_limit)
  info = DATASETS[name]
  limits = {'train': train_limit, 'test': test_limit}

  if source == 'tfds':
    splits, description = _load_tfds(info, data_dir, download=True,
                                     limits=limits)
  elif data_dir:
    directory = os.path.expanduser(data_dir)
    if not os.path.isdir(directory):
      raise DataError(f'data_dir {directory} is not a directory; it must hold '
                      f'the IDX files {", ".join(_IDX_FILE_NAMES)} (each may '
                      'be .gz)')
    splits, description = (_load_idx_dir(directory, info, limits),
                           _idx_source(directory))
  elif source == 'idx':
    for directory in map(os.path.expanduser, info.idx_dirs):
      if _find_idx_files(directory):
        splits, description = (_load_idx_dir(directory, info, limits),
                               _idx_source(directory))
        break
    else:
      raise DataError(_how_to_get(
          info, [f'{d}    (IDX files)' for d in info.idx_dirs]))
  else:
    splits, description = _auto(info, limits)
  return Dataset(name=name, train=splits['train'], test=splits['test'],
                 num_classes=info.num_classes, source=description)


# The held-out validation examples are the same for every seed, so that a
# comparison over seeds varies only initialisation and data order.
VALIDATION_SPLIT_SEED = 20151


def held_out_mask(n: int, size: int, *,
                  name: str = 'the dataset') -> np.ndarray:
  """Which of `n` training examples `hold_out_validation` holds out.

  Args:
    n: the training split's size, N.
    size: examples to hold out, 0 <= size < N.
    name: the dataset's name, for the message.

  Returns:
    (N,) bool, True for the `size` held-out examples: a fixed random subset
    (the same for every seed).

  Raises:
    DataError: `size` out of range.
  """
  if not 0 <= size < n:
    raise DataError(f'validation_size = {size}: expected 0 <= size < {n}, the '
                    f'number of training examples of {name}')
  held_out = np.zeros(n, bool)
  held_out[np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(n)[:size]
           ] = True
  return held_out


def hold_out_validation(dataset: Dataset, size: int) -> Dataset:
  """`dataset` with `size` training examples moved to a validation split.

  The examples are a fixed random subset of the training split (the same
  for every seed); the rest keep their order. Used for post-hoc calibration,
  which must never see the test split.

  Args:
    dataset: a loaded dataset without a validation split.
    size: examples to hold out, 0 <= size < the training split's size.

  Returns:
    A Dataset whose `train` has N - size examples and `validation` size (or
    `dataset` itself when size is 0).

  Raises:
    DataError: `size` out of range.
  """
  held_out = held_out_mask(dataset.train.num_examples, size,
                           name=dataset.name)
  if size == 0:
    return dataset
  split = lambda keep: Split(dataset.train.images[keep],
                             dataset.train.labels[keep])
  return dataclasses.replace(dataset, train=split(~held_out),
                             validation=split(held_out))


# -------------------------------------------------------------------- batches


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


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int,
                  start_batch: int = 0,
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


def eval_batches(split: Split,
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
      images = _pad_to(images, batch_size)
      labels = _pad_to(labels, batch_size)
    yield {'image': images, 'label': labels, 'mask': mask}


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads `array` along axis 0 to `size` rows."""
  padded = np.zeros((size,) + array.shape[1:], array.dtype)
  padded[:len(array)] = array
  return padded
