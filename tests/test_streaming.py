"""Tests for kd_jax.streaming: IDX sources, the decompression cache, and
batches identical to the in-memory path's.

Hermetic: datasets are tiny IDX files in tmp directories; TFDS is mocked.
"""

import os
import pickle

import numpy as np
import pytest

from kd_jax import data
from kd_jax import errors
from kd_jax import streaming
from synthetic import synthetic_images
from synthetic import write_idx_dataset
from test_data import mock_prepared_tfds


@pytest.fixture(scope='module')
def gz_dir(tmp_path_factory) -> str:
  """203 train / 70 test synthetic examples as .gz IDX files."""
  return write_idx_dataset(str(tmp_path_factory.mktemp('gz')), 203, 70)


@pytest.fixture(scope='module')
def plain_dir(gz_dir, tmp_path_factory) -> str:
  """The same examples, uncompressed."""
  return streaming.prepare_idx_dir(gz_dir,
                                   str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='module')
def in_memory(gz_dir) -> data.Dataset:
  return data.load_dataset('fashion_mnist', data_dir=gz_dir)


@pytest.fixture(scope='module')
def streamed(plain_dir) -> streaming.StreamingDataset:
  return streaming.load_streaming_dataset(
      'fashion_mnist', data_dir=plain_dir, cache_dir='/nonexistent')


def _paths(directory, split='train'):
  return [os.path.join(directory, name) for name in data.IDX_FILES[split]]


def assert_batches_equal(streamed_batches, expected_batches):
  """Same number of batches, keys, dtypes and values."""
  streamed_batches, expected_batches = (list(streamed_batches),
                                        list(expected_batches))
  assert len(streamed_batches) == len(expected_batches)
  for got, want in zip(streamed_batches, expected_batches):
    assert got.keys() == want.keys()
    for key in want:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ------------------------------------------------------------------- sources


def test_idx_source_reads_what_read_idx_reads(plain_dir):
  images_path, labels_path = _paths(plain_dir)
  source = streaming.IdxSource(images_path, labels_path)
  images, labels = data.read_idx(images_path), data.read_idx(labels_path)
  assert len(source) == len(labels) == 203
  assert source.image_shape == (28, 28, 1)
  indices = np.array([5, 0, 202, 5, 17])
  batch = source.read(indices)
  np.testing.assert_array_equal(batch['image'][..., 0], images[indices])
  assert batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(batch['label'], labels[indices])
  assert batch['label'].dtype == np.int32
  record = source[202]
  assert record['image'].shape == (28, 28, 1)
  np.testing.assert_array_equal(record['image'][..., 0], images[202])
  assert record['label'] == labels[202] and record['label'].dtype == np.int32
  np.testing.assert_array_equal(source[-1]['image'], record['image'])
  consecutive = source.read(np.arange(10, 20))  # One read for the run.
  np.testing.assert_array_equal(consecutive['image'][..., 0], images[10:20])
  assert source.read(np.array([], int))['image'].shape == (0, 28, 28, 1)
  with pytest.raises(IndexError):
    source.read(np.array([203]))
  with pytest.raises(IndexError):
    source[203]  # pylint: disable=pointless-statement


def test_idx_source_keeps_channels_of_4d_image_files(tmp_path):
  images = np.arange(3 * 4 * 5 * 3, dtype=np.uint8).reshape(3, 4, 5, 3)
  data.write_idx(str(tmp_path / 'images'), images)
  data.write_idx(str(tmp_path / 'labels'), np.array([2, 0, 1], np.uint8))
  source = streaming.IdxSource(str(tmp_path / 'images'),
                               str(tmp_path / 'labels'))
  assert source.image_shape == (4, 5, 3)
  np.testing.assert_array_equal(source.read(np.array([2, 1]))['image'],
                                images[[2, 1]])


