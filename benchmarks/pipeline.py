r"""The whole seed protocol on real data, fast path against the plain way.

  python benchmarks/pipeline.py [--plain_steps=300] [--data_dir=DIR]

1. Runs the seed experiment (teacher 5 epochs, distil 3, scratch 3, batch 64,
   per-epoch evaluation and the teacher-logit cache included) exactly as
   `python run.py` does, in a temporary workdir, and reports wall time per
   phase and in total.
2. In the same process, times the plain way: a jitted step called once per
   batch from host NumPy batches, the teacher run inside every distil step,
   for `--plain_steps` steps of each stage; whole-protocol times are
   extrapolated from those medians (plus compile and the same evaluations),
   so the speed-up is a ratio measured side by side. The plain way is timed
   with this library's models and with the seed CNN's original
   `flax.linen.max_pool` (what the tutorial's code translates to).
"""

import itertools
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax

import common  # pylint: disable=g-bad-import-order
from experiments import seed
from kd_jax import data
from kd_jax import distil_setup
from kd_jax import experiment
from kd_jax import loop
from kd_jax import models
from kd_jax import train

_PLAIN_STEPS = flags.DEFINE_integer(
    'plain_steps', 300, 'Steps of each stage timed on the plain path.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', '', 'IDX directory of Fashion-MNIST; default: auto.')


def _seed_config():
  config = seed.get_config()
  config.data_dir = _DATA_DIR.value
  return config


def _plain_seconds_per_step(step, state, dataset, config, n, *step_args):
  """Seconds of the first (compiling) step and mean seconds per step over the
  next n steps of the plain loop: a jitted step per host batch."""
  batches = data.train_batches(dataset.train, config.batch_size,
                               seed=config.seed, epoch=0)
  start = time.perf_counter()
  state, metrics = step(state, next(batches), *step_args)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  totals = None
  start = time.perf_counter()
  for batch in itertools.islice(batches, n):
    state, metrics = step(state, batch, *step_args)
    totals = train.accumulate(totals, metrics)
  jax.block_until_ready(totals)
  return first, (time.perf_counter() - start) / n


def _eval_seconds(state, dataset, config) -> float:
  loop.evaluate(state, dataset.test, config.eval_batch_size)  # compile
  start = time.perf_counter()
  loop.evaluate(state, dataset.test, config.eval_batch_size)
  return time.perf_counter() - start


def main(argv):
  del argv
  config = _seed_config()
  print(f'machine: {common.machine_line()}\n')

  start = time.perf_counter()
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir or None)
  load_s = time.perf_counter() - start
  print(f'data: {dataset.source}, {dataset.train.num_examples} train, '
        f'{dataset.test.num_examples} test, loaded in {load_s:.2f} s')

  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    experiment.run(config, workdir)
    fast_total = time.perf_counter() - start
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
  stages = results['stages']

  steps_per_epoch = data.num_train_batches(dataset.train.num_examples,
                                           config.batch_size)
  n = _PLAIN_STEPS.value
  teacher_epochs, student_epochs = config.teacher.epochs, config.student.epochs
  image_shape = dataset.train.images.shape[1:]

  def plain_protocol(teacher_model):
    """Extrapolated plain-loop seconds per stage for this teacher model."""
    student_model = models.make_model(config.student.model)
    new = lambda m: train.create_train_state(m, jax.random.PRNGKey(0),
                                             image_shape, 1e-3)
    teacher_state = new(teacher_model)
    first, per_step = _plain_seconds_per_step(
        train.make_train_step(), new(teacher_model), dataset, config, n)
    teacher_s = (first + per_step * teacher_epochs * steps_per_epoch
                 + teacher_epochs * _eval_seconds(teacher_state, dataset,
                                                  config))
    online = train.make_distill_step(
        distil_setup.distiller(config, teacher_model.apply))
    first, per_step = _plain_seconds_per_step(
        online, new(student_model), dataset, config, n,
        {'params': teacher_state.params})
    student_eval = student_epochs * _eval_seconds(new(student_model), dataset,
                                                  config)
    distill_s = first + per_step * student_epochs * steps_per_epoch + (
        student_eval)
    first, per_step = _plain_seconds_per_step(
        train.make_train_step(), new(student_model), dataset, config, n)
    scratch_s = first + per_step * student_epochs * steps_per_epoch + (
        student_eval)
    return {'teacher': teacher_s, 'distill': distill_s, 'scratch': scratch_s}

  plain = plain_protocol(models.make_model(config.teacher.model))
  before = plain_protocol(common.FlaxPoolSeedCNN(features=(64, 256)))

  print(f'\nseed protocol ({teacher_epochs}+{student_epochs}+{student_epochs} '
        f'epochs of {steps_per_epoch} steps; plain way extrapolated from '
        f'{n} steps per stage)\n')
  print('| phase | this library (s) | plain loop, same models (s) | ratio | '
        'plain loop, flax max_pool (s) | ratio |')
  print('|---|---:|---:|---:|---:|---:|')
  for stage in ('teacher', 'distill', 'scratch'):
    fast = stages[stage]['wall_time_s']
    note = ''
    if stage == 'distill':
      note = f' (teacher cache {stages[stage]["teacher_cache_s"]:.1f} s)'
    print(f'| {stage}{note} | {fast:.1f} | {plain[stage]:.1f} | '
          f'{plain[stage] / fast:.2f}x | {before[stage]:.1f} | '
          f'{before[stage] / fast:.2f}x |')
  other = fast_total - sum(s['wall_time_s'] for s in stages.values())
  plain_total = sum(plain.values()) + other
  before_total = sum(before.values()) + other
  print(f'| data, setup, writing | {other:.1f} | {other:.1f} | | {other:.1f} '
        '| |')
  print(f'| **total** | **{fast_total:.1f}** | {plain_total:.1f} | '
        f'**{plain_total / fast_total:.2f}x** | {before_total:.1f} | '
        f'**{before_total / fast_total:.2f}x** |')
  print(f'\naccuracies of the timed run: teacher '
        f'{results["teacher_accuracy"]:.4f}, distilled '
        f'{results["distilled_accuracy"]:.4f}, scratch '
        f'{results["scratch_accuracy"]:.4f}')


if __name__ == '__main__':
  app.run(main)
