"""Data parallelism with `jax.sharding`: one mesh axis over the devices.

The batch is split along the mesh's `'data'` axis; parameters, optimizer
state and the training split held on device are replicated. The training
steps are the same jitted functions as on one device: a sharding constraint
on each gathered batch lets XLA's SPMD partitioner run every device on its
slice and all-reduce the gradients, so `config.batch_size` is the global
batch on any number of devices and results match the single-device run up
to the order of floating-point sums.

Several processes (hosts) join with `initialize_distributed`; the mesh then
spans every process's devices, each process feeds its rows of every global
batch (`process_rows`, `global_batch`), and only `is_main_process()` writes
files.
"""

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from kd_jax import errors

DATA_AXIS = 'data'


def make_mesh(num_devices: int = 0,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `'data'` over the first `num_devices` devices.

  Args:
    num_devices: how many of `devices` to use; 0 = all.
    devices: the devices to choose from; default `jax.devices()` (every
      process's devices when running multi-process).

  Raises:
    errors.UserInputError: more devices asked for than there are.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices > len(devices):
    raise errors.UserInputError(
        f'config.num_devices = {num_devices}: only {len(devices)} '
        f'{devices[0].platform} device(s) are available')
  if jax.process_count() > 1 and num_devices not in (0, len(devices)):
    raise errors.UserInputError(
        f'config.num_devices = {num_devices}: a run of '
        f'{jax.process_count()} processes uses all their {len(devices)} '
        'devices; set it to 0')
  devices.sort(key=lambda d: (d.process_index, d.id))
  chosen = devices[:num_devices or len(devices)]
  return Mesh(np.asarray(chosen), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Axis 0 (the batch) split across the mesh's data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  """Raises if the global `batch_size` does not split evenly over `mesh`."""
  if batch_size % mesh.size:
    raise errors.UserInputError(
        f'{field} = {batch_size}: not divisible by the {mesh.size} devices '
        'the batch is split over (config.num_devices)')


# ------------------------------------------------------------- several hosts


def initialize_distributed(*, coordinator_address: str = '',
                           num_processes: int = 0, process_id: int = -1,
                           auto_detect: bool = False) -> bool:
  """Joins JAX's distributed runtime when this is one of several processes.

  Must run before anything touches a JAX device. Afterwards `jax.devices()`
  lists every process's devices, so `make_mesh` spans all hosts.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator; '' = the
      `JAX_COORDINATOR_ADDRESS` environment variable, or auto-detection.
    num_processes: how many processes take part; 0 = auto-detect.
    process_id: this process's index in [0, num_processes); -1 =
      auto-detect.
    auto_detect: let JAX detect all three on a Cloud TPU pod slice, under
      Slurm or Open MPI (where none need giving).

  Returns:
    True if the distributed runtime was started, False for a single-process
    run (nothing asked for: nothing done).

  Raises:
    errors.UserInputError: an inconsistent combination of the settings, or
      JAX could not join (nothing to auto-detect, devices already in use).
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS',
                                                  '')
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if not (explicit or auto_detect):
    return False
  if explicit and not auto_detect:
    if not (address and num_processes >= 1 and
            0 <= process_id < num_processes):
      raise errors.UserInputError(
          '--coordinator_address (or $JAX_COORDINATOR_ADDRESS), '
          '--num_processes >= 1 and 0 <= --process_id < --num_processes go '
          f'together; got {address!r}, {num_processes}, {process_id}. On a '
          'TPU pod slice, Slurm or Open MPI pass --multihost instead')
  try:
    jax.distributed.initialize(
        coordinator_address=address or None,
        num_processes=num_processes or None,
        process_id=None if process_id < 0 else process_id)
  except (ValueError, RuntimeError) as e:  # Nothing detected, or too late.
    raise errors.UserInputError(
        f'cannot join a multi-process run: {str(e).rstrip(".")}. --multihost '
        'needs a Cloud TPU pod slice, Slurm or Open MPI; elsewhere pass '
        '--coordinator_address, --num_processes and --process_id') from e
  return True


def is_main_process() -> bool:
  """True in the one process that writes logs, metrics and results."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process has reached the barrier `name` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_rows(batch_size: int, process_index: int,
                 process_count: int) -> slice:
  """The rows of a global batch that process `process_index` feeds.

  Process p of P holds the devices at mesh positions [p*D/P, (p+1)*D/P)
  (`make_mesh` orders devices by process), so it supplies rows
  [p*B/P, (p+1)*B/P) of a global batch of B.

  Raises:
    errors.UserInputError: p outside [0, P), or B not divisible by P.
  """
  if not 0 <= process_index < process_count:
    raise errors.UserInputError(
        f'process index {process_index}: expected 0 to {process_count - 1}')
  if batch_size % process_count:
    raise errors.UserInputError(
        f'batch size {batch_size}: not divisible by the {process_count} '
        'processes; each process feeds batch_size / process_count examples '
        'of every batch')
  size = batch_size // process_count
  return slice(process_index * size, (process_index + 1) * size)


def local_rows(batch_size: int) -> slice:
  """`process_rows` of this process."""
  return process_rows(batch_size, jax.process_index(), jax.process_count())


def global_batch(local_batch, sharding: NamedSharding):
  """One global array per leaf, from this process's rows (`local_rows`).

  Args:
    local_batch: a pytree of host arrays, each `(B/P, ...)`.
    sharding: the global batch's sharding (`batch_sharded`).

  Returns:
    The same pytree of `jax.Array`s of shape `(B, ...)`, each device holding
    its slice; single-process, the same as `jax.device_put`.
  """
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def prefetch(batches: Iterable[Any], put: Callable[[Any], Any],
             size: int = 2) -> Iterator[Any]:
  """`put(batch)` for each of `batches`, issued `size` batches ahead.

  `put` (e.g. `jax.device_put` or `global_batch`) starts an asynchronous
  host-to-device copy, so the next batches travel while the current step
  runs; the order is kept.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
