"""Downloading a dataset's official files into a local cache, verified.

`fetch` brings every file of a `Remote` into a cache directory, by default
`~/.cache/kd_jax/datasets/<dataset>/` (the environment variable
`KD_JAX_DATA_CACHE` moves the root). A file is downloaded with urllib to a
temporary file in that directory, checked, and only then renamed into place
(`os.replace`), so the cache never holds a partial or unverified file.

Checks. A `RemoteFile` carries one or more checksums, and a file passes when
any of them matches:
  * `payload_sha256`: SHA-256 of the decompressed payload (the gunzipped
    bytes; for a .tar.gz, the tar stream), so a mirror that re-compressed the
    same payload passes;
  * `file_md5` / `file_sha256`: of the file exactly as published (these are
    what torchvision, TFDS and Keras publish);
  * `member_md5`: MD5 of named members of a .tar.gz (torchvision publishes
    them for the CIFAR batches), so a re-packed archive passes too.
A file that matches none is refused (`DataError` naming the file and URL)
and deleted. A verified file gets a marker `.<name>.verified` recording its
size and mtime; while those are unchanged the file is reused without hashing
it again. A cached file that no longer passes is removed and downloaded
again: the cache holds only verified files (files put there by hand are
checked on first use). Outside the cache (`fetch` into a directory of the
user's) a file that fails is reported and left alone.
The checksums of the datasets kd_jax knows are in
`kd_jax.dataset_info.REMOTES`.

Network failures (connection refused, DNS, a socket silent for
`TIMEOUT_S` seconds, an HTTP error) raise `NetworkError` at once, whose
message says how to get the files by hand. Name resolution is left to the
system resolver, whose own timeout applies.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import http.client
import json
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from absl import logging
import tqdm

from kd_jax.errors import DataError

CACHE_ENV = 'KD_JAX_DATA_CACHE'
DEFAULT_CACHE_ROOT = '~/.cache/kd_jax/datasets'
# Seconds to connect, and the longest a download may stall.
TIMEOUT_S = 10
_CHUNK = 1 << 20
_GZIP_WBITS = 16 + zlib.MAX_WBITS


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One published file of a dataset and the checksums that identify it.

  Attributes:
    name: the file's name on the mirror and in the cache.
    payload_sha256: SHA-256 of the gunzipped content, or None if unknown.
    file_md5: MD5 of the file as published, or None.
    file_sha256: SHA-256 of the file as published, or None.
    member_md5: for a .tar.gz, member path -> MD5 of its content; empty if
      unknown.
  """

  name: str
  payload_sha256: str | None = None
  file_md5: str | None = None
  file_sha256: str | None = None
  member_md5: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not (self.payload_sha256 or self.file_md5 or self.file_sha256
            or self.member_md5):
      raise ValueError(f'RemoteFile {self.name!r} has no checksum')


@dataclasses.dataclass(frozen=True)
class Remote:
  """A dataset's files and the mirror they are downloaded from by default.

  Attributes:
    base_url: the directory URL holding the files, ending in '/'.
    files: the files, in download order.
  """

  base_url: str
  files: tuple[RemoteFile, ...]


class NetworkError(DataError):
  """A download that could not reach its file; `problem` says why, briefly,
  and the message adds how to get the files by hand."""

  def __init__(self, problem: str, how_to: list[str]):
    super().__init__('\n'.join([problem, 'Get the data in one of these '
                                'ways:'] + how_to))
    self.problem = problem


# ------------------------------------------------------------------ locations


def cache_root() -> str:
  """`$KD_JAX_DATA_CACHE`, or `~/.cache/kd_jax/datasets`."""
  return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT)


def cache_dir(dataset: str) -> str:
  """`$KD_JAX_DATA_CACHE/<dataset>`, or `~/.cache/kd_jax/datasets/<dataset>`."""
  return os.path.join(cache_root(), dataset)


def _in_cache(path: str) -> bool:
  root = os.path.realpath(cache_root())
  return os.path.commonpath([root, os.path.realpath(path)]) == root


def file_url(base_url: str, name: str) -> str:
  """The URL of the file `name` in the directory URL `base_url`."""
  return base_url.rstrip('/') + '/' + name


def how_to_download(remote: Remote, directory: str,
                    base_url: str | None = None) -> list[str]:
  """Lines of a message: how to put `remote`'s files in `directory` by hand.

  Args:
    remote: the dataset's files.
    directory: where they are looked for (the download cache).
    base_url: the mirror tried, or None for `remote.base_url`.

  Returns:
    Indented lines naming the URLs, the directory, and the config fields
    `data_dir` and `data_url`.
  """
  base_url = base_url or remote.base_url
  lines = [f'  download by hand into {directory} (checked on first use; '
           f'${CACHE_ENV} sets the download cache\'s root) or into '
           '--config.data_dir=DIR:']
  lines += [f'    {file_url(base_url, f.name)}' for f in remote.files]
  lines.append(f'  --config.data_url=URL    a mirror holding the same files '
               f'(default {remote.base_url})')
  return lines


