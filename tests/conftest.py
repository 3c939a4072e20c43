"""Shared fixtures, and XLA set up for fast tests.

Tests check numbers and plumbing, not speed, so for this process and every
subprocess it starts (pytest-xdist workers, `run.py` runs):
  * XLA's optimisations are turned down (as Flax's `train_test.py` does),
    and XLA:CPU emits fused loops with its older emitters, which compile
    2-3x faster again (a tiny program: 20 ms instead of 35 ms; a
    convolution's gradient 26 ms instead of 66 ms) and compute the same
    values up to rounding;
  * convolutions run in Eigen rather than YNNPACK, as the entry points
    run them (`kd_jax.cli.use_eigen_cpu_convolutions`);
  * compiled programs go to a persistent compilation cache made fresh for
    this test session, so the many runs of the same tiny experiment compile
    each program once.
"""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
FAST_COMPILE_XLA_FLAGS = '--xla_cpu_use_fusion_emitters=false'
if FAST_COMPILE_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', ''), FAST_COMPILE_XLA_FLAGS]).strip()
# Convolutions in Eigen, as every entry point runs them.
from kd_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
cli.use_eigen_cpu_convolutions()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'KD_JAX_TEST_CACHE' not in os.environ:  # The session's first process.
  os.environ['KD_JAX_TEST_CACHE'] = tempfile.mkdtemp(prefix='kd_jax_tests_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['KD_JAX_TEST_CACHE']
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  _OWNS_CACHE = True
else:
  _OWNS_CACHE = False

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from synthetic import write_idx_dataset  # pylint: disable=g-import-not-at-top


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ['KD_JAX_TEST_CACHE'], ignore_errors=True)


@pytest.fixture(scope='session')
def tiny_idx_dir(tmp_path_factory) -> str:
  """512 train / 200 test synthetic examples, 10 classes, as .gz IDX files."""
  return write_idx_dataset(str(tmp_path_factory.mktemp('tiny_idx')), 512, 200)
