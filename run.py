r"""Runs a kd_jax experiment: flags -> config -> `kd_jax.experiment.run`.

  python run.py --config=experiments/seed.py --workdir=runs/seed
  python run.py --config=experiments/seed.py:quick --workdir=/tmp/x
  python run.py --config.distill.temperature=4 --config.seed=3
  python run.py --config=experiments/seed.py:strong --config.num_seeds=5

Several processes (hosts), each running the same command (see README):
  python run.py --multihost ...                      # TPU pod slice, Slurm, MPI
  python run.py --coordinator_address=host0:1234 --num_processes=2 \
      --process_id=0 ...                             # anywhere else

Kept short on purpose: the logic lives in the library, where it can be imported
and tested.
"""

import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kd_jax import errors
from kd_jax import experiment
from kd_jax import parallel
from kd_jax import sweep
from kd_jax import train

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'experiments',
                              'seed.py')
# Mistakes in flags or config overrides surface as these; they are reported in
# one line instead of a traceback.
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, TypeError,
                ValueError)


def define_flags() -> None:
  """Defines --config and --workdir (reading the config file and overrides)."""
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG,
      'Experiment config file, optionally with a variant: file.py:quick.',
      lock_config=True)
  flags.DEFINE_bool(
      'start_over', False, 'Delete what an earlier run wrote in --workdir '
      '(its config, metrics, checkpoints and results; nothing else) and start '
      'again, even with a different config.')
  flags.DEFINE_string(
      'workdir', None, 'Directory for all outputs of the run; re-running the '
      'same command resumes there. Default: runs/<config.name>.')


def define_distributed_flags() -> None:
  """Flags that make this process one of a multi-process (multi-host) run."""
  flags.DEFINE_bool(
      'multihost', False, 'Join a multi-process run whose processes JAX '
      'finds by itself: a Cloud TPU pod slice, Slurm or Open MPI.')
  flags.DEFINE_string(
      'coordinator_address', '', 'host:port of process 0, for a multi-process '
      'run launched by hand; default $JAX_COORDINATOR_ADDRESS.')
  flags.DEFINE_integer('num_processes', 0, 'Processes of a multi-process run '
                       'launched by hand.')
  flags.DEFINE_integer('process_id', -1, 'This process\'s index, 0 to '
                       '--num_processes - 1.')


def start_distributed() -> None:
  """Starts JAX's distributed runtime if the flags ask for it.

  Processes other than process 0 then log warnings and errors only: they
  train in lockstep with process 0, which logs and writes the outputs.
  """
  try:
    parallel.initialize_distributed(
        coordinator_address=flags.FLAGS.coordinator_address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id,
        auto_detect=flags.FLAGS.multihost)
  except errors.UserInputError as e:
    exit_with_error(e)
  if not parallel.is_main_process():
    logging.set_verbosity(logging.WARNING)


def _message(error: BaseException) -> str:
  """The user-facing text of `error`, unwrapped from re-raised errors."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])  # str(KeyError) would quote and escape it.
  return str(error)


def exit_with_error(error: Exception) -> None:
  """Prints `error`'s message without tracebacks and exits with status 2."""
  lines = [line for line in _message(error).splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    lines = [lines[0], lines[-1]]  # ml_collections embeds the config's one.
  print('error: ' + '\n'.join(lines), file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with user mistakes reported by `exit_with_error`."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    exit_with_error(e)


class _QuietOrbax:
  """Logging filter: orbax's INFO lines (one per file it writes) are noise."""

  def filter(self, record) -> bool:
    return (record.levelno >= pylogging.WARNING
            or 'orbax' not in record.pathname)


def quiet_orbax_logs() -> None:
  """Drops orbax's INFO lines from absl's log (for every entry point)."""
  pylogging.getLogger('absl').addFilter(_QuietOrbax())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  quiet_orbax_logs()
  start_distributed()
  try:  # A config file that failed to load fails here, on first use.
    config = flags.FLAGS.config
    default_workdir = os.path.join('runs', config.name)
  except _FLAG_ERRORS as e:
    exit_with_error(e)
  workdir = flags.FLAGS.workdir or default_workdir
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
    exit_with_error(e)
  except train.NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if parallel.is_main_process():
    with open(os.path.join(workdir, results_file)) as f:
      print(f.read())
    print(f'results: {os.path.join(workdir, results_file)}')


if __name__ == '__main__':
  try:
    define_flags()
    define_distributed_flags()
  except _FLAG_ERRORS as e:
    exit_with_error(e)
  app.run(main, flags_parser=parse_flags)
