"""Provenance (kd_jax.provenance): which code, config, data, packages and
devices produced a result; what a resume and a sweep make of it."""

import hashlib
import os
import subprocess

import numpy as np
import pytest

from experiments import seed
from kd_jax import data as data_lib
from kd_jax import provenance
from kd_jax import streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_head() -> str | None:
  try:
    return subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'],
                          capture_output=True, text=True, check=True
                          ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


@pytest.mark.skipif(_git_head() is None, reason='not a git checkout')
def test_code_version_is_the_checkout_commit():
  version = provenance.code_version()
  assert version['git_commit'] == _git_head()
  assert isinstance(version['dirty'], bool)


def test_code_version_outside_a_checkout_is_the_package_version(
    monkeypatch, tmp_path):
  # An installed kd_jax: its directory is in no git checkout of its own.
  (tmp_path / 'kd_jax').mkdir()
  monkeypatch.setattr(provenance.kd_jax, '__file__',
                      str(tmp_path / 'kd_jax' / '__init__.py'))
  assert provenance.code_version() == {
      'package_version': provenance.kd_jax.__version__}


def test_config_fingerprint_ignores_what_does_not_change_the_result():
  config = seed.get_config('quick')
  fingerprint = provenance.config_sha256(config)
  config.plots, config.stages, config.name = False, 'teacher', 'other'
  assert provenance.config_sha256(config) == fingerprint
  config.distill.kd.temperature = 3.0
  assert provenance.config_sha256(config) != fingerprint


def _dataset(images, labels, test_images, test_labels):
  return data_lib.Dataset('tiny', data_lib.Split(images, labels),
                          data_lib.Split(test_images, test_labels), 10,
                          'made here')


def test_data_fingerprint_is_of_the_pixels_and_labels_in_order():
  rng = np.random.RandomState(0)
  pixels = rng.randint(0, 256, (6, 2, 2, 1)).astype(np.uint8)
  labels = rng.randint(0, 10, 6).astype(np.int32)
  images = data_lib.unit_float(pixels)
  dataset = _dataset(images[:4], labels[:4], images[4:], labels[4:])
  # Independently: the splits' uint8 pixels and int32 labels, in order.
  digest = hashlib.sha256()
  for name, rows in (('train', slice(0, 4)), ('test', slice(4, 6))):
    digest.update(f'{name}|{len(labels[rows])}|'.encode())
    digest.update(pixels[rows].tobytes() + labels[rows].tobytes())
  assert provenance.data_sha256(dataset) == digest.hexdigest()
  changed = labels.copy()
  changed[5] = (changed[5] + 1) % 10
  assert provenance.data_sha256(_dataset(
      images[:4], labels[:4], images[4:], changed[4:])) != digest.hexdigest()
  # The same examples split differently are other data.
  assert provenance.data_sha256(_dataset(
      images[:3], labels[:3], images[3:], labels[3:])) != digest.hexdigest()


def test_a_streamed_split_has_the_fingerprint_of_the_same_split_in_memory(
    tiny_idx_dir, tmp_path):
  in_memory = data_lib.load_dataset('fashion_mnist', data_dir=tiny_idx_dir,
                                    source='idx')
  streamed = streaming.load_streaming_dataset(
      'fashion_mnist', data_dir=tiny_idx_dir, source='idx',
      cache_dir=str(tmp_path))
  mixed = data_lib.Dataset('fashion_mnist', streamed.train, in_memory.test,
                           10, 'streamed')
  assert provenance.data_sha256(mixed) == provenance.data_sha256(in_memory)


def _row(commit, data='d1'):
  return {'provenance': {'code_version': {'git_commit': commit,
                                          'dirty': False},
                         'data_sha256': data, 'config_sha256': 'c'}}


def test_resumed_notes_what_differs_from_the_earlier_stages():
  earlier = _row('a')['provenance']
  assert provenance.resumed(dict(earlier), earlier) == earlier
  assert provenance.resumed(dict(earlier), None) == earlier
  later = _row('b', 'd2')['provenance']
  assert provenance.resumed(later, earlier)[
      'differs_from_earlier_stages'] == ['code_version', 'data_sha256']


def test_a_table_from_mixed_code_or_data_says_so():
  assert provenance.mixed_sources_warning([_row('a'), _row('a')]) is None
  assert 'different code_version' in provenance.mixed_sources_warning(
      [_row('a'), _row('b')])
  assert 'different code_version and data' in (
      provenance.mixed_sources_warning([_row('a'), _row('b', 'd2')]))
  assert provenance.mixed_sources_warning([_row('a'), {}]) is None
