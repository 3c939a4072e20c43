r"""Compares the distillation methods on Fashion-MNIST from one teacher.

  python compare_methods.py                      # the strong teacher (bn_cnn)
  python compare_methods.py --variant=quick --workdir=/tmp/methods

Trains the teacher and the student from scratch once, then each method's
student (see `kd_jax.compare`), each in its own directory under --workdir
(re-running resumes), and writes methods.md and methods.json there.
"""

import importlib
import json
import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging

import run
from kd_jax import compare
from kd_jax import errors

_VARIANT = flags.DEFINE_string(
    'variant', 'strong', 'Variant(s) of every experiment config, e.g. strong, '
    'quick or strong,quick (see experiments/seed.py).')
_METHODS = flags.DEFINE_list(
    'methods', list(compare.REFERENCES), 'Methods to compare (an '
    'experiments/<method>.py each; kd is experiments/seed.py).')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where every run goes; default runs/methods_<variant>.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'config.data_dir of every run.')
_DATA_SOURCE = flags.DEFINE_string('data_source', 'auto',
                                   'config.data_source of every run.')


def _config(method: str):
  module = importlib.import_module(
      'experiments.' + ('seed' if method == 'kd' else method))
  config = module.get_config(_VARIANT.value)
  config.data_dir, config.data_source = _DATA_DIR.value, _DATA_SOURCE.value
  return config


def main(argv):
  del argv
  pylogging.getLogger('absl').addFilter(run._QuietOrbax())  # pylint: disable=protected-access
  unknown = sorted(set(_METHODS.value) - set(compare.REFERENCES))
  if unknown:
    run.exit_with_error(ValueError(
        f'--methods: unknown {", ".join(unknown)}; known: '
        f'{", ".join(compare.REFERENCES)}'))
  methods = ['kd'] + [m for m in _METHODS.value if m != 'kd']
  workdir = _WORKDIR.value or os.path.join(
      'runs', 'methods_' + _VARIANT.value.replace(',', '_'))
  try:
    configs = {method: _config(method) for method in methods}
    rows = compare.run_comparison(configs, workdir)
  except (errors.UserInputError, ValueError) as e:
    run.exit_with_error(e)
  rows = [row for row in rows if row['method'] in _METHODS.value]
  table = compare.methods_table(rows)
  with open(os.path.join(workdir, 'methods.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(workdir, 'methods.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  logging.info('wrote %s', os.path.join(workdir, 'methods.md'))
  print(table)


if __name__ == '__main__':
  app.run(main)
