"""Datasets as in-memory numpy arrays: finding, reading and checking them.

A dataset is resolved locally first: files in `data_dir` or known
directories (IDX files, the MNIST file format, as installed by Debian's
`dataset-fashion-mnist`; CIFAR's python archives), then the download cache
(`kd_jax.download`), then TFDS data already prepared on disk, and only then
downloaded (see `load_dataset`). Whatever the source, the result is a `Dataset`
of two `Split`s holding float32 NHWC images in [0, 1] (not normalised:
`DatasetInfo.mean` and `std` are for the training step) and int32 labels,
kept in host memory (CIFAR's training split as float32 takes 614 MB).

The file formats live in `idx` and `cifar`, TFDS access in `tfds_io` and the
batch iterators in `batching`; the names callers use from them are
re-exported here, so that `kd_jax.data.<name>` stays the one place to find
them.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os

import numpy as np

from kd_jax import cifar
from kd_jax import download
from kd_jax import idx
from kd_jax import tfds_io
# Re-exported: callers use these as kd_jax.data.<name>.
# pylint: disable=g-importing-member,unused-import
from kd_jax.batching import epoch_batch_indices
from kd_jax.batching import epoch_permutation
from kd_jax.batching import eval_batches
from kd_jax.batching import num_eval_batches
from kd_jax.batching import num_train_batches
from kd_jax.batching import train_batches
from kd_jax.dataset_info import DATASETS
from kd_jax.dataset_info import DatasetInfo
from kd_jax.errors import DataError
from kd_jax.idx import IDX_FILES
from kd_jax.idx import idx_header
from kd_jax.idx import read_idx
from kd_jax.idx import write_idx
# pylint: enable=g-importing-member,unused-import


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


SOURCES = ('auto', 'idx', 'tfds', 'download')


# ------------------------------------------------------------ reading splits


def _load_idx_dir(directory: str, info: DatasetInfo,
                  limits: Mapping[str, int | None]) -> dict[str, Split]:
  """Reads both splits from the four IDX files in `directory`."""
  found = idx.find_idx_files(directory)
  if len(found) < len(idx.IDX_FILE_NAMES):
    raise DataError(idx.missing_files_message(directory, found))
  splits = {}
  for split, (images_name, labels_name) in idx.IDX_FILES.items():
    images_path, labels_path = found[images_name], found[labels_name]
    images = idx.read_idx(images_path)
    height, width, channels = info.image_shape
    if images.ndim != 3 or images.shape[1:] != (height, width):
      raise DataError(
          f'{images_path}: expected {info.title} images of shape '
          f'(N, {height}, {width}), got {images.shape}')
    labels = idx.read_idx(labels_path)
    splits[split] = _make_split(
        images.reshape(images.shape + (channels,)), labels, info=info,
        limit=limits[split], images_what=images_path, labels_what=labels_path)
  return splits


def _load_local(path: str, info: DatasetInfo,
                limits: Mapping[str, int | None]
                ) -> tuple[dict[str, Split], str]:
  """Both splits from `path`: a directory of IDX files, or for CIFAR the
  archive, its extracted folder, or a directory holding either."""
  if info.layout is None:
    return _load_idx_dir(path, info, limits), _idx_source(path)
  location = cifar.locate(path, info.layout)
  if location is None:
    raise DataError(f'{path} holds no {info.title} data; expected '
                    f'{info.layout.describe()}')
  splits = {
      split: _make_split(images, labels, info=info, limit=limits[split],
                         images_what=what, labels_what=what)
      for split, (images, labels, what)
      in cifar.read_cifar(location, info.layout).items()}
  return splits, f'{info.title} python batches in {location}'


def unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 pixels of any shape, e.g. (N, H, W, C), as float32 in [0, 1]."""
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
  return Split(images=unit_float(images),
               labels=labels.astype(np.int32))


