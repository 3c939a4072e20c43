r"""The CIFAR-100 benchmark table: teacher -> student pairs x methods x seeds.

  python benchmark_cifar100.py --methods=kd,dkd --seeds=0,1,2
  python benchmark_cifar100.py --pairs=resnet56_resnet20 --methods=kd
  python benchmark_cifar100.py --variant=quick --data_dir=DIR  # smoke test

For each pair (experiments/cifar100/<teacher>_<student>.py, default all 13
of the CRD table) a method comparison (`kd_jax.compare.run_comparison`, a
sweep over seeds): one teacher, trained once with seed 0 (as the
literature distils every seed from one pretrained teacher), and per seed one
student from scratch, shared by every method. Resumable: re-run the same
command after a stop.
Writes <workdir>/cifar100.md, the table in the literature's layout (pairs
as columns, methods as rows, last-epoch accuracy mean ± 95% CI, the paired
test against the scratch student), and each pair's sweep files under
<workdir>/<pair>/. Each run is 240 epochs per stage: see the README for the
hours this takes on one GPU.

The command behind `benchmark_cifar100.py` (also `kd-jax-cifar100` in an installed
kd_jax); importing this module defines its flags.
"""

import importlib
import os

from absl import flags
from absl import logging

from experiments.cifar100 import common
from kd_jax import cli
from kd_jax import compare
from kd_jax import errors
from kd_jax import methods

_PAIRS = flags.DEFINE_list(
    'pairs', [f'{t}_{s}' for t, s in common.PAIRS],
    'Pairs, as the names of their configs in experiments/cifar100/.')
_METHODS = flags.DEFINE_list('methods', [common.DEFAULT_METHOD],
                             'Methods to run on each '
                             'pair (kd_jax.methods.METHODS).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of every run.')
_TEACHER_PER_SEED = flags.DEFINE_bool(
    'teacher_per_seed', False, 'Train each pair\'s teacher again for every '
    'seed; by default it is trained once, with seed 0.')
_VARIANT = flags.DEFINE_string('variant', '', 'Extra variant of every config '
                               '(quick: a smoke test).')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/cifar100',
                               'Where every run goes.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'config.data_dir of every run.')


def _pair(name: str) -> tuple[str, str]:
  known = {f'{t}_{s}': (t, s) for t, s in common.PAIRS}
  if name not in known:
    raise errors.UserInputError(
        f'--pairs: unknown pair {name!r}; known: {", ".join(known)}')
  return known[name]


def main(argv):
  del argv
  cli.configure_jax()
  cli.quiet_orbax_logs()
  try:
    pairs = [_pair(name) for name in _PAIRS.value]
    unknown = sorted(set(_METHODS.value) - set(methods.METHODS)
                     | set(_METHODS.value) & set(common.UNSUPPORTED))
    if unknown:
      raise errors.UserInputError(
          f'--methods: {", ".join(unknown)} cannot run on a pair; choose from '
          + ', '.join(m for m in methods.METHODS if m not in common.UNSUPPORTED))
    seeds = [int(s) for s in _SEEDS.value]
    configs = {}
    for teacher, student in pairs:
      module = importlib.import_module(
          f'experiments.cifar100.{teacher}_{student}')
      configs[teacher, student] = {}
      for method in _METHODS.value:
        config = module.get_config(','.join(v for v in (method,
                                                        _VARIANT.value) if v))
        config.data_dir = _DATA_DIR.value
        configs[teacher, student][method] = config
    teacher_seed = None if _TEACHER_PER_SEED.value else 0
    groups = {pair: compare.run_comparison(
        by_method, os.path.join(_WORKDIR.value, '_'.join(pair)), seeds,
        teacher_seed=teacher_seed)
              for pair, by_method in configs.items()}
  except (errors.UserInputError, ValueError) as e:
    cli.exit_with_error(e)
  table = compare.pairs_table(groups)
  path = os.path.join(_WORKDIR.value, 'cifar100.md')
  with open(path, 'w') as f:
    f.write(table)
  logging.info('wrote %s', path)
  print(table)


def console_main() -> None:
  """`python benchmark_cifar100.py` and the `kd-jax-cifar100` console script."""
  cli.run(main, parse=False)
