"""Tests for kd_jax.cifar: CIFAR-10/100 python archives, read safely.

Hermetic: tiny archives in the official layout are written into tmp_path,
their batches pickled exactly as Python 2's cPickle wrote the official files
(protocol 2, str as bytes, numpy.core.multiarray._reconstruct).
"""

import os
import pickle

import numpy as np
import pytest

from experiments import seed
from kd_jax import cifar
from kd_jax import data
from kd_jax import errors
from kd_jax import validation
from synthetic import make_batch
from synthetic import py2_pickle
from synthetic import py2_str
from synthetic import write_cifar

def _hwc(rows):
  """The expected images, computed pixel by pixel from CHW rows."""
  n = len(rows)
  images = np.zeros((n, 32, 32, 3), np.uint8)
  for i in range(n):
    for c in range(3):
      for h in range(32):
        images[i, h, :, c] = rows[i, c * 1024 + h * 32:c * 1024 + h * 32 + 32]
  return images


# --------------------------------------------------------------- reading


def test_py2_pickle_writer_matches_the_official_format():
  raw = py2_pickle(make_batch(2, 10))
  batch = pickle.loads(raw, encoding='bytes')  # The CIFAR site's recipe.
  assert batch[b'data'].dtype == np.uint8 and batch[b'data'].shape == (2, 3072)
  assert b'numpy.core.multiarray\n_reconstruct' in raw


def test_reads_cifar10_archive_in_hwc_order(tmp_path):
  path, batches = write_cifar(tmp_path, 'cifar10', num=3)
  assert cifar.locate(str(tmp_path), cifar.LAYOUTS['cifar10']) == path
  splits = cifar.read_cifar(path, cifar.LAYOUTS['cifar10'])
  train_names = [f'data_batch_{i}' for i in range(1, 6)]
  rows = np.concatenate([batches[n][b'data'] for n in train_names])
  images, labels, what = splits['train']
  assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, _hwc(rows))
  np.testing.assert_array_equal(
      labels, sum((batches[n][b'labels'] for n in train_names), []))
  assert 'cifar-10-batches-py/data_batch_5' in what
  test_images, test_labels, _ = splits['test']
  np.testing.assert_array_equal(test_images,
                                _hwc(batches['test_batch'][b'data']))
  np.testing.assert_array_equal(test_labels, batches['test_batch'][b'labels'])


def test_cifar100_uses_the_fine_labels(tmp_path):
  path, batches = write_cifar(tmp_path, 'cifar100', num=6)
  splits = cifar.read_cifar(path, cifar.LAYOUTS['cifar100'])
  np.testing.assert_array_equal(splits['train'][1],
                                batches['train'][b'fine_labels'])
  np.testing.assert_array_equal(splits['test'][1],
                                batches['test'][b'fine_labels'])


@pytest.mark.parametrize('where', ['folder', 'parent of folder', 'archive',
                                   'parent of archive'])
def test_locate_accepts_archive_folder_or_their_directory(tmp_path, where):
  layout = cifar.LAYOUTS['cifar100']
  written, batches = write_cifar(tmp_path, 'cifar100',
                                 as_folder='folder' in where)
  path = str(tmp_path) if where.startswith('parent') else written
  location = cifar.locate(path, layout)
  assert location == written
  splits = cifar.read_cifar(location, layout)
  np.testing.assert_array_equal(splits['test'][0],
                                _hwc(batches['test'][b'data']))


def test_locate_finds_nothing_in_an_empty_dir(tmp_path):
  assert cifar.locate(str(tmp_path), cifar.LAYOUTS['cifar10']) is None
  assert cifar.locate(str(tmp_path / 'absent'),
                      cifar.LAYOUTS['cifar10']) is None


@pytest.mark.parametrize('protocol', [3, 4, 5])
@pytest.mark.parametrize('key', [bytes, bytes.decode], ids=['bytes', 'str'])
def test_batches_repickled_by_python3_are_read(tmp_path, protocol, key):
  pickler = lambda b: pickle.dumps({key(k): v for k, v in b.items()},
                                   protocol=protocol)
  path, batches = write_cifar(tmp_path, 'cifar100', pickler=pickler)
  splits = cifar.read_cifar(path, cifar.LAYOUTS['cifar100'])
  np.testing.assert_array_equal(splits['train'][0],
                                _hwc(batches['train'][b'data']))


# ---------------------------------------------------------------- errors


def _bad_batch(change):
  batch = make_batch(4, 100, label_key=b'fine_labels')
  change(batch)
  return batch


@pytest.mark.parametrize('change,match', [
    (lambda b: b.update({b'data': b[b'data'][:, :3071]}),
     r"b'data' of shape \(N, 3072\) uint8, got \(4, 3071\) uint8"),
    (lambda b: b.update({b'data': b[b'data'].astype(np.float32)}),
     r'got \(4, 3072\) float32'),
    (lambda b: b.update({b'fine_labels': [0, 1, 100, 2]}),
     r'must lie in \[0, 100\), found 100 at index 2'),
    (lambda b: b.update({b'fine_labels': [0, 1, -1, 2]}), 'found -1'),
    (lambda b: b.update({b'fine_labels': [0, 1, 2]}),
     "4 rows in b'data' but 3"),
    (lambda b: b.pop(b'fine_labels'), "no key b'fine_labels'"),
])
def test_malformed_batches_are_refused_naming_the_member(tmp_path, change,
                                                         match):
  batches = {'train': _bad_batch(change), 'test': make_batch(
      2, 100, label_key=b'fine_labels')}
  path, _ = write_cifar(tmp_path, 'cifar100', batches=batches)
  with pytest.raises(errors.DataError, match=match) as e:
    cifar.read_cifar(path, cifar.LAYOUTS['cifar100'])
  assert f'{path} member cifar-100-python/train' in str(e.value)


