"""The `run.py` command (also the `kd-jax-run` console script of an
installed kd_jax): flags -> config -> `kd_jax.experiment.run`.

  python run.py --config=experiments/seed.py --workdir=runs/seed
  kd-jax-run --config=experiments/seed.py:quick --workdir=/tmp/x

Kept short on purpose: the logic lives in the library, where it can be
imported and tested.
"""


import os
import sys

from absl import flags
from absl import logging

from kd_jax import cli
from kd_jax import errors
from kd_jax import experiment
from kd_jax import loop
from kd_jax import parallel
from kd_jax import sweep


def define_flags() -> None:
  """Defines --config, --workdir and --start_over."""
  cli.define_config_flag()
  flags.DEFINE_bool(
      'start_over', False, 'Delete what an earlier run wrote in --workdir '
      '(its config, metrics, checkpoints and results; nothing else) and start '
      'again, even with a different config.')
  flags.DEFINE_string(
      'workdir', None, 'Directory for all outputs of the run; re-running the '
      'same command resumes there. Default: runs/<config.name>.')


def main(argv: list[str]) -> None:
  config = cli.start(argv)
  workdir = flags.FLAGS.workdir or os.path.join('runs', config.name)
  logging.info('workdir: %s', workdir)
  try:
    if config.num_seeds > 1:
      if flags.FLAGS.start_over:
        raise errors.UserInputError(
            '--start_over with config.num_seeds > 1: delete the runs to '
            f'redo under {workdir} instead')
      sweep.run_sweep({config.name: config}, {'seed': [
          config.seed + k for k in range(config.num_seeds)]}, workdir)
      results_file = 'summary.md'
    else:
      experiment.run(config, workdir, start_over=flags.FLAGS.start_over)
      results_file = 'results.md'
  except errors.UserInputError as e:
    cli.exit_with_error(e)
  except OSError as e:
    cli.exit_with_filesystem_error(e, workdir)
  except loop.NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if parallel.is_main_process():
    with open(os.path.join(workdir, results_file)) as f:
      print(f.read())
    print(f'results: {os.path.join(workdir, results_file)}')


def console_main() -> None:
  """Defines the flags and runs `main` (`python run.py`, `kd-jax-run`)."""
  try:
    define_flags()
    cli.define_distributed_flags()
  except cli.FLAG_ERRORS as e:
    cli.exit_with_error(cli.flag_error(e, sys.argv))
  cli.run(main)
