"""Tiny, learnable synthetic datasets written as MNIST-format IDX files."""

import os

import numpy as np

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
