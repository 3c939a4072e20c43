r"""Runs a kd_jax experiment: flags -> config -> `kd_jax.experiment.run`.

  python run.py --config=experiments/seed.py --workdir=runs/seed
  python run.py --config=experiments/seed.py:quick --workdir=/tmp/x
  python run.py --config.distill.temperature=4 --config.seed=3

Kept short on purpose: the logic lives in the library, where it can be imported
and tested.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kd_jax import errors
from kd_jax import experiment

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), 'experiments', 'seed.py'),
    'Experiment config file, optionally with a variant: file.py:quick.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for all outputs of the run; re-running the same '
    'command resumes there. Default: runs/<config.name>.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', config.name)
  logging.info('workdir: %s', workdir)
  try:
    experiment.run(config, workdir)
  except errors.UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  with open(os.path.join(workdir, 'results.md')) as f:
    print(f.read())
  print(f'results: {os.path.join(workdir, "results.json")}')


if __name__ == '__main__':
  app.run(main)
