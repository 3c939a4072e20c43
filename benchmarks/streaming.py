r"""Streaming input (grain, from disk) against in-memory input: speed, memory.

  python benchmarks/streaming.py [--examples=60000] [--batch_size=128]
      [--steps=0] [--model=seed_student_cnn]

Writes synthetic uncompressed IDX training data of N and 10 N examples
(28x28x1, constant memory: header, then chunks), then trains `--model` with a
jitted `train.train_step`, each measurement in a fresh subprocess so that its
peak RSS (`ru_maxrss`) is its own:

  streaming         `StreamingSplit.train_batches` over an `IdxSource`, one
                    `jax.device_put` per batch, grain threads reading ahead;
                    on N and on 10 N (the shuffled order spreads the reads
                    over the whole 10 N file).
  streaming, no     the same with `num_threads=0`: reads do not overlap
  read-ahead        compute.
  streaming, input  the batches alone, no training: what the input pipeline
  only              can deliver.
  in memory         `data.load_dataset` arrays and `data.train_batches`, the
                    same Python loop.
  in memory, scan   the arrays on device, chunks of 8 steps as one unrolled
                    `lax.scan` (what `loop.fit` with loop='scan' runs).
  no data           the model and one step on a random batch: the floor of
                    the RSS column.

Steps/s exclude the first (compiling) step or chunk. `--steps` caps the steps
of every run (0: one epoch of N). The files are read from the page cache
(just written), as a second epoch would be.
"""

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order
from kd_jax import data
from kd_jax import idx
from kd_jax import loop
from kd_jax import models
from kd_jax import streaming
from kd_jax import train
from tests import synthetic

_EXAMPLES = flags.DEFINE_integer('examples', 60000, 'N, the smaller size.')
_SCALE = flags.DEFINE_integer('scale', 10, 'The larger size is scale * N.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Training batch size.')
_STEPS = flags.DEFINE_integer(
    'steps', 0, 'Steps per run (the first is not timed); 0: one epoch of N.')
_MODEL = flags.DEFINE_string('model', 'seed_student_cnn',
                             'A kd_jax.models name.')
_THREADS = flags.DEFINE_integer('threads', 2, 'grain read threads.')
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'Runs of each measurement, interleaved; the table shows '
    'the median rate and the largest peak RSS.')
_PREFETCH = flags.DEFINE_integer('prefetch', 4, 'Batches read ahead.')
_WORKDIR = flags.DEFINE_string('workdir', '',
                               'Where to write the data; default: a temp dir.')
_MEASURE = flags.DEFINE_string('measure', '',
                               'Internal: run one measurement, print JSON.')
_DATA = flags.DEFINE_string('data', '', 'Internal: the measured IDX dir.')

TEST_EXAMPLES = 1000
CHUNK = 8
_WRITE_CHUNK = 20000


# ------------------------------------------------------------------ the data


def _write_split(directory: str, split: str, n: int, seed: int) -> None:
  """Writes n synthetic examples as IDX files, `_WRITE_CHUNK` at a time."""
  images_name, labels_name = idx.IDX_FILES[split]
  with open(os.path.join(directory, images_name), 'wb') as images, open(
      os.path.join(directory, labels_name), 'wb') as labels:
    images.write(idx.idx_header(np.uint8, (n, 28, 28)))
    labels.write(idx.idx_header(np.uint8, (n,)))
    rng = np.random.default_rng(seed)
    for start in range(0, n, _WRITE_CHUNK):
      chunk = rng.integers(0, 10, min(_WRITE_CHUNK, n - start), np.uint8)
      labels.write(chunk.tobytes())
      images.write(synthetic.synthetic_images(chunk, seed + start).tobytes())


def write_dataset(directory: str, n: int) -> str:
  """An IDX dataset dir of n training and `TEST_EXAMPLES` test examples."""
  os.makedirs(directory, exist_ok=True)
  _write_split(directory, 'train', n, seed=0)
  _write_split(directory, 'test', TEST_EXAMPLES, seed=1)
  return directory


