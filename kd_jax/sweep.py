"""Sweeps: experiment configs x a grid of overrides x seeds, with statistics.

Each point of a sweep is one experiment config. Its teacher depends only on
some fields and its student from scratch on others, so points that agree on
them share those stages, each trained once:

  <workdir>/teachers/<key>/   stages=teacher
  <workdir>/scratch/<key>/    stages=scratch
  <workdir>/runs/<base>-<key>/  the point's distillation stages, from the
                              shared teacher's checkpoint (equal points of
                              different sweeps share it)

(`multi_teacher` points that train their own teachers run every stage in
runs/<base>-<key>/; points that load theirs, `teacher.checkpoint`, run only
their distillation stages there.) Every part is an `experiment.run` workdir,
so re-running a sweep resumes it and reuses what is done. `rows` reads one
row per point from the finished runs; `summarize` groups rows that differ
only in their seed and reports mean +- 95% CI and a paired test of
distilled vs scratch (the two students of one seed share initialisation and
data order).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import itertools
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from kd_jax import errors
from kd_jax import experiment
from kd_jax import fields
from kd_jax import logs
from kd_jax import parallel
from kd_jax import provenance
from kd_jax import stages
from kd_jax import stats
from kd_jax import validation
from kd_jax import workdir as workdir_lib

# Fields that never change what a stage computes.
_NEUTRAL_FIELDS = ('name', 'stages', 'num_seeds', 'teacher.checkpoint',
                   'checkpoint_every_steps', 'checkpoints_to_keep')


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    name: unique, also its directory name, e.g. 'kd/distill.kd.temperature=4,
      seed=1' becomes 'kd__distill.kd.temperature=4__seed=1'.
    base: the name of the base config it came from.
    overrides: the grid values it sets, dotted field -> value.
    config: the full config (validated), `num_seeds` = 1.
  """
  name: str
  base: str
  overrides: Mapping[str, Any]
  config: ml_collections.ConfigDict


def parse_grid_value(config: ml_collections.ConfigDict, field: str,
                     text: str) -> list[Any]:
  """`'1,2,4'` -> the values for `field`, typed like its current value.

  Raises:
    errors.UserInputError: unknown field or a value of the wrong type.
  """
  known = validation.schema(validation.flatten(config.to_dict()))
  if field not in known:
    raise errors.UserInputError(
        f'--grid {field}: not a field of this config (see kd_jax/validation.py '
        'FIELDS and the sections of config.distill)')
  kind = known[field].kind
  values = []
  for item in fields.parse_list(text):
    try:
      if kind is bool:
        if item.lower() not in ('true', 'false'):
          raise ValueError(item)
        values.append(item.lower() == 'true')
      else:
        values.append(kind(item))
    except ValueError as e:
      raise errors.UserInputError(
          f'--grid {field}={text}: {item!r} is not a {kind.__name__}') from e
  if not values:
    raise errors.UserInputError(f'--grid {field}: no values')
  return values


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `overrides` set."""
  values = config.to_dict()
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    target = values
    for name in parents:
      target = target[name]
    target[leaf] = value
  return ml_collections.ConfigDict(values)


def expand(bases: Mapping[str, ml_collections.ConfigDict],
           grid: Mapping[str, Sequence[Any]]) -> list[Point]:
  """Every base config x every combination of `grid`, validated up front.

  Raises:
    errors.UserInputError: an invalid point, or a grid field that lists one
      value twice (a seed counted twice would fake agreement between
      replicates); all are checked before any work starts.
  """
  for field, values in grid.items():
    repeated = sorted({str(v) for v in values
                       if sum(w == v for w in values) > 1})
    if repeated:
      raise errors.UserInputError(
          f'--grid={field}: {", ".join(repeated)} listed more than once; give '
          'each value once')
  points = []
  for base_name, base in bases.items():
    for values in itertools.product(*grid.values()):
      overrides = dict(zip(grid, values))
      config = with_overrides(base, {**overrides, 'num_seeds': 1})
      try:
        validation.validate(config)
      except errors.UserInputError as e:
        raise errors.UserInputError(
            f'sweep point {base_name} {overrides}: {e}') from e
      label = ','.join(f'{k}={v}' for k, v in overrides.items())
      name = '__'.join(p for p in (base_name, label.replace(',', '__')) if p)
      points.append(Point(name, base_name, overrides, config))
  return points


def _key(config: ml_collections.ConfigDict, drop: Sequence[str]) -> str:
  """A short hash of the fields of `config` outside `drop` (prefixes).

  Fields added later (`workdir_lib.ADDED_FIELD_DEFAULTS`) count only when
  not at their default, so runs written before they existed keep their key.
  """
  flat = validation.flatten(config.to_dict())
  kept = {k: v for k, v in flat.items()
          if k not in _NEUTRAL_FIELDS and not k.startswith(tuple(drop))
          and workdir_lib.ADDED_FIELD_DEFAULTS.get(k, object()) != v}
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()
                        ).hexdigest()[:12]


def teacher_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs whose teacher stage computes the same thing."""
  return _key(config, ('student.', 'distill.'))


