"""Tests for kd_jax.data: IDX files, dataset resolution, TFDS, batching.

Hermetic: datasets are tiny IDX files written into tmp_path, TFDS is mocked
with `tfds.testing.mock_data`, the known local directories, the download
cache and TFDS's data_dir are pointed into tmp_path, and the download mirrors
at a closed port on 127.0.0.1. Only `test_real_fashion_mnist` reads
/usr/share, and it is skipped where that is not installed.
"""

import contextlib
import dataclasses
import gzip
import os
import socket
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from kd_jax import data
from kd_jax import errors
from kd_jax import tfds_io

_REAL_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


# ------------------------------------------------------------------- fixtures


def _random_split(rng, num_examples, num_classes=10, hw=(28, 28)):
  """(N, H, W) uint8 images and (N,) uint8 labels."""
  images = rng.integers(0, 256, (num_examples,) + hw, dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_examples, dtype=np.uint8)
  return images, labels


def write_idx_dataset(directory, *, num_train=12, num_test=7, gz=False,
                      seed=0):
  """Writes the four IDX files of a tiny random dataset into `directory`.

  Returns:
    {'train': (images, labels), 'test': (images, labels)} as uint8 arrays, and
    {file name: path}.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {'train': _random_split(rng, num_train),
            'test': _random_split(rng, num_test)}
  paths = {}
  for split, names in data.IDX_FILES.items():
    for name, array in zip(names, arrays[split]):
      paths[name] = os.path.join(directory, name + ('.gz' if gz else ''))
      data.write_idx(paths[name], array)
  return arrays, paths


def closed_port_url():
  """An http:// URL on 127.0.0.1 where nothing listens (refused at once)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'http://127.0.0.1:{s.getsockname()[1]}/'


@pytest.fixture
def no_known_sources(tmp_path, monkeypatch):
  """Points every dataset's known IDX dirs, the download cache and TFDS's
  data_dir at empty dirs, and its download mirror at a closed port."""
  mirror = closed_port_url()
  for name, info in list(data.DATASETS.items()):
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(
        info, idx_dirs=(str(tmp_path / 'known' / name),) * bool(
            info.idx_dirs),
        remote=dataclasses.replace(info.remote, base_url=mirror)))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setenv('KD_JAX_DATA_CACHE', str(tmp_path / 'cache'))
  return tmp_path


@contextlib.contextmanager
def mock_prepared_tfds(num_examples, file_format='array_record'):
  """TFDS data that looks prepared on disk in `file_format`, with fake rows."""
  tfds = pytest.importorskip('tensorflow_datasets')
  file_format = tfds.core.file_adapters.FileFormat(file_format)
  with (
      tfds.testing.mock_data(num_examples=num_examples,
                             policy=tfds.testing.MockPolicy.USE_CODE),
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared',
                        return_value=True),
      mock.patch.object(tfds.core.DatasetInfo, 'file_format',
                        new_callable=mock.PropertyMock,
                        return_value=file_format),
  ):
    yield


# ------------------------------------------------------------------ IDX files


@pytest.mark.parametrize('suffix', ['', '.gz'])
@pytest.mark.parametrize('array', [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([3, 0, 255, 7], np.uint8),
    np.array([-5, 70000], np.int32),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
], ids=['uint8-3d', 'uint8-1d', 'int32', 'float32'])
def test_idx_round_trip(tmp_path, array, suffix):
  path = str(tmp_path / ('x.idx' + suffix))
  data.write_idx(path, array)
  result = data.read_idx(path)
  assert result.dtype == array.dtype
  np.testing.assert_array_equal(result, array)


def test_write_idx_compresses_gz_paths(tmp_path):
  path = str(tmp_path / 'x.gz')
  data.write_idx(path, np.zeros(100, np.uint8))
  with gzip.open(path) as f:
    assert f.read()[:4] == bytes([0, 0, 0x08, 1])


def test_write_idx_rejects_unencodable_dtype(tmp_path):
  with pytest.raises(ValueError, match='IDX cannot store'):
    data.write_idx(str(tmp_path / 'x'), np.zeros(3, np.int64))


def _idx_bytes(tmp_path, array):
  path = str(tmp_path / 'ok.idx')
  data.write_idx(path, array)
  with open(path, 'rb') as f:
    return f.read()


def _gzip_bytes(tmp_path, array):
  path = str(tmp_path / 'ok.gz')
  data.write_idx(path, array)
  with open(path, 'rb') as f:
    return f.read()


