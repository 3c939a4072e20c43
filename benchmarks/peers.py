r"""The seed protocol end to end: kd_jax against PyTorch and the tutorial's Keras.

  python benchmarks/peers.py [--repeats=1] [--torch_python=PY]
      [--keras_python=PY] [--train_limit=N]

Each repeat runs, one after the other in fresh processes on the same data
(Fashion-MNIST, the 5,000 validation examples held out as kd_jax does):

  kd_jax cold  `python run.py` (experiments/seed.py) with an empty
               compilation cache;
  kd_jax warm  the same command in a new workdir, the cache now filled;
  pytorch      benchmarks/peer_torch.py (plain PyTorch, 2 threads);
  keras        benchmarks/peer_keras.py (the tutorial's Keras code).

and prints each one's wall time (process start to exit: imports, data,
training, evaluation; the median over repeats), its stages' seconds and test
accuracies, and the peers' times as multiples of kd_jax's. kd_jax does more
in that time (per-epoch evaluation, checkpoints, calibration, figures).
The peers need torch, or tensorflow with Keras 3 (requirements-bench.txt),
in the interpreters given; a peer whose interpreter lacks them is skipped
with a note. Takes about 10 minutes per repeat on 2 cores.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from experiments import seed
from kd_jax import data

_REPEATS = flags.DEFINE_integer('repeats', 1, 'Runs of each contender.')
_TORCH = flags.DEFINE_string('torch_python', sys.executable,
                             'Python interpreter that has torch.')
_KERAS = flags.DEFINE_string('keras_python', sys.executable,
                             'Python interpreter that has tensorflow/keras.')
_TRAIN_LIMIT = flags.DEFINE_integer(
    'train_limit', 0, 'Train on the first N examples only (a smoke run); 0 '
    'for all of them.')

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _validation_size() -> int:
  """The seed protocol's hold-out; an eighth of a smoke run's examples."""
  if _TRAIN_LIMIT.value:
    return _TRAIN_LIMIT.value // 8
  return seed.get_config().validation_size


def _write_data(path: str) -> None:
  """The seed protocol's splits (validation held out) as an .npz."""
  dataset = data.hold_out_validation(
      data.load_dataset(seed.get_config().dataset,
                        train_limit=_TRAIN_LIMIT.value or None),
      _validation_size())
  np.savez(path, train_images=dataset.train.images,
           train_labels=dataset.train.labels,
           test_images=dataset.test.images, test_labels=dataset.test.labels)


def _timed(command: list[str], env: dict[str, str]
           ) -> tuple[float, subprocess.CompletedProcess]:
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)
  return time.perf_counter() - start, result


def _kd_jax(workdir: str, cache: str) -> dict:
  env = {**os.environ, 'KD_JAX_COMPILATION_CACHE': cache}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  command = [sys.executable, 'run.py', f'--workdir={workdir}']
  if _TRAIN_LIMIT.value:
    command += [f'--config.train_limit={_TRAIN_LIMIT.value}',
                f'--config.validation_size={_validation_size()}']
  seconds, result = _timed(command, env)
  if result.returncode:
    raise RuntimeError(f'kd_jax failed:\n{result.stderr[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return {'seconds': seconds, 'stages': {
      name: {'seconds': info['wall_time_s'],
             'test_accuracy': info['test_accuracy']}
      for name, info in results['stages'].items()}}


def _peer(python: str, script: str, data_path: str) -> dict | str:
  """The peer's figures, or why it could not run."""
  seconds, result = _timed([python, os.path.join(HERE, script), data_path],
                           dict(os.environ))
  if result.returncode:
    return result.stderr.strip().splitlines()[-1]
  return {**json.loads(result.stdout.strip().splitlines()[-1]),
          'seconds': seconds}


def _row(name: str, runs: list[dict], reference: dict[str, float]) -> str:
  seconds = statistics.median(r['seconds'] for r in runs)
  stages = runs[-1]['stages']
  cells = [f'{stages[s]["seconds"]:.1f} s / '
           f'{100 * stages[s]["test_accuracy"]:.2f}%' if s in stages else '-'
           for s in ('teacher', 'distill', 'scratch')]
  ratios = [f'{seconds / ref:.2f}x' for ref in reference.values()]
  return (f'| {name} | {seconds:.1f} s | ' + ' | '.join(cells) + ' | '
          + ' | '.join(ratios) + ' |')


def main(argv):
  del argv
  runs = {'kd_jax cold': [], 'kd_jax warm': [], 'pytorch': [], 'keras': []}
  skipped = {}
  with tempfile.TemporaryDirectory(prefix='kd_jax_peers_') as scratch:
    data_path = os.path.join(scratch, 'data.npz')
    _write_data(data_path)
    for i in range(_REPEATS.value):
      cache = os.path.join(scratch, f'cache{i}')
      runs['kd_jax cold'].append(_kd_jax(os.path.join(scratch, f'cold{i}'),
                                         cache))
      runs['kd_jax warm'].append(_kd_jax(os.path.join(scratch, f'warm{i}'),
                                         cache))
      for name, python, script in (('pytorch', _TORCH.value, 'peer_torch.py'),
                                   ('keras', _KERAS.value, 'peer_keras.py')):
        outcome = _peer(python, script, data_path)
        if isinstance(outcome, str):
          skipped[name] = outcome
        else:
          runs[name].append(outcome)
  reference = {k: statistics.median(r['seconds'] for r in runs[k])
               for k in ('kd_jax cold', 'kd_jax warm')}
  print(f'{datetime.date.today()}, {platform.processor() or platform.machine()}'
        f', {os.cpu_count()} cores; {_REPEATS.value} repeat(s), median wall '
        'time per process (start to exit)\n')
  print('| run | wall | teacher | distil | scratch | / kd_jax cold | '
        '/ kd_jax warm |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for name, done in runs.items():
    if done:
      print(_row(name, done, reference))
  for name, why in skipped.items():
    print(f'\n{name}: not run ({why})')


if __name__ == '__main__':
  app.run(main)