# ---------------------------------------------------------------- checksums


@dataclasses.dataclass(frozen=True)
class Digests:
  """Checksums of a file: as stored, and of its gunzipped payload.

  Attributes:
    md5: MD5 of the file's bytes.
    sha256: SHA-256 of the file's bytes.
    payload_sha256: SHA-256 of the gunzipped bytes, or None when the file is
      not a complete gzip stream (then `payload_problem` says why).
    payload_problem: why there is no payload digest, or None.
  """

  md5: str
  sha256: str
  payload_sha256: str | None
  payload_problem: str | None


class _Hasher:
  """Digests of a byte stream fed in pieces; gunzips as it goes."""

  def __init__(self):
    self._md5, self._sha256 = hashlib.md5(), hashlib.sha256()
    self._payload = hashlib.sha256()
    self._inflater = zlib.decompressobj(_GZIP_WBITS)
    self._problem = None

  def update(self, data: bytes) -> None:
    self._md5.update(data)
    self._sha256.update(data)
    if self._problem is None:
      try:
        self._inflate(data)
      except zlib.error as e:
        self._problem = f'not a valid gzip stream ({e})'

  def _inflate(self, data: bytes) -> None:
    """Feeds `data` to the gunzipper, at most `_CHUNK` bytes out at a time
    (no decompression bomb), starting a new member after each one ends."""
    while True:
      out = self._inflater.decompress(data, _CHUNK)
      self._payload.update(out)
      if self._inflater.eof:
        data = self._inflater.unused_data
        if not data:
          return
        self._inflater = zlib.decompressobj(_GZIP_WBITS)
      else:
        data = self._inflater.unconsumed_tail
        if not data and len(out) < _CHUNK:
          return

  def digests(self) -> Digests:
    problem = self._problem
    if problem is None and not self._inflater.eof:
      problem = 'the gzip stream ends early (truncated or not gzip)'
    return Digests(self._md5.hexdigest(), self._sha256.hexdigest(),
                   None if problem else self._payload.hexdigest(), problem)


def file_digests(path: str) -> Digests:
  """The `Digests` of the file `path`, read in 1 MiB pieces."""
  hasher = _Hasher()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      hasher.update(chunk)
  return hasher.digests()


def _member_problem(path: str, member_md5: Mapping[str, str]) -> str | None:
  """Why the .tar.gz `path` lacks a member of `member_md5` with that MD5."""
  found = {}
  try:
    with tarfile.open(path, 'r:*') as tar:
      for member in tar:
        name = member.name.removeprefix('./')
        if name in member_md5 and member.isfile():
          digest, reader = hashlib.md5(), tar.extractfile(member)
          while chunk := reader.read(_CHUNK):
            digest.update(chunk)
          found[name] = digest.hexdigest()
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    return f'not a readable tar archive ({e})'
  bad = [n for n, md5 in member_md5.items() if found.get(n) != md5]
  return (f'members {", ".join(bad)} are missing or differ' if bad
          else None)


def check_problem(path: str, expected: RemoteFile,
                  digests: Digests | None = None) -> str | None:
  """Why the file at `path` is not `expected`'s content, or None if it is.

  Args:
    path: the file.
    expected: its checksums; any one that matches suffices.
    digests: the file's `Digests` if already computed (while downloading).

  Returns:
    None, or a message listing what was expected and what was found.
  """
  digests = digests or file_digests(path)
  if (digests.md5 == expected.file_md5
      or digests.sha256 == expected.file_sha256
      or (digests.payload_sha256 is not None
          and digests.payload_sha256 == expected.payload_sha256)):
    return None
  member_problem = None
  if expected.member_md5 and digests.payload_sha256 is not None:
    member_problem = _member_problem(path, expected.member_md5)
    if member_problem is None:
      return None
  expected_lines = [f'{what} {value}' for what, value in (
      ('MD5', expected.file_md5), ('SHA-256', expected.file_sha256),
      ('SHA-256 of the gunzipped content', expected.payload_sha256)) if value]
  if expected.member_md5:
    expected_lines.append('members with the MD5s of '
                          f'{", ".join(expected.member_md5)}')
  return (f'expected {" or ".join(expected_lines)}; found MD5 {digests.md5}, '
          f'SHA-256 {digests.sha256}, gunzipped: '
          f'{digests.payload_sha256 or digests.payload_problem}'
          + (f'; {member_problem}' if member_problem else ''))


# ------------------------------------------------------------- the cache


def _marker_path(path: str) -> str:
  directory, name = os.path.split(path)
  return os.path.join(directory, f'.{name}.verified')


def _marker(path: str, expected: RemoteFile) -> str:
  """What the marker of a verified `path` holds: its size and mtime, and
  the checksums it was verified against."""
  stat = os.stat(path)
  return json.dumps({'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
                     'checks': repr(dataclasses.astuple(expected))})


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _write_marker(path: str, expected: RemoteFile) -> None:
  try:
    with open(_marker_path(path), 'w') as f:
      f.write(_marker(path, expected))
  except OSError:  # A read-only directory: verify again next time.
    pass


