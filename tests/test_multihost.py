"""Two processes on loopback (2 CPU devices each) train as one 4-device run.

Each process runs `run.py` with --coordinator_address/--num_processes/
--process_id and holds the split in memory (the scan loop, with teacher
logits cached by inference split over both processes); only process 0
writes; checkpoints are written and read collectively. The reference is one
process on 4 devices. (That each process streams exactly its rows of every
batch from disk is tested without processes in tests/test_streaming.py.)
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from kd_jax import errors
from kd_jax import parallel
from kd_jax import streaming
from synthetic import write_idx_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_args(data_dir: str, workdir: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'run.py'),
          '--config=' + os.path.join(ROOT, 'experiments', 'seed.py:quick'),
          f'--workdir={workdir}', '--config.data_source=idx',
          f'--config.data_dir={data_dir}', '--config.validation_size=128',
          '--config.stages=teacher,distill', '--config.train_limit=384',
          '--config.test_limit=256', '--config.plots=False',
          # The student's network: the seed teacher's steps cost 6x.
          '--config.teacher.model=seed_student_cnn']


def _launch_two(data_dir: str, workdir: str, *extra: str
                ) -> list[tuple[str, str]]:
  """Runs two processes of one run; returns their (stdout, stderr)s."""
  port = _free_port()
  env = dict(ENV, XLA_FLAGS=os.environ.get('XLA_FLAGS', '')
             + ' --xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen(
      [*_run_args(data_dir, workdir), *extra,
       f'--coordinator_address=localhost:{port}', '--num_processes=2',
       f'--process_id={i}'], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def _losses(workdir: str) -> dict[str, float]:
  with open(os.path.join(workdir, 'results.json')) as f:
    stages = json.load(f)['stages']
  return {name: stage['test_loss'] for name, stage in stages.items()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  data_dir = streaming.prepare_idx_dir(
      write_idx_dataset(str(root / 'gz'), 768, 256, noise=200),
      str(root / 'plain'))
  two = str(root / 'two_processes')
  first = _launch_two(data_dir, two)
  one = str(root / 'one_process')
  subprocess.run(
      _run_args(data_dir, one), cwd=ROOT, check=True, capture_output=True,
      env=dict(ENV, XLA_FLAGS=os.environ.get('XLA_FLAGS', '')
               + ' --xla_force_host_platform_device_count=4'),
      timeout=600)
  return {'two': two, 'one': one, 'first': first}


def test_two_processes_match_one_process_on_as_many_devices(runs):
  two, one = _losses(runs['two']), _losses(runs['one'])
  assert set(two) == {'teacher', 'distill'}
  for stage, loss in one.items():
    assert two[stage] == pytest.approx(loss, rel=1e-4), stage
  with open(os.path.join(runs['two'], 'results.json')) as f:
    distill = json.load(f)['stages']['distill']
  assert distill['teacher_logits'] == 'cached'  # Inference over processes.


def test_only_process_zero_writes(runs):
  (main, _), (other, other_log) = runs['first']
  assert 'results:' in main and 'results:' not in other
  assert 'test accuracy' not in other_log  # Process 1 logs warnings only.
  with open(os.path.join(runs['two'], 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [(r['stage'], r['epoch']) for r in records] == [
      ('teacher', 1), ('distill', 1)]
  for stage in ('teacher', 'distill'):
    events = os.listdir(os.path.join(runs['two'], 'tensorboard', stage))
    assert len(events) == 1, events


def test_checkpoints_are_shared(runs):
  # (That a rerun reuses finished stages is tested with one process in
  # tests/test_run.py; the stage-skipping code does not depend on the
  # process count.)
  files = os.listdir(os.path.join(runs['two'], 'checkpoints', 'teacher'))
  # 256 training examples / global batch 64, 1 epoch; its fingerprint and
  # the run's provenance, written once.
  assert sorted(files) == ['4', 'checksums.json', 'checksums.variables.json',
                          'provenance.json']
  with open(os.path.join(runs['two'], 'results.json')) as f:
    results = json.load(f)
  stages = results['stages']
  assert results['provenance']['devices']['process_count'] == 2
  for stage in ('teacher', 'distill'):
    assert os.listdir(os.path.join(runs['two'], 'checkpoints', stage))
    assert stages[stage]['epochs'] == 1


# That `run.py --multihost` outside a cluster is one clear error is tested
# with the other command-line mistakes, in tests/test_run.py.


def test_distributed_settings_must_go_together():
  with pytest.raises(errors.UserInputError, match='--process_id'):
    parallel.initialize_distributed(coordinator_address='localhost:1',
                                    num_processes=2)
  with pytest.raises(errors.UserInputError, match='--num_processes'):
    parallel.initialize_distributed(num_processes=2, process_id=3,
                                    coordinator_address='localhost:1')
  assert not parallel.initialize_distributed()  # Nothing asked: one process.