def _load_tfds(info: DatasetInfo, data_dir: str | None, *,
               may_download: bool, limits: Mapping[str, int | None]
               ) -> tuple[dict[str, Split], str] | None:
  """Loads both splits through TFDS.

  Args:
    info: the dataset.
    data_dir: TFDS data_dir; None for TFDS's default.
    may_download: whether data not yet prepared may be downloaded and
      prepared.
    limits: split -> first-N limit (None or 0 for all).

  Returns:
    (splits, source description), or None when the data is not prepared and
    `may_download` is False.
  """
  tfds = tfds_io.import_tfds()
  data_dir = data_dir or tfds_io.tfds_data_dir()
  builder = tfds.builder(info.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    if not may_download:
      return None
    tfds_io.prepare_tfds(builder, info.tfds_name)
  splits = {}
  for split in ('train', 'test'):
    arrays = tfds_io.read_tfds_split(tfds, builder, split, limits[split])
    what = f"TFDS '{info.tfds_name}' split '{split}'"
    splits[split] = _make_split(
        np.asarray(arrays['image']), np.asarray(arrays['label']), info=info,
        limit=limits[split], images_what=what + ' images',
        labels_what=what + ' labels')
  return splits, f'TFDS {info.tfds_name} (data_dir={data_dir})'


# ----------------------------------------------------------------- resolving


def check_limit(field: str, value: int | None) -> None:
  """Checks a first-N limit such as `load_dataset`'s train_limit.

  Args:
    field: the option's name, for the message.
    value: None, or an integer >= 0 (0 means all examples).

  Raises:
    DataError: `value` is not one of those.
  """
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise DataError(f'{field} must be an integer or None, got {value!r}')
  if value < 0:
    raise DataError(f'{field} must be >= 0 (None or 0 means all examples), '
                    f'got {value}')


def _local_files(info: DatasetInfo) -> str:
  """What a data_dir must hold, for messages."""
  if info.layout is not None:
    return info.layout.describe()
  return f'the IDX files {", ".join(idx.IDX_FILE_NAMES)} (each may be .gz)'


def _how_to_get(info: DatasetInfo, searched: list[str], *,
                cache: str | None = None, problem: str | None = None,
                data_url: str | None = None) -> str:
  """The message for 'nothing found': where we looked, why downloading
  failed (`problem`), and how to get the data (by hand into `cache`)."""
  lines = [f'No {info.title} data found. Looked in:']
  lines += [f'  {s}' for s in searched]
  if problem:
    lines.append(f'Downloading failed: {problem}')
  lines.append('Get the data in one of these ways:')
  if info.install_hint:
    lines.append(f'  {info.install_hint}    (installs the IDX files in '
                 f'{info.idx_dirs[0]})')
  lines.append(f'  --config.data_dir=DIR    where DIR holds '
               f'{_local_files(info)}')
  if info.remote and not problem:
    lines.append('  --config.data_source=download    downloads them from '
                 f'{info.remote.base_url} and checks their checksums')
  if info.remote and cache:
    lines += download.how_to_download(info.remote, cache, data_url)
  lines.append('  --config.data_source=tfds    downloads with TFDS when a '
               'network is available (needs pip install tensorflow)')
  return '\n'.join(lines)


def known_idx_dir(info: DatasetInfo) -> str:
  """The first of `info.idx_dirs` ('~' expanded) holding any IDX file.

  Raises:
    DataError: none holds one; says where it looked and how to get the data.
  """
  for directory in map(os.path.expanduser, info.idx_dirs):
    if idx.find_idx_files(directory):
      return directory
  raise DataError(_how_to_get(
      info, [f'{d}    (IDX files)' for d in info.idx_dirs]))


def _auto(name: str, info: DatasetInfo, limits: Mapping[str, int | None],
          data_url: str | None) -> tuple[dict[str, Split], str]:
  """Known local IDX dirs, the download cache, TFDS data on disk, and then
  downloads (into the cache)."""
  searched = []
  for directory in info.idx_dirs:
    directory = os.path.expanduser(directory)
    found = idx.find_idx_files(directory)
    if found:  # A partial set is an error, not a reason to look elsewhere.
      return _load_idx_dir(directory, info, limits), _idx_source(directory)
    searched.append(f'{directory}    (IDX files)')
  cache = download.cache_dir(name)
  if info.remote and download.cached(info.remote, cache):
    return _load_local(cache, info, limits)
  searched.append(f'{cache}    (the download cache)')
  tfds_dir = tfds_io.tfds_data_dir()
  if (os.path.isdir(os.path.join(tfds_dir, info.tfds_name))
      and tfds_io.module_available('tensorflow_datasets')):
    loaded = _load_tfds(info, None, may_download=False, limits=limits)
    if loaded is not None:
      return loaded
  searched.append(f'{tfds_dir}    (prepared TFDS data '
                  f"'{info.tfds_name}')")
  if not info.remote:
    raise DataError(_how_to_get(info, searched))
  try:
    download.fetch(info.remote, cache, base_url=data_url)
  except download.NetworkError as e:
    raise DataError(_how_to_get(info, searched, cache=cache,
                                problem=e.problem, data_url=data_url)) from e
  return _load_local(cache, info, limits)


def _idx_source(directory: str) -> str:
  return f'IDX files in {directory}'


def load_dataset(name: str, *, data_dir: str | None = None,
                 source: str = 'auto', train_limit: int | None = None,
                 test_limit: int | None = None,
                 data_url: str | None = None) -> Dataset:
  """Loads a dataset's train and test splits into memory.

  Sources:
    'idx': the four IDX files in `data_dir`, or else in the first of the
      dataset's known directories that has them (not for CIFAR).
    'tfds': TFDS, in `data_dir` (TFDS's data_dir) if given; downloads and
      prepares the data if needed, which needs TensorFlow and a network.
    'download': the official files (`DatasetInfo.remote`) in `data_dir` if
      given, else in the download cache (`kd_jax.download.cache_dir`),
      downloaded from `data_url` there first unless present and verified.
    'auto': the files in `data_dir` if given (nothing else is tried then);
      else the known IDX directories; else the download cache; else TFDS
      data already prepared in TFDS's default data_dir; else downloads as
      'download' does (failing at once when offline, saying how to get it).

  Args:
    name: a key of `DATASETS`, e.g. 'fashion_mnist' or 'cifar100'.
    data_dir: a directory holding the IDX files or, for CIFAR, the archive
      or its extracted folder ('auto', 'idx'; for CIFAR also the archive
      itself); where to download to ('download'); TFDS's data_dir ('tfds').
    source: one of `SOURCES`.
    train_limit: keep the first N training examples; None or 0 keeps all.
    test_limit: keep the first N test examples; None or 0 keeps all.
    data_url: the directory URL of a mirror of the official files; None or
      '' for the canonical one (`DatasetInfo.remote.base_url`).

  Returns:
    A Dataset whose splits hold (N, H, W, C) float32 images in [0, 1] and (N,)
    int32 labels.

  Raises:
    DataError: unknown name or source, bad limits, data not found (with how
      to get it), a download that fails its checksums, or malformed files
      (naming the file).
  """
  if name not in DATASETS:
    raise DataError(f'Unknown dataset {name!r}; known datasets: '
                    f'{", ".join(sorted(DATASETS))}')
  if source not in SOURCES:
    raise DataError(f'Unknown data source {source!r}; expected one of '
                    f'{", ".join(SOURCES)}')
  check_limit('train_limit', train_limit)
  check_limit('test_limit', test_limit)
  info = DATASETS[name]
  limits = {'train': train_limit, 'test': test_limit}

  data_url = data_url or None
  if source == 'tfds':
    splits, description = _load_tfds(info, data_dir, may_download=True,
                                     limits=limits)
  elif source == 'download':
    if not info.remote:
      raise DataError(f'{info.title} has no known download; use another '
                      'data source')
    directory = download.fetch(
        info.remote, os.path.expanduser(data_dir or download.cache_dir(name)),
        base_url=data_url)
    splits, description = _load_local(directory, info, limits)
  elif source == 'idx' and info.layout:
    raise DataError(f"data source 'idx' reads MNIST-format IDX files; "
                    f"{info.title} comes as a python archive: use 'auto' or "
                    "'download'")
  elif data_dir:
    directory = os.path.expanduser(data_dir)
    if not (os.path.isdir(directory) or info.layout and os.path.isfile(
        directory)):
      raise DataError(f'data_dir {directory} is not a directory; it must hold '
                      f'{_local_files(info)}')
    splits, description = _load_local(directory, info, limits)
  elif source == 'idx':
    directory = known_idx_dir(info)
    splits, description = (_load_idx_dir(directory, info, limits),
                           _idx_source(directory))
  else:
    splits, description = _auto(name, info, limits, data_url)
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
