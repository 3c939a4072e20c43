"""TensorFlow Datasets, imported only when used.

Importing this module does not import TFDS or TensorFlow: `kd_jax.data` must
load IDX files on machines that have neither. Errors name the missing package
and the pip command that installs it.
"""

from __future__ import annotations

from collections.abc import Iterable
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import numpy as np

from kd_jax.errors import DataError


def module_available(name: str) -> bool:
  """Whether the module `name` can be imported, without importing it."""
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def tfds_data_dir() -> str:
  """TFDS's default data_dir, found without importing TFDS."""
  return os.path.expanduser(
      os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def import_tfds() -> ModuleType:
  """Imports and returns `tensorflow_datasets`.

  Raises:
    DataError: it is not installed (saying how to install it).
  """
  try:
    return importlib.import_module('tensorflow_datasets')
  except ImportError as e:
    raise DataError('source=tfds needs tensorflow-datasets: '
                    'pip install tensorflow-datasets') from e


def prepare_tfds(builder: Any, tfds_name: str) -> None:
  """Downloads and prepares `builder`'s data; needs TensorFlow and a network.

  Args:
    builder: a `tfds.core.DatasetBuilder`.
    tfds_name: the builder's name, for messages.

  Raises:
    DataError: a package it needs is missing, or the download failed.
  """
  where = f"TFDS '{tfds_name}' into {builder.data_dir}"
  problems = []
  # The TFDS MNIST builders read the IDX files with tf.io.gfile and encode
  # images with tf.image.encode_png, whatever the file format.
  if not module_available('tensorflow'):
    problems.append(
        'TensorFlow, which is not installed: pip install tensorflow')
  # tensorflow-datasets 4.9.10 imports it in download_and_prepare but does not
  # declare it (tensorflow/datasets#11212).
  if not module_available('importlib_resources'):
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


def file_format(builder: Any) -> str:
  """The file format of `builder`'s prepared data, e.g. 'array_record'."""
  return getattr(builder.info.file_format, 'value', None) or 'tfrecord'


def read_records(data_source: Any, indices: Iterable[int],
                 where: str) -> list[dict[str, Any]]:
  """Decodes some records of a TFDS data source, without TensorFlow.

  Args:
    data_source: `builder.as_data_source(split=...)` of array_record data.
    indices: which records, in the order wanted.
    where: names the split in messages.

  Returns:
    One {'image': (H, W, C) uint8, 'label': () integer} per index.

  Raises:
    DataError: Pillow, which decodes the PNG images, is missing.
  """
  try:
    return [data_source[i] for i in indices]
  except ImportError as e:
    raise DataError(f'Decoding the PNG images of {where} without '
                    'TensorFlow needs Pillow: pip install pillow') from e


def read_tfds_split(tfds: ModuleType, builder: Any, split: str,
                    limit: int | None) -> dict[str, np.ndarray]:
  """Reads the first `limit` examples (all for None or 0) of a prepared split.

  array_record data is read without TensorFlow; tfrecord data needs it.

  Args:
    tfds: the `tensorflow_datasets` module.
    builder: a prepared `tfds.core.DatasetBuilder`.
    split: e.g. 'train'.
    limit: how many examples to read; None or 0 for all.

  Returns:
    {'image': (N, H, W, C), 'label': (N,)} as the builder stores them (uint8
    pixels, integer labels).

  Raises:
    DataError: a package needed to read or decode the data is missing.
  """
  stored_as = file_format(builder)
  where = f"TFDS '{builder.name}' split '{split}' in {builder.data_dir}"
  if stored_as == 'array_record':
    # Random-access reading works without TensorFlow.
    source = builder.as_data_source(split=split)
    count = min(limit, len(source)) if limit else len(source)
    examples = read_records(source, range(count), where)
    return {'image': np.stack([ex['image'] for ex in examples]),
            'label': np.array([ex['label'] for ex in examples])}
  if not module_available('tensorflow'):
    raise DataError(f'{where} is stored as {stored_as}, which only '
                    'TensorFlow reads: pip install tensorflow')
  split_spec = f'{split}[:{limit}]' if limit else split
  return tfds.as_numpy(builder.as_dataset(split=split_spec, batch_size=-1))