@pytest.mark.parametrize('name,make_bytes,match', [
    ('truncated', lambda p, a: _idx_bytes(p, a)[:-5], 'truncated IDX'),
    ('over-long', lambda p, a: _idx_bytes(p, a) + b'xx', 'over-long IDX'),
    ('short-header', lambda p, a: _idx_bytes(p, a)[:9], 'truncated IDX'),
    ('tiny', lambda p, a: b'\x00', 'truncated IDX'),
    ('bad-magic', lambda p, a: b'\x08\x03' + _idx_bytes(p, a)[2:],
     'magic number'),
    ('bad-type', lambda p, a: b'\x00\x00\x07' + _idx_bytes(p, a)[3:],
     'magic number'),
    ('corrupt.gz',
     lambda p, a: _gzip_bytes(p, a)[:12] + b'\xff' * 8 + _gzip_bytes(p, a)[20:],
     'corrupt gzip'),
    ('cut.gz', lambda p, a: _gzip_bytes(p, a)[:-10], 'corrupt gzip'),
    ('plain.gz', lambda p, a: _idx_bytes(p, a), 'corrupt gzip'),
])
def test_read_idx_rejects_bad_files_naming_them(tmp_path, name, make_bytes,
                                                match):
  array = np.random.default_rng(0).integers(0, 256, (5, 4, 4), dtype=np.uint8)
  path = str(tmp_path / name)
  with open(path, 'wb') as f:
    f.write(make_bytes(tmp_path, array))
  with pytest.raises(data.DataError, match=match) as e:
    data.read_idx(path)
  assert path in str(e.value)


def test_read_idx_missing_file(tmp_path):
  path = str(tmp_path / 'nope')
  with pytest.raises(data.DataError, match='cannot read') as e:
    data.read_idx(path)
  assert path in str(e.value)


def test_data_error_is_a_user_input_error():
  assert issubclass(data.DataError, errors.UserInputError)


# -------------------------------------------------------------- load_dataset


@pytest.mark.parametrize('gz', [False, True])
def test_load_dataset_from_data_dir(tmp_path, gz):
  arrays, _ = write_idx_dataset(tmp_path, num_train=12, num_test=7, gz=gz)
  ds = data.load_dataset('fashion_mnist', data_dir=str(tmp_path))
  assert ds.name == 'fashion_mnist' and ds.num_classes == 10
  assert str(tmp_path) in ds.source
  for split, n in [(ds.train, 12), (ds.test, 7)]:
    assert split.images.shape == (n, 28, 28, 1)
    assert split.images.dtype == np.float32
    assert split.labels.shape == (n,) and split.labels.dtype == np.int32
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
  np.testing.assert_array_equal(ds.train.images[..., 0] * 255,
                                arrays['train'][0].astype(np.float32))
  np.testing.assert_array_equal(ds.test.labels, arrays['test'][1])


@pytest.mark.parametrize('source', ['auto', 'idx'])
@pytest.mark.parametrize('train_limit,test_limit,expected', [
    (5, 3, (5, 3)), (None, 2, (12, 2)), (0, 0, (12, 7)), (100, None, (12, 7)),
])
def test_load_dataset_limits(tmp_path, source, train_limit, test_limit,
                             expected):
  arrays, _ = write_idx_dataset(tmp_path)
  ds = data.load_dataset('mnist', data_dir=str(tmp_path), source=source,
                         train_limit=train_limit, test_limit=test_limit)
  assert (ds.train.num_examples, ds.test.num_examples) == expected
  np.testing.assert_array_equal(ds.train.labels,
                                arrays['train'][1][:expected[0]])


@pytest.mark.parametrize('field', ['train_limit', 'test_limit'])
@pytest.mark.parametrize('value', [-1, 2.5, True])
def test_load_dataset_rejects_bad_limits(tmp_path, field, value):
  write_idx_dataset(tmp_path)
  with pytest.raises(data.DataError, match=field):
    data.load_dataset('mnist', data_dir=str(tmp_path), **{field: value})


def test_load_dataset_count_mismatch_names_both_files(tmp_path):
  _, paths = write_idx_dataset(tmp_path, num_test=7)
  labels_path = paths['t10k-labels-idx1-ubyte']
  data.write_idx(labels_path, np.zeros(6, np.uint8))
  with pytest.raises(data.DataError, match='7 images .* 6 labels') as e:
    data.load_dataset('mnist', data_dir=str(tmp_path))
  assert labels_path in str(e.value)
  assert paths['t10k-images-idx3-ubyte'] in str(e.value)