def scratch_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs whose scratch stage computes the same thing."""
  return _key(config, ('teacher.', 'distill.'))


def _trains_own_teachers(config: ml_collections.ConfigDict) -> bool:
  return len(stages.teacher_stages(config)) > 1


def point_workdirs(point: Point, workdir: str) -> dict[str, str]:
  """The experiment workdirs of `point`'s teacher, distill and scratch
  stages (one directory for all three when it shares nothing; the distil
  run's own when the teachers are loaded from `teacher.checkpoint`)."""
  config = point.config
  # Named by content, so that equal points of different sweeps share a run.
  run_dir = os.path.join(workdir, 'runs',
                         f'{point.base}-{_key(config, ())}')
  loaded = fields.parse_list(config.teacher.checkpoint)
  if _trains_own_teachers(config) and not loaded:
    return {'teacher': run_dir, 'distill': run_dir, 'scratch': run_dir}
  return {'teacher': run_dir if loaded else os.path.join(
              workdir, 'teachers', teacher_key(config)),
          'distill': run_dir,
          'scratch': os.path.join(workdir, 'scratch', scratch_key(config))}


def run_point(point: Point, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one point and its shared stages; returns its row.

  `workdir` holds the point's runs (see `point_workdirs`).
  """
  config = point.config
  dirs = point_workdirs(point, workdir)
  if len(set(dirs.values())) == 1:
    results = experiment.run(config, dirs['distill'])
    return _row(point, results, results, results)
  scratch = experiment.run(with_overrides(
      config, {'stages': 'scratch', 'teacher.checkpoint': ''}),
                           dirs['scratch'])
  if dirs['teacher'] == dirs['distill']:  # Teachers loaded from elsewhere.
    results = experiment.run(with_overrides(config, {'stages': 'distill'}),
                             dirs['distill'])
    return _row(point, results, results, scratch)
  teacher = experiment.run(with_overrides(config, {'stages': 'teacher'}),
                           dirs['teacher'])
  results = experiment.run(with_overrides(config, {
      'stages': 'distill', 'teacher.checkpoint': os.path.join(
          dirs['teacher'], 'checkpoints', 'teacher')}), dirs['distill'])
  return _row(point, teacher, results, scratch)


def _calibration_fields(prefix: str, info: Mapping[str, Any]
                        ) -> dict[str, float]:
  calib = info.get('calibration') or {}
  return {f'{prefix}_{k}': calib[k] for k in (
      'test_ece', 'test_ece_scaled', 'temperature') if k in calib}


def distil_seconds(results: Mapping[str, Any]) -> float:
  """Wall time (s) of a run's distillation: its distil stage and the stages
  that lead to it (an assistant, a preparation stage), not its teachers."""
  return round(sum(info['wall_time_s'] for name, info in
                   results['stages'].items()
                   if not stages.is_teacher(name) and name != 'scratch'), 2)


def _row(point: Point, teacher: Mapping[str, Any],
         distilled: Mapping[str, Any],
         scratch: Mapping[str, Any]) -> dict[str, Any]:
  teacher_info = teacher['stages']['teacher']
  distill_info = distilled['stages']['distill']
  scratch_info = scratch['stages']['scratch']
  return {
      'point': point.name,
      'base': point.base,
      'overrides': dict(point.overrides),
      'seed': point.config.seed,
      'teacher_accuracy': distill_info.get('teacher_ensemble_accuracy',
                                           teacher_info['test_accuracy']),
      'distilled_accuracy': distill_info['test_accuracy'],
      'scratch_accuracy': scratch_info['test_accuracy'],
      'distill_wall_time_s': distil_seconds(distilled),
      **_calibration_fields('teacher', teacher_info),
      **_calibration_fields('distilled', distill_info),
      **_calibration_fields('scratch', scratch_info),
      'provenance': distilled.get('provenance'),
  }


def run_sweep(bases: Mapping[str, ml_collections.ConfigDict],
              grid: Mapping[str, Sequence[Any]], workdir: str, *,
              runs_dir: str | None = None) -> list[dict[str, Any]]:
  """Runs every point of `bases` x `grid` (resuming), writes the results.

  Writes `workdir/rows.jsonl` (one row per point) and `workdir/summary.json`
  / `summary.md` (see `summarize`).

  Args:
    bases: name -> experiment config.
    grid: dotted field -> values, e.g. `{'distill.kd.temperature': [1, 4],
      'seed': [0, 1, 2]}`; the product is swept for every base.
    workdir: the sweep's directory.
    runs_dir: where the runs go (teachers/, scratch/, runs/); default
      `workdir`. Sweeps that share it share their teachers.

  Returns:
    The rows, in grid order.
  """
  points = expand(bases, grid)
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    if parallel.is_main_process():
      lock.take()
    rows = _run_points(points, runs_dir or workdir)
    if parallel.is_main_process():
      _write_summary(rows, workdir)
  finally:
    lock.release()
  parallel.sync('kd_jax sweep summary written')
  return rows


def _run_points(points: Sequence[Point], runs_dir: str
                ) -> list[dict[str, Any]]:
  rows = []
  bar = logs.progress(len(points), 'sweep', unit='run')
  for point in points:
    logging.info('sweep: run %d/%d: %s', len(rows) + 1, len(points),
                 point.name)
    rows.append(run_point(point, runs_dir))
    # Each run compiles its own steps; without this, a long sweep's process
    # keeps every executable and runs out of memory mappings (LLVM's
    # "Cannot allocate memory" after ~25 runs of compare_methods.py). They
    # come back from the persistent compilation cache when needed again.
    jax.clear_caches()
    bar.update()
  bar.close()
  return rows


def _write_summary(rows: list[dict[str, Any]], workdir: str) -> None:
  """rows.jsonl, summary.json and summary.md of a sweep in `workdir`."""
  with open(os.path.join(workdir, 'rows.jsonl'), 'w') as f:
    f.writelines(json.dumps(row, sort_keys=True) + '\n' for row in rows)
  groups = summarize(rows)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(groups, f, indent=2, sort_keys=True)
  warning = provenance.mixed_sources_warning(rows)
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(summary_table(groups) + (f'\n{warning}\n' if warning else ''))


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Groups rows that differ only in their seed; statistics per group.

  Returns:
    One dict per group, in first-appearance order: `base`, `overrides`
    (without seed), `seeds`, and for teacher, distilled and scratch
    accuracy `<role>_mean` / `<role>_ci` (95% half width), the paired
    difference distilled - scratch (`difference_mean`, `difference_ci`,
    `p_value`, two-sided paired t-test over seeds), and mean ECEs.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    overrides = {k: v for k, v in row['overrides'].items() if k != 'seed'}
    key = json.dumps([row['base'], overrides], sort_keys=True)
    groups.setdefault(key, []).append(row)
  summary = []
  for key, members in groups.items():
    base, overrides = json.loads(key)
    group = {'base': base, 'overrides': overrides,
             'seeds': [row['seed'] for row in members]}
    for role in ('teacher', 'distilled', 'scratch'):
      mean, ci = stats.mean_ci([row[f'{role}_accuracy'] for row in members])
      group[f'{role}_mean'], group[f'{role}_ci'] = mean, ci
      for field in ('test_ece', 'test_ece_scaled'):
        values = [row[f'{role}_{field}'] for row in members
                  if f'{role}_{field}' in row]
        if values:
          group[f'{role}_{field}_mean'] = sum(values) / len(values)
    paired = stats.paired_test([row['distilled_accuracy'] for row in members],
                               [row['scratch_accuracy'] for row in members])
    group.update(difference_mean=paired.mean_difference,
                 difference_ci=paired.ci_half_width, p_value=paired.p_value)
    summary.append(group)
  return summary


def _label(group: Mapping[str, Any]) -> str:
  settings = ', '.join(f'{k}={v}' for k, v in group['overrides'].items())
  return f'{group["base"]}' + (f' ({settings})' if settings else '')


def summary_table(groups: Sequence[Mapping[str, Any]]) -> str:
  """`summarize`'s groups as a Markdown table, with how to read it."""
  lines = ['| run | seeds | teacher | student, distilled | student, scratch | '
           'distilled - scratch (paired) | p | ECE teacher | ECE distilled | '
           'ECE scratch |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for g in groups:
    fmt = lambda role: stats.format_mean_ci(g[f'{role}_mean'], g[f'{role}_ci'])
    ece = lambda role: (
        'n/a' if f'{role}_test_ece_mean' not in g else
        f'{100 * g[f"{role}_test_ece_mean"]:.2f} → '
        f'{100 * g[f"{role}_test_ece_scaled_mean"]:.2f}')
    lines.append(
        f'| {_label(g)} | {len(g["seeds"])} | {fmt("teacher")} | '
        f'{fmt("distilled")} | {fmt("scratch")} | '
        f'{stats.format_mean_ci(g["difference_mean"], g["difference_ci"])} | '
        f'{stats.format_p(g["p_value"])} | {ece("teacher")} | '
        f'{ece("distilled")} | {ece("scratch")} |')
  lines.append(
      '\nTest accuracy (%) after the last epoch (never the best epoch), mean '
      '± 95% confidence interval (Student t) over seeds; "distilled - '
      'scratch" is the mean per-seed difference (the two students of a seed '
      'share initialisation and data order) with its 95% CI, and p the '
      'two-sided paired t-test. ECE (%): expected calibration error on the '
      'test split (15 equal-width bins), mean over seeds, before → after '
      'temperature scaling with T fitted on the held-out validation split.\n')
  return '\n'.join(lines) + '\n'


def plot_sweep(groups: Sequence[Mapping[str, Any]],
               grid: Mapping[str, Sequence[Any]], workdir: str) -> str | None:
  """Accuracy vs the swept field, with 95% CI bands, for a sweep over one
  numeric field besides seed: `workdir/plots/sweep_<field>.png`.

  The student from scratch is a dashed baseline when the swept field does
  not change it (e.g. a distillation setting), else a second series.
  Returns the path, or None for other sweeps.
  """
  from kd_jax import plots  # pylint: disable=g-import-not-at-top
  fields = [f for f in grid if f != 'seed']
  if len(fields) != 1 or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool)
      for v in grid[fields[0]]):
    return None
  field = fields[0]
  points = [{'series': f'student, distilled ({g["base"]})',
             'x': float(g['overrides'][field]), 'mean': g['distilled_mean'],
             'ci': g['distilled_ci']} for g in groups]
  baseline = None
  if len({(g['scratch_mean'], g['scratch_ci']) for g in groups}) == 1:
    baseline = {'label': 'student, from scratch',
                'mean': groups[0]['scratch_mean'],
                'ci': groups[0]['scratch_ci']}
  else:
    points += [{'series': 'student, from scratch',
                'x': float(g['overrides'][field]), 'mean': g['scratch_mean'],
                'ci': g['scratch_ci']} for g in groups]
  values = [float(v) for v in grid[field]]
  return plots.sweep_figure(
      os.path.join(workdir, 'plots', f'sweep_{field}.png'), points,
      x_label=field, log_x=min(values) > 0 and max(values) / min(values) > 10,
      baseline=baseline)
