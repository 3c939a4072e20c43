"""Tests for kd_jax.download: verified downloads into the dataset cache.

Hermetic: files are served by an HTTP server on 127.0.0.1 in a thread, the
expected checksums are computed here from synthetic files and injected as a
`Remote`, and the cache is pointed into tmp_path with KD_JAX_DATA_CACHE.
Only `test_debian_fashion_mnist_passes_its_published_checks` reads /usr/share.
"""

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from experiments import seed
from kd_jax import data
from kd_jax import dataset_info
from kd_jax import download
from kd_jax import errors
from kd_jax import idx
from kd_jax import validation
from test_cifar import write_cifar

_DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


# ------------------------------------------------------------------ servers


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    del args


class _DroppingHandler(http.server.BaseHTTPRequestHandler):
  """Promises 1000 bytes, sends 10, and closes the connection."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header('Content-Length', '1000')
    self.end_headers()
    self.wfile.write(b'\x1f\x8b' + b'x' * 8)
    self.close_connection = True

  def log_message(self, *args):
    del args


@contextlib.contextmanager
def serve(handler):
  """Serves with `handler` on 127.0.0.1; yields the base URL."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                            daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/'
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def serve_dir(directory):
  return serve(functools.partial(_QuietHandler, directory=str(directory)))


def closed_port_url():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'http://127.0.0.1:{s.getsockname()[1]}/'


# ------------------------------------------------------------ synthetic data


def _sha256(raw):
  return hashlib.sha256(raw).hexdigest()


