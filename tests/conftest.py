"""Shared fixtures."""

import pytest

from synthetic import write_idx_dataset


@pytest.fixture(scope='session')
def tiny_idx_dir(tmp_path_factory) -> str:
  """512 train / 200 test synthetic examples, 10 classes, as .gz IDX files."""
  return write_idx_dataset(str(tmp_path_factory.mktemp('tiny_idx')), 512, 200)