# -------------------------------------------------- one measurement (worker)


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _new_state():
  model = models.make_model(_MODEL.value)
  return train.create_train_state(model, jax.random.PRNGKey(0), (28, 28, 1),
                                  1e-3)


def _steps(num_examples: int) -> int:
  per_epoch = data.num_train_batches(_EXAMPLES.value, _BATCH_SIZE.value)
  return min(_STEPS.value or per_epoch,
             data.num_train_batches(num_examples, _BATCH_SIZE.value))


def _time_loop(batches) -> tuple[int, float]:
  """Runs a jitted train step per host batch; (timed steps, seconds)."""
  step = train.make_train_step()
  state = _new_state()
  state, metrics = step(state, jax.device_put(next(batches)))
  jax.block_until_ready(metrics)
  start, count = time.perf_counter(), 0
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch))
    count += 1
  jax.block_until_ready(metrics)
  return count, time.perf_counter() - start


def _time_scan(split: data.Split, steps: int) -> tuple[int, float]:
  """Chunks of `CHUNK` steps as one unrolled scan on device arrays."""
  run = loop.make_scan_steps(train.train_step, unroll=True)
  arrays = {'image': jnp.asarray(split.images),
            'label': jnp.asarray(split.labels)}
  indices = data.epoch_batch_indices(0, 0, split.num_examples,
                                     _BATCH_SIZE.value)[:steps]
  chunks = [indices[i:i + CHUNK] for i in range(0, len(indices), CHUNK)
            if i + CHUNK <= len(indices)]
  state, totals, _ = run(_new_state(), arrays, chunks[0])
  jax.block_until_ready(totals)
  start = time.perf_counter()
  for chunk in chunks[1:]:
    state, totals, _ = run(state, arrays, chunk)
  jax.block_until_ready(totals)
  return CHUNK * (len(chunks) - 1), time.perf_counter() - start


def measure(kind: str, directory: str) -> dict[str, float]:
  """One run: {'examples', 'steps', 'seconds', 'peak_rss_mib'}."""
  batch_size = _BATCH_SIZE.value
  if kind == 'no data':
    examples = 0
    steps, seconds = _time_loop(iter([common.random_batch(batch_size)] * 2))
  elif kind.startswith('streaming'):
    split = streaming.StreamingSplit(streaming.IdxSource(
        *(os.path.join(directory, name) for name in idx.IDX_FILES['train'])))
    examples = split.num_examples
    threads = 0 if 'no read-ahead' in kind else _THREADS.value
    batches = itertools.islice(
        split.train_batches(batch_size, seed=0, epoch=0, num_threads=threads,
                            prefetch=_PREFETCH.value), _steps(examples))
    if 'input only' in kind:
      start = time.perf_counter()
      steps = sum(1 for _ in batches)
      seconds = time.perf_counter() - start
    else:
      steps, seconds = _time_loop(batches)
  else:
    split = data.load_dataset('fashion_mnist', data_dir=directory).train
    examples = split.num_examples
    if 'scan' in kind:
      steps, seconds = _time_scan(split, _steps(examples))
    else:
      batches = data.train_batches(split, batch_size, seed=0, epoch=0)
      steps, seconds = _time_loop(itertools.islice(batches,
                                                   _steps(examples)))
  return {'examples': examples, 'steps': steps, 'seconds': seconds,
          'peak_rss_mib': _peak_rss_mib()}


# ----------------------------------------------------------- the whole table