def test_load_dataset_labels_out_of_range_names_file(tmp_path):
  _, paths = write_idx_dataset(tmp_path, num_train=12)
  labels_path = paths['train-labels-idx1-ubyte']
  labels = np.zeros(12, np.uint8)
  labels[4] = 10
  data.write_idx(labels_path, labels)
  with pytest.raises(data.DataError, match=r'\[0, 10\).*index 4') as e:
    data.load_dataset('mnist', data_dir=str(tmp_path))
  assert labels_path in str(e.value)


@pytest.mark.parametrize('file_name,array,match', [
    ('train-images-idx3-ubyte', np.zeros((12, 28 * 28), np.uint8),
     r'\(N, 28, 28\)'),
    ('train-images-idx3-ubyte', np.zeros((12, 28, 27), np.uint8),
     r'\(N, 28, 28\)'),
    ('train-images-idx3-ubyte', np.zeros((12, 28, 28), np.int32), 'uint8'),
    # Float pixels (where NaN could hide) are refused by their type.
    ('train-images-idx3-ubyte', np.full((12, 28, 28), np.nan, np.float32),
     'expected uint8 pixels, got float32'),
    ('train-labels-idx1-ubyte', np.zeros((12, 1), np.uint8), '1-D'),
    ('train-labels-idx1-ubyte', np.zeros(0, np.uint8), '12 images .* 0'),
])
def test_load_dataset_rejects_bad_shapes_naming_file(tmp_path, file_name,
                                                     array, match):
  _, paths = write_idx_dataset(tmp_path, num_train=12)
  data.write_idx(paths[file_name], array)
  with pytest.raises(data.DataError, match=match) as e:
    data.load_dataset('mnist', data_dir=str(tmp_path))
  assert paths[file_name] in str(e.value)


def test_load_dataset_data_dir_missing_files(tmp_path):
  _, paths = write_idx_dataset(tmp_path)
  os.remove(paths['t10k-images-idx3-ubyte'])
  with pytest.raises(data.DataError) as e:
    data.load_dataset('fashion_mnist', data_dir=str(tmp_path))
  message = str(e.value)
  assert str(tmp_path) in message
  assert 't10k-images-idx3-ubyte' in message
  assert 'train-images-idx3-ubyte' in message  # Lists all four expected.


def test_load_dataset_data_dir_does_not_fall_back(no_known_sources):
  known = data.DATASETS['fashion_mnist'].idx_dirs[0]
  write_idx_dataset(known)
  empty = no_known_sources / 'empty'
  empty.mkdir()
  with pytest.raises(data.DataError, match='train-labels-idx1-ubyte') as e:
    data.load_dataset('fashion_mnist', data_dir=str(empty))
  assert str(empty) in str(e.value)
  with pytest.raises(data.DataError, match='not a directory'):
    data.load_dataset('fashion_mnist', data_dir=str(empty / 'nope'))


@pytest.mark.parametrize('source', ['auto', 'idx'])
def test_load_dataset_finds_known_idx_dir(no_known_sources, source):
  known = data.DATASETS['fashion_mnist'].idx_dirs[0]
  write_idx_dataset(known, gz=True)
  ds = data.load_dataset('fashion_mnist', source=source)
  assert ds.source == f'IDX files in {known}'
  assert ds.train.images.shape == (12, 28, 28, 1)


def test_load_dataset_auto_nothing_found_says_how_to_get_it(
    no_known_sources):
  with pytest.raises(data.DataError) as e:
    data.load_dataset('fashion_mnist')
  message = str(e.value)
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '--config.data_dir=DIR' in message
  assert '--config.data_source=tfds' in message
  assert data.DATASETS['fashion_mnist'].idx_dirs[0] in message
  assert str(no_known_sources / 'tfds') in message
  # 'auto' tried to download last, and says how to get the files by hand.
  mirror = data.DATASETS['fashion_mnist'].remote.base_url
  assert f'Downloading failed: Cannot download {mirror}' in message
  assert str(no_known_sources / 'cache' / 'fashion_mnist') in message
  assert '--config.data_url=URL' in message
  with pytest.raises(data.DataError) as e:
    data.load_dataset('mnist', source='idx')
  assert 'apt-get' not in str(e.value)  # Debian has no MNIST package.
  assert '--config.data_source=tfds' in str(e.value)


def test_load_dataset_auto_partial_known_dir_is_an_error(no_known_sources):
  known = data.DATASETS['mnist'].idx_dirs[0]
  _, paths = write_idx_dataset(known)
  os.remove(paths['train-labels-idx1-ubyte'])
  with pytest.raises(data.DataError, match='lacks .*train-labels-idx1-ubyte'):
    data.load_dataset('mnist')


