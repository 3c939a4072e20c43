"""The workdir lock: one run (or sweep) per directory at a time."""

import os
import signal
import subprocess
import sys

import pytest

from experiments import seed
from kd_jax import errors
from kd_jax import experiment
from kd_jax import sweep
from kd_jax import workdir as workdir_lib

# Another process: takes the lock as a kd_jax run would, says so, waits.
_HOLDER = r'''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print('locked', flush=True)
time.sleep(600)
'''
# Exit status 0 if the directory is free, 1 if another process holds it.
_PROBE = r'''
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
try:
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
  sys.exit(1)
'''


@pytest.fixture
def holder(tmp_path):
  """`(directory, pid)`: a directory another process holds the lock of."""
  directory = tmp_path / 'work'
  directory.mkdir()
  process = subprocess.Popen([sys.executable, '-c', _HOLDER, str(directory)],
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == 'locked'
  yield str(directory), process
  process.kill()
  process.wait()


def _held_by_another_process(directory) -> bool:
  return subprocess.run([sys.executable, '-c', _PROBE, str(directory)],
                        check=False).returncode == 1


def _config():
  return seed.get_config('quick')


def test_a_second_run_stops_at_once_naming_the_holder(holder):
  directory, process = holder
  with pytest.raises(errors.UserInputError) as info:
    experiment.run(_config(), directory)
  assert str(info.value) == (
      f'--workdir={directory}: in use by another kd_jax run (process '
      f'{process.pid}); wait for it to end, or use another --workdir')
  assert not os.listdir(directory)  # Nothing read or written.
  # The kernel releases the lock when the holder dies, however it dies.
  process.send_signal(signal.SIGKILL)
  process.wait()
  lock = workdir_lib.WorkdirLock(directory)
  lock.take()
  lock.release()


def test_a_sweep_locks_its_directory(holder):
  directory, process = holder
  with pytest.raises(errors.UserInputError,
                     match=f'process {process.pid}'):
    sweep.run_sweep({'seed': _config()}, {'seed': [0]}, directory)


def test_a_run_holds_the_lock_until_it_ends(tmp_path, monkeypatch):
  directory = tmp_path / 'work'
  held = []

  def load_data(config):  # The run's first work once its checks passed.
    del config
    held.append(_held_by_another_process(directory))
    raise errors.UserInputError('stopped by the test')

  monkeypatch.setattr(experiment, 'load_data', load_data)
  # An existing workdir is locked before anything else (a new one as soon
  # as the run makes it: the next test).
  directory.mkdir()
  with pytest.raises(errors.UserInputError, match='stopped by the test'):
    experiment.run(_config(), str(directory))
  assert held == [True]
  assert not _held_by_another_process(directory)  # Released.


def test_a_new_workdir_is_locked_before_its_first_write(tmp_path,
                                                        monkeypatch):
  directory = tmp_path / 'new'
  held = []

  def record_config(config, workdir):  # The run's first write.
    del config
    held.append(_held_by_another_process(workdir))
    raise errors.UserInputError('stopped by the test')

  monkeypatch.setattr(workdir_lib, 'record_config', record_config)
  monkeypatch.setattr(experiment, 'load_data', _tiny_data)
  with pytest.raises(errors.UserInputError, match='stopped by the test'):
    experiment.run(_config(), str(directory))
  assert held == [True]
  assert not _held_by_another_process(directory)


def _tiny_data(config):
  """512 synthetic examples, in memory (no files)."""
  del config
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def split(n):
    return data.Split(rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
                      rng.integers(0, 10, n).astype(np.int32))

  return data.Dataset(name='fashion_mnist', train=split(512), test=split(64),
                      num_classes=10, source='synthetic', validation=None)