def _run_in_subprocess(kind: str, directory: str) -> dict[str, float]:
  argv = [sys.executable, os.path.abspath(__file__), f'--measure={kind}',
          f'--data={directory}'] + [
              f'--{f.name}={f.value}' for f in (_EXAMPLES, _BATCH_SIZE, _STEPS,
                                                _MODEL, _THREADS, _PREFETCH)]
  result = subprocess.run(argv, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{kind} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _median_run(repeats: list[dict[str, float]]) -> dict[str, float]:
  """The repeat with the median rate, with the largest peak RSS of all."""
  ordered = sorted(repeats, key=lambda r: r['steps'] / max(r['seconds'],
                                                             1e-9))
  return {**ordered[len(ordered) // 2],
          'peak_rss_mib': max(r['peak_rss_mib'] for r in repeats)}


def _print_table(rows: list[tuple[str, dict[str, float]]]) -> None:
  print(f'| {_MODEL.value}, batch {_BATCH_SIZE.value}, median of '
        f'{_REPEATS.value} | train examples | steps timed | steps/s | '
        'examples/s | peak RSS MiB |')
  print('|---|---:|---:|---:|---:|---:|')
  for name, r in rows:
    rate = r['steps'] / r['seconds']
    speed = (f'{rate:.1f} | {rate * _BATCH_SIZE.value:,.0f}' if r['examples']
             else '- | -')
    print(f'| {name} | {r["examples"]:,} | {r["steps"]} | {speed} | '
          f'{r["peak_rss_mib"]:.0f} |')


def main(argv):
  del argv
  if _MEASURE.value:
    print(json.dumps(measure(_MEASURE.value, _DATA.value)))
    return
  if _steps(_EXAMPLES.value) < 2 * CHUNK:
    raise app.UsageError(
        f'{_steps(_EXAMPLES.value)} steps per run (--steps={_STEPS.value}, '
        f'at most one epoch of --examples={_EXAMPLES.value} at '
        f'--batch_size={_BATCH_SIZE.value}): the scan row times the chunks '
        f'after the first, so it needs at least {2 * CHUNK}')
  n, big = _EXAMPLES.value, _SCALE.value * _EXAMPLES.value
  print(f'machine: {common.machine_line()}')
  with tempfile.TemporaryDirectory(dir=_WORKDIR.value or None) as workdir:
    start = time.perf_counter()
    small_dir = write_dataset(os.path.join(workdir, 'small'), n)
    big_dir = write_dataset(os.path.join(workdir, 'big'), big)
    size = os.path.getsize(os.path.join(big_dir, idx.IDX_FILES['train'][0]))
    print(f'data: {n:,} and {big:,} synthetic 28x28 examples, uncompressed '
          f'IDX ({size / 2**20:,.0f} MiB of images for {big:,}), written '
          f'in {time.perf_counter() - start:.1f} s\n')
    runs = [('streaming', small_dir), ('streaming', big_dir),
            ('streaming, no read-ahead', small_dir),
            ('streaming, input only', big_dir), ('in memory', small_dir),
            (f'in memory, scan of {CHUNK}', small_dir), ('no data', small_dir)]
    repeats = [[] for _ in runs]
    for _ in range(_REPEATS.value):  # Interleaved, so drifts hit every row.
      for (kind, directory), results in zip(runs, repeats):
        results.append(_run_in_subprocess(kind, directory))
    rows = [(kind, _median_run(results))
            for (kind, _), results in zip(runs, repeats)]
  _print_table(rows)
  rate = lambda r: r['steps'] / r['seconds']
  (_, stream_n), (_, stream_big), _, _, (_, memory), (_, scan), _ = rows
  print(f'\nstreaming / in-memory throughput (N, Python loop): '
        f'{rate(stream_n) / rate(memory):.2f}x; against the scan: '
        f'{rate(stream_n) / rate(scan):.2f}x')
  print(f'streaming peak RSS, {big:,} / {n:,} examples: '
        f'{stream_big["peak_rss_mib"] / stream_n["peak_rss_mib"]:.2f}x; '
        f'in-memory / streaming on {n:,}: '
        f'{memory["peak_rss_mib"] / stream_n["peak_rss_mib"]:.2f}x')


if __name__ == '__main__':
  app.run(main)
