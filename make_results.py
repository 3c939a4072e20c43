r"""Regenerates the README's results: every table and figure, from scratch.

  python make_results.py                  # 5 seeds, Fashion-MNIST (~80 min)
  python make_results.py --studies=alpha  # one study; other sections kept

Runs three sweeps (see sweep.py), resumable, under --workdir (their runs
in --workdir/shared, so that they share teachers):
  seed_protocol  the tutorial's protocol (experiments/seed.py), per seed
  temperature    the strong teacher and the MLP student (seed.py:strong,mlp)
                 distilled at several temperatures, per seed
  alpha          the same at several alphas (T = 4)
then copies their summary tables and figures to --out (results/ in the
repository) and rewrites the README's sections between
<!-- results:NAME --> and <!-- /results:NAME --> markers.
"""

import importlib
import json
import os
import re
import shutil

from absl import flags
from absl import logging

from kd_jax import cli
from kd_jax import errors
from kd_jax import reports
from kd_jax import stages
from kd_jax import sweep
from kd_jax import workdir as workdir_lib

_SEEDS = flags.DEFINE_integer('seeds', 5, 'Seeds per setting (>= 2).')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/results',
                               'Where the sweeps run (resumable).')
_OUT = flags.DEFINE_string('out', 'results',
                           'Where tables and figures are copied.')
_README = flags.DEFINE_string('readme', 'README.md',
                              'README whose marked sections are rewritten; '
                              '"" = none.')
_VARIANT = flags.DEFINE_string(
    'variant', '', 'Extra variant for every config (quick: a smoke test).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'config.data_dir of every run.')
_DATA_SOURCE = flags.DEFINE_string('data_source', 'auto',
                                   'config.data_source of every run.')

_TEMPERATURES = flags.DEFINE_list('temperatures', ['1', '4', '20'],
                                  'Temperatures of the temperature sweep.')
_ALPHAS = flags.DEFINE_list('alphas', ['0.1', '0.5', '0.9'],
                            'Alphas of the alpha sweep.')
_STUDIES = flags.DEFINE_list(
    'studies', ['seed_protocol', 'temperature', 'alpha'],
    'The studies to run (the README sections to rewrite); the figures come '
    'from the last one.')


def _config(*variants: str):
  seed = importlib.import_module('experiments.seed')
  config = seed.get_config(','.join(v for v in (*variants, _VARIANT.value)
                                    if v))
  config.data_dir, config.data_source = _DATA_DIR.value, _DATA_SOURCE.value
  return config


def studies(seeds: list[int]):
  """name -> (bases, grid, description) of every sweep in the README."""
  strong = {'strong_mlp': _config('strong', 'mlp')}
  setting = ('bn_cnn teacher (seed.py:strong) -> Hinton\'s MLP student, 10 '
             'epochs, T^2 on (seed.py:strong,mlp)')
  return {
      'seed_protocol': ({'seed': _config()}, {'seed': seeds},
                        'the tutorial\'s protocol (experiments/seed.py: '
                        'seed CNNs, alpha = 0.1, T = 10, no T^2)'),
      'temperature': (strong, {
          'distill.kd.temperature': [float(t) for t in _TEMPERATURES.value],
          'seed': seeds}, f'{setting}, alpha = 0.1'),
      # alpha weighs both terms (ce.weight = alpha, kd.weight = 1 - alpha):
      # one base config per value.
      'alpha': ({f'alpha={a}': _with_alpha(_config('strong', 'mlp'), float(a))
                 for a in _ALPHAS.value}, {'seed': seeds},
                f'{setting}, T = 4'),
  }


def _with_alpha(config, alpha: float):
  """`config` with the tutorial's alpha: CE weight alpha, KD 1 - alpha."""
  config.distill.ce.weight, config.distill.kd.weight = alpha, 1.0 - alpha
  return config


def replace_section(text: str, name: str, content: str) -> str:
  """`text` with the lines between the markers of section `name` replaced."""
  pattern = re.compile(rf'(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)',
                       re.DOTALL)
  if not pattern.search(text):
    raise errors.UserInputError(f'README has no <!-- results:{name} --> ... '
                                f'<!-- /results:{name} --> section')
  return pattern.sub(lambda m: m.group(1) + content + m.group(2), text)


def write_run_figures(point: sweep.Point, workdir: str, out: str) -> None:
  """Training curves, reliability diagrams and the tempered-softmax figure
  of one sweep point, its shared teacher and scratch stages included."""
  parts = sweep.point_workdirs(point, workdir)
  records, results = [], {'stages': {}}
  for stage, part in parts.items():
    records += workdir_lib.read_metrics(part)
    with open(os.path.join(part, 'results.json')) as f:
      results['stages'][stage] = json.load(f)['stages'][stage]
  reports.write_plots(out, records, results,
                      stages.stage_titles(point.config))
  shutil.copy(os.path.join(parts['teacher'], 'plots', 'tempered_softmax.png'),
              os.path.join(out, 'tempered_softmax.png'))


def main(argv):
  del argv
  cli.configure_jax()
  cli.quiet_orbax_logs()
  if _SEEDS.value < 2:
    cli.exit_with_error(ValueError('--seeds: at least 2 for confidence '
                                   'intervals'))
  seeds = list(range(_SEEDS.value))
  every = studies(seeds)
  unknown = sorted(set(_STUDIES.value) - set(every))
  if unknown or not _STUDIES.value:
    cli.exit_with_error(ValueError(
        f'--studies: expected names from {", ".join(every)}, got '
        f'{",".join(_STUDIES.value) or "none"}'))
  chosen = {name: every[name] for name in every if name in _STUDIES.value}
  os.makedirs(_OUT.value, exist_ok=True)
  sections = {}
  try:
    for name, (bases, grid, description) in chosen.items():
      workdir = os.path.join(_WORKDIR.value, name)
      rows = sweep.run_sweep(bases, grid, workdir, runs_dir=os.path.join(
          _WORKDIR.value, 'shared'))
      figure = sweep.plot_sweep(sweep.summarize(rows), grid, workdir)
      with open(os.path.join(workdir, 'summary.md')) as f:
        sections[name] = f'Setting: {description}.\n\n' + f.read()
      if figure:
        shutil.copy(figure, os.path.join(_OUT.value, f'{name}.png'))
      with open(os.path.join(_OUT.value, f'{name}.md'), 'w') as f:
        f.write(sections[name])
    # The run figures: seed 0 of the first base of the last study run.
    bases, grid, _ = list(chosen.values())[-1]
    point = next(p for p in sweep.expand(bases, grid)
                 if p.base == next(iter(bases)) and p.overrides['seed'] == 0)
    write_run_figures(point, os.path.join(_WORKDIR.value, 'shared'),
                      _OUT.value)
    if _README.value:
      with open(_README.value) as f:
        text = f.read()
      for name, content in sections.items():
        text = replace_section(text, name, content)
      with open(_README.value, 'w') as f:
        f.write(text)
  except errors.UserInputError as e:
    cli.exit_with_error(e)
  for name, content in sections.items():
    print(f'## {name}\n\n{content}')
  logging.info('results in %s', _OUT.value)


if __name__ == '__main__':
  cli.run(main, parse=False)