def _verified(path: str, expected: RemoteFile) -> bool:
  """Whether `path` holds `expected`: by its marker, else by hashing it
  (writing the marker on success). In the download cache a file that fails
  is removed (False); elsewhere it is an error, and left alone.

  Raises:
    DataError: `path`, outside the download cache, fails its check.
  """
  if not os.path.isfile(path):
    return False
  marker = _marker_path(path)
  try:
    with open(marker) as f:
      if f.read() == _marker(path, expected):
        return True
  except OSError:
    pass
  problem = check_problem(path, expected)
  if problem is None:
    _write_marker(path, expected)
    return True
  if not _in_cache(path):
    raise DataError(f'{path} is not the published {expected.name}: '
                    f'{problem}. Move it away to download it again, or read '
                    "your copy as it is with data source 'auto' and data_dir")
  logging.warning('Removing %s from the download cache: %s', path, problem)
  _remove(path)
  _remove(marker)
  return False


def cached(remote: Remote, directory: str) -> bool:
  """Whether `directory` holds every file of `remote`, verified (see the
  module docstring; in the download cache, files that fail are removed)."""
  return all([_verified(os.path.join(directory, f.name), f)
              for f in remote.files])


# ------------------------------------------------------------- downloading


def _open(url: str, timeout_s: float):
  request = urllib.request.Request(url, headers={'User-Agent': 'kd_jax'})
  return urllib.request.urlopen(request, timeout=timeout_s)


def _network_problem(url: str, error: Exception, timeout_s: float) -> str:
  if isinstance(error, urllib.error.HTTPError):
    return f'Cannot download {url}: HTTP {error.code} {error.reason}'
  reason = getattr(error, 'reason', error)
  if isinstance(reason, TimeoutError):
    reason = f'no response within {timeout_s:g} s'
  return f'Cannot download {url}: {reason}'


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def _download(url: str, path: str, expected: RemoteFile, timeout_s: float,
              how_to: list[str]) -> None:
  """Downloads `url` to `path` through a temporary file, verified.

  Raises:
    NetworkError: the file could not be fetched.
    DataError: it was fetched but is not `expected` (nothing is kept).
  """
  directory, name = os.path.split(path)
  try:
    fd, temporary = tempfile.mkstemp(prefix=f'.{name}.', suffix='.part',
                                     dir=directory)
  except OSError as e:
    raise DataError(f'Cannot write into {directory}: {e.strerror or e}') from e
  try:
    hasher = _Hasher()
    with os.fdopen(fd, 'wb') as out:
      try:
        with _open(url, timeout_s) as response:
          total = getattr(response, 'length', None)
          received = 0
          with tqdm.tqdm(total=total, desc=name, unit='B', unit_scale=True,
                         file=sys.stderr, leave=False,
                         disable=not sys.stderr.isatty()) as bar:
            while chunk := response.read(_CHUNK):
              hasher.update(chunk)
              out.write(chunk)
              received += len(chunk)
              bar.update(len(chunk))
          if total is not None and received < total:
            raise ConnectionError(f'the connection closed after {received} '
                                  f'of {total} bytes')
      except (urllib.error.URLError, http.client.HTTPException,
              ConnectionError, TimeoutError) as e:
        raise NetworkError(_network_problem(url, e, timeout_s),
                           how_to) from e
    problem = check_problem(temporary, expected, hasher.digests())
    if problem is not None:
      raise DataError(
          f'{name} downloaded from {url} is not the published file '
          f'(corrupt, truncated, or a different file): {problem}. It was not '
          f'kept in {directory}. Try again, or use another mirror '
          '(--config.data_url).')
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp made it 0600.
    os.replace(temporary, path)
  except BaseException:
    _remove(temporary)
    raise


def fetch(remote: Remote, directory: str, *, base_url: str | None = None,
          timeout_s: float = TIMEOUT_S) -> str:
  """Makes `directory` hold every file of `remote`, verified.

  Files already there and verified are kept; the others are downloaded
  from `base_url` (default `remote.base_url`).

  Args:
    remote: the files and their checksums.
    directory: where they go (created if needed), e.g. `cache_dir(name)`.
    base_url: a mirror's directory URL, or None for the canonical one.
    timeout_s: seconds to connect, and the longest a download may stall.

  Returns:
    `directory`.

  Raises:
    NetworkError: a file could not be downloaded (says how to get it).
    DataError: a downloaded file failed its check, or a file already in
      `directory` (outside the download cache) does.
  """
  base_url = base_url or remote.base_url
  how_to = how_to_download(remote, directory, base_url)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise DataError(f'Cannot create the download directory {directory}: '
                    f'{e.strerror or e}') from e
  for expected in remote.files:
    path = os.path.join(directory, expected.name)
    if _verified(path, expected):
      continue
    url = file_url(base_url, expected.name)
    logging.info('Downloading %s to %s', url, path)
    _download(url, path, expected, timeout_s, how_to)
    _write_marker(path, expected)
  return directory
