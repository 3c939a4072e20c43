"""Data parallelism with `jax.sharding`: one mesh axis over the devices.

The batch is split along the mesh's `'data'` axis; parameters, optimizer
state and the training split held on device are replicated. The training
steps are the same jitted functions as on one device: a sharding constraint
on each gathered batch lets XLA's SPMD partitioner run every device on its
slice and all-reduce the gradients, so `config.batch_size` is the global
batch on any number of devices and results match the single-device run up
to the order of floating-point sums.
"""

from collections.abc import Sequence

import jax
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