@pytest.mark.parametrize('which,content,match', [
    ('images', np.zeros((3, 28, 28), np.int32), 'uint8 images'),
    ('images', np.zeros((3, 784), np.uint8), r'0x00000802, expected'),
    ('images', 'gzip', 'gzip-compressed'),
    ('images', 'truncated', 'truncated IDX file'),
    ('images', 'short header', 'truncated IDX file'),
    ('images', 'missing', 'cannot read'),
    ('labels', np.zeros((3, 1), np.uint8), 'uint8 labels'),
    ('labels', np.zeros(4, np.uint8), '3 images but .* 4 labels'),
])
def test_idx_source_rejects_bad_files_naming_them(tmp_path, which, content,
                                                  match):
  paths = {'images': str(tmp_path / 'images'),
           'labels': str(tmp_path / 'labels')}
  data.write_idx(paths['images'], np.zeros((3, 28, 28), np.uint8))
  data.write_idx(paths['labels'], np.zeros(3, np.uint8))
  path = paths[which]
  if isinstance(content, np.ndarray):
    data.write_idx(path, content)
  elif content == 'gzip':
    data.write_idx(path + '.gz', np.zeros((3, 28, 28), np.uint8))
    os.replace(path + '.gz', path)
  elif content == 'truncated':
    os.truncate(path, os.path.getsize(path) - 1)
  elif content == 'short header':
    os.truncate(path, 9)
  elif content == 'missing':
    os.remove(path)
  with pytest.raises(data.DataError, match=match) as e:
    streaming.IdxSource(paths['images'], paths['labels'])
  assert path in str(e.value)


def test_idx_source_pickles(plain_dir):
  source = streaming.IdxSource(*_paths(plain_dir))
  copy = pickle.loads(pickle.dumps(source))
  assert copy.images_path == source.images_path and len(copy) == len(source)
  indices = np.array([3, 1, 4, 1, 5])
  assert_batches_equal([copy.read(indices)], [source.read(indices)])
  del source  # The copy has its own open files.
  assert copy.read(indices)['image'].shape == (5, 28, 28, 1)


def test_array_and_subset_sources():
  images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2, 1)
  labels = np.array([4, 3, 2, 1, 0], np.uint8)
  subset = streaming.SubsetSource(streaming.ArraySource(images, labels),
                                  np.array([4, 1]))
  assert len(subset) == 2
  np.testing.assert_array_equal(subset.read(np.array([1, 0]))['image'],
                                images[[1, 4]])
  assert subset[0]['label'] == 0 and subset[0]['label'].dtype == np.int32
  with pytest.raises(IndexError):
    streaming.SubsetSource(subset, np.array([2]))
  with pytest.raises(data.DataError, match='uint8 or float32'):
    streaming.ArraySource(images.astype(np.int32), labels)


# ------------------------------------------------------- decompression cache


def _tree(directory):
  """{name: (size, mtime_ns)} of the files in `directory`."""
  return {entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns)
          for entry in os.scandir(directory)}


def test_prepare_idx_dir_decompresses_once_into_the_cache(gz_dir, tmp_path):
  before = _tree(gz_dir)
  cache = str(tmp_path / 'cache')
  prepared = streaming.prepare_idx_dir(gz_dir, cache)
  assert os.path.dirname(prepared) == cache
  assert _tree(gz_dir) == before
  for name in sorted(_tree(prepared)):
    np.testing.assert_array_equal(
        data.read_idx(os.path.join(prepared, name)),
        data.read_idx(os.path.join(gz_dir, name + '.gz')))
  assert sorted(_tree(prepared)) == sorted(n[:-3] for n in before)
  cached = _tree(prepared)
  assert streaming.prepare_idx_dir(gz_dir, cache) == prepared
  assert _tree(prepared) == cached  # No work the second time.
  # A damaged copy is made again.
  damaged = os.path.join(prepared, data.IDX_FILES['test'][0])
  os.truncate(damaged, 100)
  streaming.prepare_idx_dir(gz_dir, cache)
  assert os.path.getsize(damaged) == cached[data.IDX_FILES['test'][0]][0]
  assert _tree(gz_dir) == before


def test_prepare_idx_dir_plain_files_are_used_in_place(plain_dir, tmp_path):
  assert streaming.prepare_idx_dir(plain_dir, str(tmp_path)) == plain_dir
  assert not os.listdir(tmp_path)


