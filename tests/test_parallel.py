"""Data parallelism on 8 CPU devices equals one device (in a subprocess,
since the device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys

import pytest

from kd_jax import errors
from kd_jax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def report():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '')
             + ' --xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, os.path.join(HERE, 'parallel_check.py')],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('case', ['train/scan', 'train/python',
                                  'distill/scan', 'distill/python'])
def test_eight_devices_match_one(report, case):
  assert report['devices'] == 8
  figures = report[case]
  assert figures['steps'] == 8  # 256 examples, global batch 32.
  assert figures['param_devices'] == 8  # Replicated on the whole mesh.
  assert figures['param_shardings'] in (['P()'], ['PartitionSpec()'])
  # Same global batch, same updates, up to the order of sums.
  assert figures['max_param_diff'] <= 1e-5 * figures['param_scale']
  assert figures['test_loss_8'] == pytest.approx(figures['test_loss_1'],
                                                 rel=1e-5)


def test_sharded_inference_gives_the_same_logits_replicated(report):
  logits = report['logits']
  # 256 examples in batches of 48 split over 8 devices: 6 batches, the last
  # padded to 48 and cut back.
  assert logits['shape'] == [256, 10]
  assert logits['devices'] == 8 and logits['replicated']
  assert logits['max_diff'] <= 1e-5 * logits['scale']


def test_the_compiled_step_all_reduces_gradients(report):
  assert report['hlo_all_reduce']


def test_mesh_errors_name_the_field():
  mesh = parallel.make_mesh(1)
  assert mesh.shape == {'data': 1}
  with pytest.raises(errors.UserInputError, match='config.num_devices = 9999'):
    parallel.make_mesh(9999)
  with pytest.raises(errors.UserInputError,
                     match='config.batch_size = 10: not divisible by the 4'):
    parallel.check_batch_size(10, type('M', (), {'size': 4})(),
                              'config.batch_size')


def test_prefetch_keeps_order_and_puts_ahead():
  events = []

  def batches():
    for i in range(5):
      events.append(f'read {i}')
      yield i

  def put(batch):
    events.append(f'put {batch}')
    return batch * 10

  for out in parallel.prefetch(batches(), put, size=2):
    events.append(f'use {out // 10}')
  assert [e for e in events if e.startswith('use')] == [
      f'use {i}' for i in range(5)]
  # Batch 0 is used only once batches 1 and 2 are on their way.
  assert events.index('put 2') < events.index('use 0')
  assert events.index('use 0') < events.index('put 3')
