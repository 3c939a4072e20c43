r"""Runs a sweep: one experiment config x a grid of overrides (x seeds).

  python sweep.py --config=experiments/seed.py:strong \
      --grid=distill.kd.temperature=1,2,4,10,20 --grid=seed=0,1,2,3,4 \
      --workdir=runs/sweep_temperature

--config takes the usual overrides (--config.student.epochs=5). Points that
share a teacher (or a student from scratch) train it once; re-running the
same command resumes, and adding values to the grid reuses what is done.
Writes rows.jsonl, summary.json, summary.md and, for one swept field
besides seed, plots/sweep_<field>.png, under --workdir.

The command behind `sweep.py` (also `kd-jax-sweep` in an installed
kd_jax); importing this module defines its flags.
"""

import os

import sys

from absl import flags
from absl import logging

from kd_jax import cli
from kd_jax import errors
from kd_jax import parallel
from kd_jax import sweep

try:  # The default config takes its --config.X overrides here.
  cli.define_config_flag()
except cli.FLAG_ERRORS as e:
  cli.exit_with_error(cli.flag_error(e, sys.argv))
_GRID = flags.DEFINE_multi_string(
    'grid', [], 'FIELD=V1,V2,...: values of one config field (dotted name); '
    'repeat for a grid over several fields.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'The sweep\'s directory; default runs/sweep_<name>.')


def parse_grid(config, specs):
  """['distill.kd.temperature=1,2'] -> {'distill.kd.temperature': [1.0, 2.0]}."""
  grid = {}
  for spec in specs:
    field, sep, values = spec.partition('=')
    if not sep:
      raise errors.UserInputError(f'--grid={spec}: expected FIELD=V1,V2,...')
    if field in grid:
      raise errors.UserInputError(f'--grid: {field} given twice')
    grid[field] = sweep.parse_grid_value(config, field, values)
  return grid


def main(argv):
  config = cli.start(argv)
  try:
    workdir = _WORKDIR.value or os.path.join('runs', f'sweep_{config.name}')
    grid = parse_grid(config, _GRID.value)
    rows = sweep.run_sweep({config.name: config}, grid, workdir)
    if parallel.is_main_process():
      sweep.plot_sweep(sweep.summarize(rows), grid, workdir)
  except errors.UserInputError as e:
    cli.exit_with_error(e)
  except OSError as e:
    cli.exit_with_filesystem_error(e, workdir)
  if not parallel.is_main_process():
    return
  with open(os.path.join(workdir, 'summary.md')) as f:
    print(f.read())
  logging.info('sweep: %d runs in %s', len(rows), workdir)


def console_main() -> None:
  """`python sweep.py` and the `kd-jax-sweep` console script."""
  cli.define_distributed_flags()
  cli.run(main)