def write_idx_mirror(directory, num_train=12, num_test=5):
  """The four .gz IDX files of a tiny dataset, and a `Remote` for them
  checked by the published file's MD5 and the payload's SHA-256.

  Returns:
    (Remote, {file name: gunzipped payload}, (train labels, test labels)).
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  labels = {}
  for split, n in (('train', num_train), ('test', num_test)):
    images_name, labels_name = idx.IDX_FILES[split]
    labels[split] = rng.integers(0, 10, n).astype(np.uint8)
    idx.write_idx(os.path.join(directory, images_name + '.gz'),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    idx.write_idx(os.path.join(directory, labels_name + '.gz'),
                  labels[split])
  files, payloads = [], {}
  for name in idx.IDX_FILE_NAMES:
    with open(os.path.join(directory, name + '.gz'), 'rb') as f:
      raw = f.read()
    payloads[name + '.gz'] = gzip.decompress(raw)
    files.append(download.RemoteFile(
        name + '.gz', payload_sha256=_sha256(payloads[name + '.gz']),
        file_md5=hashlib.md5(raw).hexdigest()))
  return download.Remote('http://unused/', tuple(files)), payloads, labels


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """KD_JAX_DATA_CACHE pointed at tmp_path/cache; returns that path."""
  monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / 'cache'))
  return tmp_path / 'cache'


def _listing(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ------------------------------------------------------------------ fetching


def test_cache_dir_default_and_env(monkeypatch):
  monkeypatch.delenv(download.CACHE_ENV, raising=False)
  assert download.cache_dir('mnist') == os.path.expanduser(
      '~/.cache/kd_jax/datasets/mnist')
  monkeypatch.setenv(download.CACHE_ENV, '/somewhere')
  assert download.cache_dir('cifar10') == '/somewhere/cifar10'


def test_good_download_lands_in_the_cache_and_loads(tmp_path, cache,
                                                    monkeypatch):
  remote, _, labels = write_idx_mirror(tmp_path / 'mirror')
  monkeypatch.setitem(data.DATASETS, 'mnist', dataclasses.replace(
      data.DATASETS['mnist'], remote=remote))
  with serve_dir(tmp_path / 'mirror') as url:
    ds = data.load_dataset('mnist', source='download', data_url=url)
  names = [f.name for f in remote.files]
  assert _listing(cache / 'mnist') == sorted(
      names + [f'.{n}.verified' for n in names])
  assert ds.source == f'IDX files in {cache / "mnist"}'
  np.testing.assert_array_equal(ds.test.labels, labels['test'])
  assert ds.train.images.shape == (12, 28, 28, 1)


def test_re_compressed_mirror_passes_on_the_payload_checksum(tmp_path):
  remote, payloads, _ = write_idx_mirror(tmp_path / 'original')
  mirror = tmp_path / 'mirror'
  mirror.mkdir()
  for name, payload in payloads.items():  # Other level, mtime, a file name.
    with gzip.GzipFile(str(mirror / name), 'wb', compresslevel=1,
                       mtime=123456) as f:
      f.write(payload)
  assert (mirror / 'train-images-idx3-ubyte.gz').read_bytes() != (
      tmp_path / 'original' / 'train-images-idx3-ubyte.gz').read_bytes()
  with serve_dir(mirror) as url:
    directory = download.fetch(remote, str(tmp_path / 'cache'), base_url=url)
    # Checked by the published file's MD5 only, a re-compressed file fails.
    md5_only = download.Remote(url, tuple(
        dataclasses.replace(f, payload_sha256=None) for f in remote.files))
    with pytest.raises(errors.DataError, match='is not the published file'):
      download.fetch(md5_only, str(tmp_path / 'other'))
  assert _listing(tmp_path / 'other') == []
  assert (tmp_path / 'cache' / 't10k-labels-idx1-ubyte.gz').exists()
  assert directory == str(tmp_path / 'cache')


@pytest.mark.parametrize('damage', [
    lambda raw: raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:],
    lambda raw: raw[:len(raw) // 2],
    lambda raw: b'<html>Not Found</html>',
], ids=['corrupt', 'truncated', 'error-page'])
def test_bad_download_is_refused_naming_it_and_nothing_is_kept(
    tmp_path, damage):
  remote, _, _ = write_idx_mirror(tmp_path / 'mirror')
  bad = tmp_path / 'mirror' / 't10k-images-idx3-ubyte.gz'
  bad.write_bytes(damage(bad.read_bytes()))
  directory = tmp_path / 'cache'
  with serve_dir(tmp_path / 'mirror') as url:
    with pytest.raises(errors.DataError) as e:
      download.fetch(remote, str(directory), base_url=url)
  message = str(e.value)
  assert f'{url}t10k-images-idx3-ubyte.gz' in message
  assert 'is not the published file' in message
  assert not isinstance(e.value, download.NetworkError)
  # The files before it were kept (verified); nothing of the bad one is.
  kept = _listing(directory)
  assert not any('t10k-images' in n for n in kept), kept
  assert 'train-images-idx3-ubyte.gz' in kept


def test_dropped_connection_is_a_network_error(tmp_path):
  remote = download.Remote('unused', (download.RemoteFile(
      'x.gz', payload_sha256='0' * 64),))
  with serve(_DroppingHandler) as url:
    with pytest.raises(download.NetworkError,
                       match='closed after 10 of 1000 bytes'):
      download.fetch(remote, str(tmp_path / 'cache'), base_url=url)
  assert _listing(tmp_path / 'cache') == []


def test_cached_files_are_reused_without_network_or_rehashing(
    tmp_path, monkeypatch):
  remote, _, _ = write_idx_mirror(tmp_path / 'mirror')
  directory = str(tmp_path / 'cache')
  with serve_dir(tmp_path / 'mirror') as url:
    download.fetch(remote, directory, base_url=url)
  # The server is gone: a second fetch must not need it, nor hash again.
  monkeypatch.setattr(download, 'check_problem', None)
  assert download.fetch(remote, directory, base_url=url) == directory
  assert download.cached(remote, directory)
  monkeypatch.undo()
  # A touched file is hashed again (and still passes).
  path = os.path.join(directory, 't10k-labels-idx1-ubyte.gz')
  os.utime(path, ns=(0, 0))
  calls = []
  original = download.check_problem
  monkeypatch.setattr(download, 'check_problem',
                      lambda *a: calls.append(a) or original(*a))
  assert download.cached(remote, directory)
  assert len(calls) == 1


def _spoil(path):
  with open(path, 'r+b') as f:
    f.seek(20)
    f.write(b'\x00\x00\x00')


def test_a_cached_file_that_went_bad_is_removed_and_fetched_again(
    tmp_path, cache):
  remote, _, _ = write_idx_mirror(tmp_path / 'mirror')
  directory = download.cache_dir('mnist')
  assert directory == str(cache / 'mnist')
  path = os.path.join(directory, 'train-labels-idx1-ubyte.gz')
  with serve_dir(tmp_path / 'mirror') as url:
    download.fetch(remote, directory, base_url=url)
    _spoil(path)
    assert not download.cached(remote, directory)
    assert not os.path.exists(path)
    download.fetch(remote, directory, base_url=url)
  assert download.check_problem(path, remote.files[1]) is None


def test_a_bad_file_outside_the_cache_is_reported_not_removed(tmp_path,
                                                              cache):
  remote, _, _ = write_idx_mirror(tmp_path / 'mine')
  path = str(tmp_path / 'mine' / 'train-labels-idx1-ubyte.gz')
  _spoil(path)
  with pytest.raises(errors.DataError,
                     match='is not the published train-labels') as e:
    download.fetch(remote, str(tmp_path / 'mine'), base_url=closed_port_url())
  assert path in str(e.value)
  assert os.path.exists(path)
  assert not os.path.exists(cache)


def test_unreachable_mirror_fails_at_once_saying_how_to_get_the_data(
    tmp_path):
  remote, _, _ = write_idx_mirror(tmp_path / 'mirror')
  url = closed_port_url()
  start = time.monotonic()
  with pytest.raises(download.NetworkError) as e:
    download.fetch(remote, str(tmp_path / 'cache'), base_url=url)
  assert time.monotonic() - start < 5
  message = str(e.value)
  assert f'Cannot download {url}train-images-idx3-ubyte.gz' in message
  assert f'{url}t10k-labels-idx1-ubyte.gz' in message  # Every file's URL.
  assert str(tmp_path / 'cache') in message
  assert '--config.data_dir=DIR' in message
  assert '--config.data_url=URL' in message
  assert download.CACHE_ENV in message
  assert _listing(tmp_path / 'cache') == []


def test_http_error_and_stalled_server_are_network_errors(tmp_path):
  remote, _, _ = write_idx_mirror(tmp_path / 'mirror')
  with serve_dir(tmp_path / 'empty') as url:
    with pytest.raises(download.NetworkError, match='HTTP 404'):
      download.fetch(remote, str(tmp_path / 'cache'), base_url=url)
  release = threading.Event()

  class Stalling(_QuietHandler):

    def do_GET(self):  # pylint: disable=invalid-name
      release.wait(5)

  with serve(Stalling) as url:
    start = time.monotonic()
    with pytest.raises(download.NetworkError,
                       match=r'no response within 0\.3 s'):
      download.fetch(remote, str(tmp_path / 'cache'), base_url=url,
                     timeout_s=0.3)
    release.set()
  assert time.monotonic() - start < 3
  assert _listing(tmp_path / 'cache') == []


def test_auto_downloads_cifar_once_then_uses_the_cache(tmp_path, cache,
                                                       monkeypatch):
  mirror = tmp_path / 'mirror'
  path, batches = write_cifar(mirror, 'cifar100', num=3)
  with open(path, 'rb') as f:
    remote = download.Remote(closed_port_url(), (download.RemoteFile(
        'cifar-100-python.tar.gz', file_sha256=_sha256(f.read())),))
  monkeypatch.setitem(data.DATASETS, 'cifar100', dataclasses.replace(
      data.DATASETS['cifar100'], remote=remote))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  with serve_dir(mirror) as url:
    ds = data.load_dataset('cifar100', data_url=url)
  archive = cache / 'cifar100' / 'cifar-100-python.tar.gz'
  assert ds.source == f'CIFAR-100 python batches in {archive}'
  again = data.load_dataset('cifar100')  # Server stopped: from the cache.
  np.testing.assert_array_equal(again.test.labels,
                                batches['test'][b'fine_labels'])


def _tar_gz(members):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
    for name, raw in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return buffer.getvalue()


def test_a_re_packed_archive_passes_on_member_checksums(tmp_path):
  members = {'d/a': b'first batch', 'd/b': b'second batch'}
  original = _tar_gz(members)
  expected = download.RemoteFile(
      'x.tar.gz', file_sha256=_sha256(original),
      member_md5={n: hashlib.md5(raw).hexdigest()
                  for n, raw in members.items()})
  repacked = tmp_path / 'x.tar.gz'  # Another order, an extra member.
  repacked.write_bytes(_tar_gz({'./d/b': members['d/b'], 'd/a': members['d/a'],
                                'd/readme': b'hello'}))
  assert repacked.read_bytes() != original
  assert download.check_problem(str(repacked), expected) is None
  repacked.write_bytes(_tar_gz({'d/a': members['d/a'], 'd/b': b'changed'}))
  problem = download.check_problem(str(repacked), expected)
  assert 'members d/b are missing or differ' in problem
  assert f'SHA-256 {_sha256(original)}' in problem


def test_payload_digest_covers_multi_member_gzip_and_non_gzip(tmp_path):
  path = tmp_path / 'f.gz'
  path.write_bytes(gzip.compress(b'a' * 3_000_000) + gzip.compress(b'tail'))
  digests = download.file_digests(str(path))
  assert digests.payload_sha256 == _sha256(b'a' * 3_000_000 + b'tail')
  path.write_bytes(b'plain text')
  digests = download.file_digests(str(path))
  assert digests.payload_sha256 is None
  assert 'gzip' in digests.payload_problem
  assert digests.sha256 == _sha256(b'plain text')


def test_a_remote_file_needs_a_checksum():
  with pytest.raises(ValueError, match='no checksum'):
    download.RemoteFile('x.gz')


def test_every_dataset_has_a_download_with_checksums():
  for name, info in data.DATASETS.items():
    assert info.remote is dataset_info.REMOTES[name]
    for f in info.remote.files:
      assert f.file_md5 and len(f.file_md5) == 32
      assert f.file_sha256 and len(f.file_sha256) == 64


@pytest.mark.skipif(not os.path.isdir(_DEBIAN_FASHION_MNIST),
                    reason='needs apt-get install dataset-fashion-mnist')
def test_debian_fashion_mnist_passes_its_published_checks():
  # Debian re-wrote the gzip headers: the files pass on the payload SHA-256.
  for f in dataset_info.REMOTES['fashion_mnist'].files:
    path = os.path.join(_DEBIAN_FASHION_MNIST, f.name)
    digests = download.file_digests(path)
    assert digests.payload_sha256 == f.payload_sha256
    assert digests.md5 != f.file_md5


@pytest.mark.parametrize('url,ok', [('', True), ('https://mirror/mnist/', True),
                                    ('file:///data/mnist/', True),
                                    ('ftp://mirror/', False),
                                    ('mirror/mnist', False)])
def test_config_data_url_is_validated(url, ok):
  config = seed.get_config()
  config.data_url = url
  if ok:
    validation.validate(config)
  else:
    with pytest.raises(errors.UserInputError, match='config.data_url'):
      validation.validate(config)


def test_streaming_with_data_source_download_is_refused():
  config = seed.get_config()
  config.data_source, config.input, config.loop = 'download', 'stream', 'python'
  with pytest.raises(errors.UserInputError,
                     match="config.input = 'stream' with config.data_source "
                     "= 'download'"):
    validation.validate(config)