def test_load_dataset_unknown_name_and_source(tmp_path):
  with pytest.raises(data.DataError, match='fashion_mnist, mnist'):
    data.load_dataset('cifar11')
  with pytest.raises(data.DataError, match='auto, idx, tfds'):
    data.load_dataset('mnist', source='web')


def test_split_checks_its_arrays():
  with pytest.raises(data.DataError, match='float32'):
    data.Split(images=np.zeros((2, 28, 28, 1), np.uint8),
               labels=np.zeros(2, np.int32))
  with pytest.raises(data.DataError, match='2 images but 3 labels'):
    data.Split(images=np.zeros((2, 28, 28, 1), np.float32),
               labels=np.zeros(3, np.int32))


def test_import_does_not_import_tfds():
  code = ('import sys, kd_jax.data; '
          'assert "tensorflow_datasets" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)))


# ----------------------------------------------------------------------- TFDS


def test_tfds_reads_prepared_array_record(tmp_path):
  with mock_prepared_tfds(num_examples=9):
    ds = data.load_dataset('mnist', source='tfds', data_dir=str(tmp_path),
                           test_limit=4)
  assert ds.source.startswith('TFDS mnist')
  assert ds.train.images.shape == (9, 28, 28, 1)
  assert ds.train.images.dtype == np.float32
  assert 0 <= ds.train.images.min() and ds.train.images.max() <= 1
  assert ds.test.labels.shape == (4,) and ds.test.labels.dtype == np.int32
  assert ds.test.labels.max() < 10


def test_tfds_tfrecord_without_tensorflow_says_pip_install(tmp_path,
                                                          monkeypatch):
  monkeypatch.setattr(tfds_io, 'module_available',
                      lambda name: name != 'tensorflow')
  with mock_prepared_tfds(num_examples=3, file_format='tfrecord'):
    with pytest.raises(data.DataError, match='pip install tensorflow'):
      data.load_dataset('mnist', source='tfds', data_dir=str(tmp_path))


def test_tfds_download_without_tensorflow_says_pip_install(tmp_path,
                                                          monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(tfds_io, 'module_available',
                      lambda name: name != 'tensorflow')
  with pytest.raises(data.DataError, match='pip install tensorflow') as e:
    data.load_dataset('fashion_mnist', source='tfds', data_dir=str(tmp_path))
  assert str(tmp_path) in str(e.value)


def test_tfds_downloads_when_not_prepared(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(tfds_io, 'module_available', lambda name: True)
  with (
      mock_prepared_tfds(num_examples=2),
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared',
                        return_value=False),
      mock.patch.object(tfds.core.DatasetBuilder,
                        'download_and_prepare') as prepare,
  ):
    ds = data.load_dataset('mnist', source='tfds', data_dir=str(tmp_path))
  prepare.assert_called_once()
  assert ds.train.num_examples == 2


def test_auto_uses_prepared_tfds_data(no_known_sources):
  (no_known_sources / 'tfds' / 'fashion_mnist').mkdir(parents=True)
  with mock_prepared_tfds(num_examples=5):
    ds = data.load_dataset('fashion_mnist')
  assert ds.source.startswith('TFDS fashion_mnist')
  assert ds.train.num_examples == 5


def test_auto_never_downloads_through_tfds(no_known_sources):
  # It downloads the official files itself (from the fixture's closed port).
  tfds = pytest.importorskip('tensorflow_datasets')
  (no_known_sources / 'tfds' / 'mnist').mkdir(parents=True)  # Not prepared.
  with mock.patch.object(tfds.core.DatasetBuilder,
                         'download_and_prepare') as prepare:
    with pytest.raises(data.DataError, match='No MNIST data found'):
      data.load_dataset('mnist')
  prepare.assert_not_called()


# -------------------------------------------------------------------- batches


def test_epoch_permutation_is_a_function_of_seed_and_epoch():
  a = data.epoch_permutation(seed=3, epoch=1, num_examples=50)
  np.testing.assert_array_equal(a, data.epoch_permutation(3, 1, 50))
  np.testing.assert_array_equal(np.sort(a), np.arange(50))
  assert np.issubdtype(a.dtype, np.integer)
  assert not np.array_equal(a, data.epoch_permutation(3, 2, 50))
  assert not np.array_equal(a, data.epoch_permutation(4, 1, 50))
  with pytest.raises(errors.UserInputError, match='seed'):
    data.epoch_permutation(-1, 0, 5)


def _split(num_examples):
  """Images whose pixels all equal the example's index / 1000."""
  images = np.broadcast_to(
      (np.arange(num_examples, dtype=np.float32) / 1000)[:, None, None, None],
      (num_examples, 28, 28, 1)).copy()
  return data.Split(images=images,
                    labels=np.arange(num_examples, dtype=np.int32) % 10)


def _indices(batch):
  return np.round(batch['image'][:, 0, 0, 0] * 1000).astype(int)


def test_train_batches_full_batches_each_example_at_most_once():
  split = _split(10)
  batches = list(data.train_batches(split, 3, seed=0, epoch=0))
  assert len(batches) == data.num_train_batches(10, 3) == 3
  for batch in batches:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (3, 28, 28, 1)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (3,) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['label'], _indices(batch) % 10)
  seen = np.concatenate([_indices(b) for b in batches])
  assert len(set(seen)) == 9
  np.testing.assert_array_equal(seen, data.epoch_permutation(0, 0, 10)[:9])
  later = list(data.train_batches(split, 3, seed=0, epoch=1))
  assert not np.array_equal(seen, np.concatenate([_indices(b) for b in later]))


def test_train_batches_resume_part_way():
  split = _split(20)
  full = list(data.train_batches(split, 4, seed=1, epoch=2))
  resumed = list(data.train_batches(split, 4, seed=1, epoch=2, start_batch=3))
  assert len(resumed) == 2
  np.testing.assert_array_equal(resumed[0]['label'], full[3]['label'])


def test_train_batches_rejects_batch_larger_than_split():
  with pytest.raises(data.DataError, match='fewer than one batch'):
    next(data.train_batches(_split(5), 8, seed=0, epoch=0))


@pytest.mark.parametrize('num_examples,batch_size', [(10, 4), (8, 4), (3, 8)])
def test_eval_batches_cover_every_example_once(num_examples, batch_size):
  split = _split(num_examples)
  batches = list(data.eval_batches(split, batch_size))
  assert len(batches) == data.num_eval_batches(num_examples, batch_size)
  for batch in batches:
    assert batch['image'].shape == (batch_size, 28, 28, 1)
    assert batch['label'].shape == batch['mask'].shape == (batch_size,)
    assert batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  num_padding = len(batches) * batch_size - num_examples
  np.testing.assert_array_equal(
      mask, [1.0] * num_examples + [0.0] * num_padding)
  real = mask.astype(bool)
  np.testing.assert_array_equal(
      np.concatenate([b['image'] for b in batches])[real], split.images)
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in batches])[real], split.labels)
  assert not np.concatenate([b['image'] for b in batches])[~real].any()