def test_prepare_idx_dir_links_plain_files_next_to_decompressed(
    gz_dir, tmp_path):
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  for name in os.listdir(gz_dir):
    os.symlink(os.path.join(gz_dir, name), mixed / name)
  plain_name = data.IDX_FILES['test'][1]
  os.remove(mixed / (plain_name + '.gz'))
  data.write_idx(str(mixed / plain_name),
                 data.read_idx(os.path.join(gz_dir, plain_name + '.gz')))
  prepared = streaming.prepare_idx_dir(str(mixed), str(tmp_path / 'cache'))
  assert os.path.realpath(os.path.join(prepared, plain_name)) == str(
      mixed / plain_name)
  streaming.IdxSource(*_paths(prepared, 'test'))


def test_prepare_idx_dir_errors(gz_dir, tmp_path):
  with pytest.raises(data.DataError, match='lacks the IDX file'):
    streaming.prepare_idx_dir(str(tmp_path), str(tmp_path / 'cache'))
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  for name in os.listdir(gz_dir):
    with open(os.path.join(gz_dir, name), 'rb') as f:
      raw = f.read()
    (corrupt / name).write_bytes(raw[:len(raw) // 2] if 'train-images' in name
                                 else raw)
  with pytest.raises(data.DataError, match='corrupt gzip') as e:
    streaming.prepare_idx_dir(str(corrupt), str(tmp_path / 'cache'))
  assert 'train-images' in str(e.value)
  cached = os.path.dirname(streaming.prepare_idx_dir(gz_dir,
                                                     str(tmp_path / 'cache')))
  leftovers = [name for d in os.listdir(cached)
               for name in os.listdir(os.path.join(cached, d))
               if name.startswith('.')]
  assert not leftovers  # No temporary files left behind.


# ------------------------------------------------------------------- batches


def test_train_batches_equal_the_in_memory_ones(streamed, in_memory):
  for epoch in (0, 1):
    assert_batches_equal(
        streamed.train.train_batches(32, seed=3, epoch=epoch),
        data.train_batches(in_memory.train, 32, seed=3, epoch=epoch))
  assert_batches_equal(
      streamed.train.train_batches(32, seed=3, epoch=1, start_batch=4,
                                   num_threads=0),
      data.train_batches(in_memory.train, 32, seed=3, epoch=1, start_batch=4))
  assert not list(streamed.train.train_batches(32, seed=3, epoch=1,
                                               start_batch=6))


def test_train_batches_with_extras(streamed, in_memory):
  logits = np.arange(203 * 3, dtype=np.float32).reshape(203, 3)
  assert_batches_equal(
      streamed.train.train_batches(50, seed=0, epoch=0,
                                   extras={'teacher_logits': logits}),
      data.train_batches(in_memory.train, 50, seed=0, epoch=0,
                         extras={'teacher_logits': logits}))


def test_train_batches_process_shares_make_the_global_batch(streamed):
  whole = list(streamed.train.train_batches(64, seed=1, epoch=0))
  shares = [list(streamed.train.train_batches(64, seed=1, epoch=0,
                                              process_index=p,
                                              process_count=2))
            for p in (0, 1)]
  assert [b['image'].shape for b in shares[0]] == [(32, 28, 28, 1)] * 3
  assert_batches_equal(
      [{key: np.concatenate([a[key], b[key]]) for key in a}
       for a, b in zip(*shares)], whole)


@pytest.mark.parametrize('kwargs,match', [
    (dict(process_count=3), 'batch size 64: not divisible by the 3 '
     'processes'),
    (dict(process_index=2, process_count=2), 'process index 2'),
    (dict(start_batch=-1), 'start_batch'),
])
def test_train_batches_rejects_bad_shares(streamed, kwargs, match):
  with pytest.raises(errors.UserInputError, match=match):
    streamed.train.train_batches(64, seed=0, epoch=0, **kwargs)


def test_eval_batches_equal_the_in_memory_ones(streamed, in_memory):
  assert_batches_equal(streamed.test.eval_batches(32),
                       data.eval_batches(in_memory.test, 32))
  assert_batches_equal(streamed.test.eval_batches(70),
                       data.eval_batches(in_memory.test, 70))


def test_eval_batches_process_shares_make_the_global_batch(streamed,
                                                          in_memory):
  # 70 examples in batches of 64: the last has 6, all in process 0's share.
  shares = [list(streamed.test.eval_batches(64, process_index=p,
                                            process_count=4))
            for p in range(4)]
  assert float(shares[3][-1]['mask'].sum()) == 0
  assert_batches_equal(
      [{key: np.concatenate([s[key] for s in batch]) for key in batch[0]}
       for batch in zip(*shares)],
      data.eval_batches(in_memory.test, 64))
  with pytest.raises(errors.UserInputError, match='not divisible'):
    streamed.test.eval_batches(64, process_count=3)


def test_from_split_streams_an_in_memory_split(in_memory):
  split = streaming.StreamingSplit.from_split(in_memory.train)
  assert split.num_examples == in_memory.train.num_examples
  assert_batches_equal(split.train_batches(40, seed=2, epoch=0),
                       data.train_batches(in_memory.train, 40, seed=2,
                                          epoch=0))
  assert_batches_equal(split.eval_batches(40),
                       data.eval_batches(in_memory.train, 40))


# ---------------------------------------------------------------- validation


def test_validation_indices_match_hold_out_validation(in_memory):
  held = data.hold_out_validation(in_memory, 50)
  train, validation = streaming.split_indices(203, 50)
  assert len(train) == 153 and len(validation) == 50
  assert list(train) == sorted(train) and list(validation) == sorted(validation)
  np.testing.assert_array_equal(in_memory.train.images[train],
                                held.train.images)
  np.testing.assert_array_equal(in_memory.train.images[validation],
                                held.validation.images)


def test_load_streaming_dataset_holds_out_the_same_validation(
    plain_dir, in_memory):
  held = data.hold_out_validation(in_memory, 50)
  streamed = streaming.load_streaming_dataset(
      'fashion_mnist', data_dir=plain_dir, cache_dir='/nonexistent',
      validation_size=50)
  assert (streamed.train.num_examples, streamed.validation.num_examples) == (
      153, 50)
  assert_batches_equal(streamed.train.train_batches(32, seed=5, epoch=0),
                       data.train_batches(held.train, 32, seed=5, epoch=0))
  assert_batches_equal(streamed.validation.eval_batches(32),
                       data.eval_batches(held.validation, 32))
  with pytest.raises(data.DataError, match='validation_size = 203'):
    streaming.load_streaming_dataset('fashion_mnist', data_dir=plain_dir,
                                     cache_dir='/nonexistent',
                                     validation_size=203)


# ------------------------------------------------------------------- loading


def test_load_streaming_dataset_decompresses_gz_dirs(gz_dir, in_memory,
                                                     tmp_path):
  streamed = streaming.load_streaming_dataset(
      'fashion_mnist', data_dir=gz_dir, cache_dir=str(tmp_path))
  assert streamed.source.startswith(f'IDX files in {tmp_path}')
  assert streamed.num_classes == 10 and streamed.validation is None
  assert_batches_equal(streamed.test.eval_batches(100),
                       data.eval_batches(in_memory.test, 100))


def test_load_streaming_dataset_checks_labels_and_shapes(tmp_path):
  directory = str(tmp_path / 'data')
  write_idx_dataset(directory, 30, 10)
  plain = streaming.prepare_idx_dir(directory, str(tmp_path / 'cache'))
  labels_path = os.path.join(plain, data.IDX_FILES['train'][1])
  labels = np.zeros(30, np.uint8)
  labels[17] = 10
  data.write_idx(labels_path, labels)
  with pytest.raises(data.DataError, match=r'\[0, 10\).*index 17') as e:
    streaming.load_streaming_dataset('mnist', data_dir=plain,
                                     cache_dir=str(tmp_path))
  assert labels_path in str(e.value)
  images_path = os.path.join(plain, data.IDX_FILES['test'][0])
  data.write_idx(images_path, synthetic_images(np.zeros(10), 0)[:, :27])
  data.write_idx(labels_path, np.zeros(30, np.uint8))
  with pytest.raises(data.DataError, match=r'\(N, 28, 28, 1\)') as e:
    streaming.load_streaming_dataset('mnist', data_dir=plain,
                                     cache_dir=str(tmp_path))
  assert images_path in str(e.value)
  with pytest.raises(data.DataError, match='Unknown dataset'):
    streaming.load_streaming_dataset('cifar', data_dir=plain,
                                     cache_dir=str(tmp_path))


def test_tfds_source_streams_what_load_dataset_reads(tmp_path):
  with mock_prepared_tfds(num_examples=21):
    in_memory = data.load_dataset('mnist', source='tfds',
                                  data_dir=str(tmp_path))
    streamed = streaming.load_streaming_dataset(
        'mnist', source='tfds', data_dir=str(tmp_path), validation_size=5)
    held = data.hold_out_validation(in_memory, 5)
    assert streamed.source.startswith('TFDS mnist')
    assert_batches_equal(streamed.train.train_batches(4, seed=0, epoch=0),
                         data.train_batches(held.train, 4, seed=0, epoch=0))
    assert_batches_equal(streamed.test.eval_batches(8, process_index=1,
                                                    process_count=2),
                         [{k: v[4:] for k, v in batch.items()} for batch in
                          data.eval_batches(in_memory.test, 8)])
    copy = pickle.loads(pickle.dumps(streamed.test.source))
    assert_batches_equal([copy.read(np.array([2, 0]))],
                         [streamed.test.source.read(np.array([2, 0]))])


def test_tfds_tfrecord_cannot_be_streamed(tmp_path):
  with mock_prepared_tfds(num_examples=3, file_format='tfrecord'):
    with pytest.raises(data.DataError, match='array_record'):
      streaming.load_streaming_dataset('mnist', source='tfds',
                                       data_dir=str(tmp_path))


# ------------------------------------------------------- in an experiment


def _experiment_config(data_dir: str, **overrides):
  from experiments import seed  # pylint: disable=g-import-not-at-top
  config = seed.get_config('quick')
  config.data_source, config.data_dir = 'idx', data_dir
  config.stages, config.plots = 'teacher,distill', False
  config.teacher.model = 'seed_student_cnn'  # 6x cheaper than the seed's.
  config.batch_size, config.validation_size, config.loop = 32, 32, 'python'
  # Evaluation and inference in the other end-to-end tests' batches: their
  # compiled programs are shared (tests/conftest.py).
  config.eval_batch_size = 128
  for field, value in overrides.items():
    config[field] = value
  return config


def test_a_streamed_run_trains_exactly_as_an_in_memory_run(plain_dir,
                                                           tmp_path):
  from kd_jax import experiment  # pylint: disable=g-import-not-at-top
  runs = {source: experiment.run(
      _experiment_config(plain_dir, input=source), str(tmp_path / source))
          for source in ('memory', 'stream')}
  assert 'training split streamed' in runs['stream']['data_source']
  for stage in ('teacher', 'distill'):
    memory, stream = (runs[s]['stages'][stage] for s in ('memory', 'stream'))
    assert stream['test_loss'] == pytest.approx(memory['test_loss'],
                                                rel=1e-6), stage
    assert stream['test_accuracy'] == memory['test_accuracy']
  # A cache would hold the whole training split's logits.
  assert runs['memory']['stages']['distill']['teacher_logits'] == 'cached'
  assert runs['stream']['stages']['distill']['teacher_logits'] == 'online'


@pytest.mark.parametrize('overrides,match', [
    ({'loop': 'scan'}, "config.loop = 'python'"),
    ({'distill.teacher_logits': 'cached'}, "'online' or 'auto'"),
    # Several teachers' cached logits: in tests/test_validation.py.
])
def test_what_streaming_cannot_do_is_refused_naming_the_fields(
    overrides, match):
  from kd_jax import validation  # pylint: disable=g-import-not-at-top
  config = _experiment_config('', input='stream')
  config.update_from_flattened_dict(overrides)
  with pytest.raises(errors.UserInputError, match=match):
    validation.validate(config)


def test_fit_refuses_to_scan_a_streamed_split(streamed, in_memory):
  from kd_jax import loop  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  dataset = data.Dataset(name='x', train=streamed.train, test=in_memory.test,
                         num_classes=10, source='x')
  with pytest.raises(ValueError, match="loop='python'"):
    loop.fit(None, train.train_step, dataset,
             loop.LoopSettings(epochs=1, batch_size=32, eval_batch_size=32,
                               loop='scan'), stage='x')
