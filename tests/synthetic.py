"""Tiny synthetic datasets in the official formats: MNIST-format IDX files
(learnable) and CIFAR python archives (pickled as the originals were)."""

import io
import os
import struct
import tarfile

import numpy as np

from kd_jax import cifar
from kd_jax import data


def synthetic_images(labels: np.ndarray, seed: int,
                     noise: int = 60) -> np.ndarray:
  """`(N, 28, 28)` uint8 images in which class c is a bright 7x7 block at a
  position that depends on c, plus uniform noise in [0, `noise`): learnable
  in one epoch at the default noise, harder as `noise` nears 255."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, noise, size=(len(labels), 28, 28), dtype=np.uint8)
  for i, label in enumerate(labels):
    row, col = divmod(int(label), 4)
    images[i, 7 * row:7 * row + 7, 7 * col:7 * col + 7] = 255
  return images


def write_idx_dataset(directory: str, num_train: int, num_test: int,
                      num_classes: int = 10, seed: int = 0,
                      noise: int = 60) -> str:
  """Writes the four MNIST-format files of a synthetic dataset; returns dir.

  `noise` as in `synthetic_images`.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    labels = rng.integers(0, num_classes, size=n).astype(np.uint8)
    data.write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
                   synthetic_images(labels, seed + n, noise))
    data.write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'),
                   labels)
  return directory


def py2_str(value: bytes) -> bytes:
  """A Python 2 str: SHORT_BINSTRING or BINSTRING."""
  if len(value) < 256:
    return b'U' + bytes([len(value)]) + value
  return b'T' + struct.pack('<i', len(value)) + value


def _py2_int(value: int) -> bytes:
  return b'J' + struct.pack('<i', value)  # BININT


def _py2_array(array: np.ndarray) -> bytes:
  """A numeric ndarray as numpy 1 under Python 2 pickled it."""
  endian, code = array.dtype.str[0].encode(), array.dtype.str[1:].encode()
  dtype = (b'cnumpy\ndtype\n' + py2_str(code) + _py2_int(0) + _py2_int(1)
           + b'\x87R(' + _py2_int(3) + py2_str(endian) + b'NNN'
           + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b'tb')
  shape = b'(' + b''.join(_py2_int(d) for d in array.shape) + b't'
  return (b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n'
          + _py2_int(0) + b'\x85' + py2_str(b'b') + b'\x87R(' + _py2_int(1)
          + shape + dtype + b'\x89' + py2_str(array.tobytes()) + b'tb')


def py2_pickle(batch: dict) -> bytes:
  """`batch` ({bytes: uint8 ndarray or list of ints}) pickled as the
  official CIFAR batches are: by Python 2's cPickle, protocol 2."""
  out = [b'\x80\x02}(']
  for key, value in batch.items():
    out.append(py2_str(key))
    if isinstance(value, np.ndarray):
      out.append(_py2_array(value))
    else:
      out.append(b'](' + b''.join(_py2_int(v) for v in value) + b'e')
  out.append(b'u.')
  return b''.join(out)


def make_batch(num, num_classes, seed_=0, label_key=b'labels'):
  """A batch dict: (num, 3072) uint8 rows and `label_key` labels."""
  rng = np.random.default_rng(seed_)
  batch = {b'batch_label': b'testing batch 1 of 1',
           b'data': rng.integers(0, 256, (num, 3072), dtype=np.uint8),
           label_key: rng.integers(0, num_classes, num).tolist()}
  if label_key == b'fine_labels':
    batch[b'coarse_labels'] = [99 - v // 5 for v in batch[label_key]]
  return batch


def write_cifar(directory, name, *, num=4, as_folder=False, batches=None,
                pickler=py2_pickle):
  """Writes dataset `name`'s archive (or extracted folder) into `directory`.

  Returns:
    (path written, {batch name: batch dict}).
  """
  layout = cifar.LAYOUTS[name]
  if batches is None:
    batch_names = [n for names in layout.batches.values() for n in names]
    batches = {n: make_batch(num, layout.num_classes, i, layout.label_key)
               for i, n in enumerate(batch_names)}
  os.makedirs(directory, exist_ok=True)
  if as_folder:
    folder = os.path.join(directory, layout.folder)
    os.makedirs(folder, exist_ok=True)
    for batch_name, batch in batches.items():
      with open(os.path.join(folder, batch_name), 'wb') as f:
        f.write(batch if isinstance(batch, bytes) else pickler(batch))
    return folder, batches
  path = os.path.join(directory, layout.archive)
  with tarfile.open(path, 'w:gz') as tar:
    for batch_name, batch in batches.items():
      raw = batch if isinstance(batch, bytes) else pickler(batch)
      info = tarfile.TarInfo(f'{layout.folder}/{batch_name}')
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return path, batches