def test_missing_member_is_named(tmp_path):
  path, _ = write_cifar(tmp_path, 'cifar100', batches={
      'train': make_batch(2, 100, label_key=b'fine_labels')})
  with pytest.raises(errors.DataError,
                     match='lacks cifar-100-python/test') as e:
    cifar.read_cifar(path, cifar.LAYOUTS['cifar100'])
  assert path in str(e.value)


def test_missing_file_in_folder_is_named(tmp_path):
  folder, _ = write_cifar(tmp_path, 'cifar10', as_folder=True)
  os.remove(os.path.join(folder, 'data_batch_3'))
  with pytest.raises(errors.DataError, match='data_batch_3: cannot read'):
    cifar.read_cifar(folder, cifar.LAYOUTS['cifar10'])


@pytest.mark.parametrize('content', [b'not a tar at all', b''])
def test_a_file_that_is_not_a_tar_gz_is_refused(tmp_path, content):
  path = tmp_path / 'cifar-10-python.tar.gz'
  path.write_bytes(content)
  with pytest.raises(errors.DataError,
                     match='not a readable gzip-compressed tar') as e:
    cifar.read_cifar(str(path), cifar.LAYOUTS['cifar10'])
  assert str(path) in str(e.value)


def test_a_truncated_archive_is_refused(tmp_path):
  path, _ = write_cifar(tmp_path, 'cifar10', num=50)
  with open(path, 'rb') as f:
    raw = f.read()
  with open(path, 'wb') as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(errors.DataError, match='truncated or corrupt'):
    cifar.read_cifar(path, cifar.LAYOUTS['cifar10'])


@pytest.mark.parametrize('module,name', [('posix', 'system'),
                                         ('builtins', 'eval'),
                                         ('numpy', 'load')])
def test_a_pickle_naming_a_disallowed_global_is_refused(tmp_path, module,
                                                        name):
  marker = tmp_path / 'executed'
  command = {'system': f'touch {marker}',
             'eval': f'open({str(marker)!r}, "w")',
             'load': str(marker)}[name].encode()
  malicious = (b'\x80\x02c' + f'{module}\n{name}\n'.encode()
               + py2_str(command) + b'\x85R.')
  path, _ = write_cifar(tmp_path, 'cifar100', batches={
      'train': malicious, 'test': make_batch(2, 100,
                                             label_key=b'fine_labels')})
  with pytest.raises(errors.DataError,
                     match=f'global {module}.{name} is not allowed') as e:
    cifar.read_cifar(path, cifar.LAYOUTS['cifar100'])
  assert 'member cifar-100-python/train' in str(e.value)
  assert not marker.exists()


def test_not_a_pickle_is_refused(tmp_path):
  folder, _ = write_cifar(tmp_path, 'cifar100', as_folder=True, batches={
      'train': b'\x00garbage', 'test': b''})
  with pytest.raises(errors.DataError, match='not a CIFAR batch pickle'):
    cifar.read_cifar(folder, cifar.LAYOUTS['cifar100'])


# ------------------------------------------------------------ kd_jax.data


@pytest.mark.parametrize('as_folder', [False, True])
def test_load_dataset_cifar100_round_trip(tmp_path, as_folder):
  _, batches = write_cifar(tmp_path, 'cifar100', num=7, as_folder=as_folder)
  ds = data.load_dataset('cifar100', data_dir=str(tmp_path), test_limit=5)
  assert ds.num_classes == 100 and 'CIFAR-100' in ds.source
  assert ds.train.images.shape == (7, 32, 32, 3)
  assert ds.train.images.dtype == np.float32
  assert ds.test.num_examples == 5
  np.testing.assert_array_equal(ds.train.images * 255,
                                _hwc(batches['train'][b'data']))
  np.testing.assert_array_equal(ds.train.labels,
                                batches['train'][b'fine_labels'])
  assert ds.train.labels.dtype == np.int32


def test_load_dataset_reads_the_archive_path_itself(tmp_path):
  path, _ = write_cifar(tmp_path, 'cifar10', num=2)
  ds = data.load_dataset('cifar10', data_dir=path)
  assert ds.train.num_examples == 10 and ds.test.num_examples == 2


def test_load_dataset_cifar_errors_name_what_is_expected(tmp_path):
  with pytest.raises(errors.DataError,
                     match='holds no CIFAR-10 data; expected '
                     'cifar-10-python.tar.gz, or the folder '
                     'cifar-10-batches-py'):
    data.load_dataset('cifar10', data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match="source 'idx' reads"):
    data.load_dataset('cifar10', source='idx')


def test_normalisation_statistics():
  assert data.DATASETS['cifar100'].mean == (0.5071, 0.4867, 0.4408)
  assert data.DATASETS['cifar100'].std == (0.2675, 0.2565, 0.2761)
  assert data.DATASETS['cifar10'].mean == (0.4914, 0.4822, 0.4465)
  assert data.DATASETS['cifar10'].std == (0.2470, 0.2435, 0.2616)
  for name in ('mnist', 'fashion_mnist'):
    assert data.DATASETS[name].mean is None is data.DATASETS[name].std
  for name in ('cifar10', 'cifar100'):
    assert data.DATASETS[name].image_shape == (32, 32, 3)


def test_streaming_cifar_is_refused_naming_config_input():
  config = seed.get_config()
  config.dataset, config.input, config.loop = 'cifar100', 'stream', 'python'
  config.teacher.num_classes = config.student.num_classes = 100
  with pytest.raises(errors.UserInputError,
                     match="config.input = 'stream' with config.dataset = "
                     "'cifar100'"):
    validation.validate(config)
