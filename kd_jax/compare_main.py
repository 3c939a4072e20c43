r"""Compares the distillation methods on Fashion-MNIST from one teacher.

  python compare_methods.py                       # strong teacher, seed 0
  python compare_methods.py --seeds=0,1,2,3,4     # five seeds, with CIs
  python compare_methods.py --variant=quick --workdir=/tmp/methods

A sweep (see `kd_jax.sweep`) over experiments/<method>.py, each with
--variant (default: the strong teacher, with augmentation): each teacher is
trained once, with seed 0, and every method and seed distils from it; the
student from scratch is trained once per seed and shared by the methods.
Re-running resumes. Writes methods.md there (each method against the
student from scratch and against KD, paired by seed), and the sweep's
rows.jsonl and summary files.

The command behind `compare_methods.py` (also `kd-jax-compare` in an installed
kd_jax); importing this module defines its flags.
"""

import importlib
import importlib.util
import os

from absl import flags
from absl import logging

from kd_jax import cli
from kd_jax import compare
from kd_jax import errors
from kd_jax import methods

_VARIANT = flags.DEFINE_string(
    'variant', 'strong,augment', 'Variant(s) of every experiment config, '
    'e.g. strong, quick or strong,augment (see experiments/seed.py).')
_METHODS = flags.DEFINE_list(
    'methods', list(methods.METHODS), 'Methods to compare (an '
    'experiments/<method>.py each; kd is experiments/seed.py).')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds to run every method with.')
_TEACHER_PER_SEED = flags.DEFINE_bool(
    'teacher_per_seed', False, 'Train the teachers again for every seed; by '
    'default each is trained once, with seed 0, and every seed distils from '
    'it.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where every run goes; default runs/methods_<variant>.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'config.data_dir of every run.')
_DATA_SOURCE = flags.DEFINE_string('data_source', 'auto',
                                   'config.data_source of every run.')


def method_config(method: str, variant: str):
  """experiments/<method>.py's config; for the method without a file of
  its own (KD, the tutorial's), experiments/seed.py's."""
  name = f'experiments.{method}'
  module = importlib.import_module(
      name if importlib.util.find_spec(name) else 'experiments.seed')
  config = module.get_config(variant)
  config.data_dir, config.data_source = _DATA_DIR.value, _DATA_SOURCE.value
  return config


def teacher_description(config) -> str:
  count = methods.num_teachers(config)
  return (f'{count} x ' if count > 1 else '') + config.teacher.model


def main(argv):
  del argv
  cli.configure_jax()
  cli.quiet_orbax_logs()
  unknown = sorted(set(_METHODS.value) - set(methods.METHODS))
  if unknown:
    cli.exit_with_error(ValueError(
        f'--methods: unknown {", ".join(unknown)}; known: '
        f'{", ".join(methods.METHODS)}'))
  workdir = _WORKDIR.value or os.path.join(
      'runs', 'methods_' + _VARIANT.value.replace(',', '_'))
  try:
    seeds = [int(s) for s in _SEEDS.value]
    configs = {m: method_config(m, _VARIANT.value) for m in _METHODS.value}
    groups = compare.run_comparison(
        configs, workdir, seeds,
        teacher_seed=None if _TEACHER_PER_SEED.value else 0)
  except (errors.UserInputError, ValueError) as e:
    cli.exit_with_error(e)
  table = compare.methods_table(
      groups, {m: teacher_description(c) for m, c in configs.items()})
  with open(os.path.join(workdir, 'methods.md'), 'w') as f:
    f.write(table)
  logging.info('wrote %s', os.path.join(workdir, 'methods.md'))
  print(table)


def console_main() -> None:
  """`python compare_methods.py` and the `kd-jax-compare` console script."""
  cli.run(main, parse=False)