def test_batch_size_must_be_positive():
  with pytest.raises(errors.UserInputError, match='batch_size'):
    list(data.eval_batches(_split(3), 0))
  with pytest.raises(errors.UserInputError, match='batch_size'):
    data.num_train_batches(3, 0)


# ------------------------------------------------------------------ real data


@pytest.mark.skipif(not os.path.isdir(_REAL_FASHION_MNIST),
                    reason='needs apt-get install dataset-fashion-mnist')
def test_real_fashion_mnist():
  ds = data.load_dataset('fashion_mnist', data_dir=_REAL_FASHION_MNIST)
  assert ds.num_classes == 10
  assert ds.train.images.shape == (60000, 28, 28, 1)
  assert ds.test.images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
  assert ds.train.images.max() == 1.0


def test_validation_split_is_fixed_disjoint_and_checked():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(100, 28, 28, 1)).astype(np.float32)
  labels = np.arange(100, dtype=np.int32) % 10
  dataset = data.Dataset(name='fashion_mnist',
                         train=data.Split(images, labels),
                         test=data.Split(images[:10], labels[:10]),
                         num_classes=10, source='test arrays')
  held = data.hold_out_validation(dataset, 20)
  assert (held.train.num_examples, held.validation.num_examples) == (80, 20)
  # Every example is in exactly one split; the rest keep their order.
  ids = lambda split: [int(np.argmax((images == img).all(axis=(1, 2, 3))))
                       for img in split.images]
  train_ids, validation_ids = ids(held.train), ids(held.validation)
  assert sorted(train_ids + validation_ids) == list(range(100))
  assert train_ids == sorted(train_ids)
  np.testing.assert_array_equal(held.validation.labels,
                                labels[validation_ids])
  # The same subset every time (it does not depend on any seed).
  again = data.hold_out_validation(dataset, 20)
  np.testing.assert_array_equal(again.validation.images,
                                held.validation.images)
  assert data.hold_out_validation(dataset, 0) is dataset
  with pytest.raises(data.DataError, match='validation_size = 100'):
    data.hold_out_validation(dataset, 100)
