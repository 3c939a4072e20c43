"""Which code, config, data, packages and devices produced a result.

`manifest(config, dataset, mesh)` is recorded in results.json (`provenance`),
in each stage's checkpoint directory (`provenance.json`) and in sweep rows:

  code_version   {'git_commit', 'dirty'} when kd_jax runs from a git
                 checkout, else {'package_version'}
  config_sha256  SHA-256 of the resolved config, without the fields that do
                 not change what is computed (`workdir.RERUNNABLE_FIELDS`)
  data_sha256    SHA-256 of the examples read: every split's pixels (uint8)
                 and labels, in order, so that the same data in another
                 file format, compression or place has the same fingerprint
  packages       versions of jax, jaxlib, flax, optax, orbax-checkpoint
  devices        platform, device kind, devices used and available, processes
"""

from collections.abc import Iterator, Mapping
import hashlib
import importlib.metadata
import json
import os
import subprocess
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

import kd_jax
from kd_jax import data as data_lib
from kd_jax import workdir as workdir_lib

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')
# The fields whose difference makes two results incomparable.
IDENTITY_FIELDS = ('code_version', 'config_sha256', 'data_sha256')
MANIFEST = 'provenance.json'
_CHUNK = 4096  # Examples hashed at a time.


def _git(checkout: str, *args: str) -> str | None:
  try:
    result = subprocess.run(['git', '-C', checkout, *args],
                            capture_output=True, text=True, timeout=30,
                            check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip() if result.returncode == 0 else None


def code_version() -> dict[str, Any]:
  """The git commit of the checkout kd_jax runs from, and whether tracked
  files differ from it; outside a checkout of kd_jax (an installed
  package), the package version."""
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(
      kd_jax.__file__)))
  top = _git(checkout, 'rev-parse', '--show-toplevel')
  commit = top and _git(checkout, 'rev-parse', 'HEAD')
  if commit and os.path.realpath(top) == os.path.realpath(checkout):
    status = _git(checkout, 'status', '--porcelain', '--untracked-files=no')
    return {'git_commit': commit, 'dirty': bool(status)}
  return {'package_version': kd_jax.__version__}


def config_sha256(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of `config` as config.json holds it, without the fields that
  do not change what is computed (so a resume that only draws figures or
  runs another stage keeps it)."""
  values = json.loads(config.to_json())
  for field in workdir_lib.RERUNNABLE_FIELDS:
    values.pop(field, None)
  return hashlib.sha256(json.dumps(values, sort_keys=True).encode()
                        ).hexdigest()


def _chunks(split) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`(images, labels)` of a split, `_CHUNK` examples at a time; an
  in-memory split or a streamed one (read from disk)."""
  for start in range(0, split.num_examples, _CHUNK):
    stop = min(start + _CHUNK, split.num_examples)
    if isinstance(split, data_lib.Split):
      yield split.images[start:stop], split.labels[start:stop]
    else:
      batch = split.source.read(np.arange(start, stop))
      yield batch['image'], batch['label']


def _pixels(images: np.ndarray) -> np.ndarray:
  """uint8 pixels; float32 images in [0, 1] were read as pixels / 255."""
  if images.dtype == np.uint8:
    return images
  return np.round(images * 255).astype(np.uint8)


def data_sha256(dataset: data_lib.Dataset) -> str:
  """SHA-256 of the examples of every split of `dataset` (train, the
  validation examples held out of it, test): their uint8 pixels and int32
  labels in order, whether held in memory or streamed."""
  digest = hashlib.sha256()
  for name in ('train', 'validation', 'test'):
    split = getattr(dataset, name)
    if split is None:
      continue
    digest.update(f'{name}|{split.num_examples}|'.encode())
    for images, labels in _chunks(split):
      digest.update(np.ascontiguousarray(_pixels(images)).tobytes())
      digest.update(np.asarray(labels, np.int32).tobytes())
  return digest.hexdigest()


NOT_INSTALLED = 'not installed'


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
  """Installed version of each of `packages` (`NOT_INSTALLED` if absent)."""
  versions = {}
  for package in packages:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = NOT_INSTALLED
  return versions


def devices(mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
  """The devices a run computes on: `mesh`'s, or the first device."""
  used = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
  return {'platform': used[0].platform, 'kind': used[0].device_kind,
          'count': len(used), 'available': jax.device_count(),
          'process_count': jax.process_count()}


def manifest(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """This run's provenance (see the module docstring)."""
  return {
      'code_version': code_version(),
      'config_sha256': config_sha256(config),
      'data_sha256': data_sha256(dataset),
      'packages': package_versions(),
      'devices': devices(mesh),
  }


def differing(first: Mapping[str, Any] | None,
              second: Mapping[str, Any] | None) -> list[str]:
  """The `IDENTITY_FIELDS` in which two manifests differ (none when either
  is missing)."""
  if not first or not second:
    return []
  return [f for f in IDENTITY_FIELDS if first.get(f) != second.get(f)]


def resumed(current: dict[str, Any], earlier: Mapping[str, Any] | None
            ) -> dict[str, Any]:
  """`current`, noting where a workdir's earlier stages were produced by
  other code, config or data (`differs_from_earlier_stages`, and a
  warning in the log)."""
  fields = differing(earlier, current)
  if fields:
    logging.warning('this run\'s %s differ from those of the run that '
                    'produced the earlier stages in this workdir; their '
                    'results are not strictly comparable', ', '.join(fields))
    current = {**current, 'differs_from_earlier_stages': fields}
  return current


def write_manifest(directory: str, record: Mapping[str, Any]) -> None:
  """`record` as `directory`/provenance.json (a stage's checkpoints)."""
  os.makedirs(directory, exist_ok=True)
  workdir_lib.write_atomic(os.path.join(directory, MANIFEST),
                           json.dumps(record, indent=2, sort_keys=True) + '\n')


def mixed_sources_warning(rows: list[Mapping[str, Any]]) -> str | None:
  """A warning for a table whose rows come from different code or data
  (each row's `provenance`), else None."""
  seen = {field: {json.dumps(row['provenance'].get(field), sort_keys=True)
                  for row in rows if row.get('provenance')}
          for field in ('code_version', 'data_sha256')}
  mixed = [field for field, values in seen.items() if len(values) > 1]
  if not mixed:
    return None
  return (f'**Warning:** the rows of this table come from different '
          f'{" and ".join(f.replace("_sha256", "") for f in mixed)} '
          '(see `provenance` in rows.jsonl); they are not strictly '
          'comparable.')
