"""Compares distillation methods on one teacher: a sweep over method configs.

`run_comparison` is `sweep.run_sweep` with one base config per method and a
grid over seeds: methods whose teacher settings agree share one trained
teacher and one student from scratch per seed; born-again networks, whose
teacher is the student's architecture, and ensemble distillation, which
distils from several, get theirs. By default each teacher is trained once,
at one seed, and every seed of every method distils from it (as the KD
literature compares students of one pretrained teacher), so the seeds
replicate the students only. `methods_table` renders the summary, with
each method's paired difference from the student from scratch and from
plain KD.
"""

from collections.abc import Mapping, Sequence
import os
from typing import Any

import ml_collections

from kd_jax import experiment
from kd_jax import fields
from kd_jax import methods
from kd_jax import stages
from kd_jax import stats
from kd_jax import sweep
from kd_jax import validation

# The method every other is compared with, besides the student from scratch:
# Hinton et al.'s KD.
REFERENCE_METHOD = methods.kd.METHOD.name


def run_comparison(configs: Mapping[str, ml_collections.ConfigDict],
                   workdir: str, seeds: Sequence[int] = (0,), *,
                   teacher_seed: int | None = 0) -> list[dict[str, Any]]:
  """Runs every method's experiment for every seed (resuming); returns the
  summary groups of `summarize`, one per method, in `configs` order.

  Args:
    configs: method name -> its experiment config.
    workdir: the comparison's directory (a sweep workdir).
    seeds: seeds to run each method's student with.
    teacher_seed: train every teacher once, with this seed, and distil
      every seed's student from it (`shared_teacher_configs`); None trains
      the teachers again for every seed.
  """
  if teacher_seed is not None:
    configs = shared_teacher_configs(configs, workdir, teacher_seed)
  rows = sweep.run_sweep(configs, {'seed': list(seeds)}, workdir)
  return summarize(rows)


def shared_teacher_configs(configs: Mapping[str, ml_collections.ConfigDict],
                           workdir: str, teacher_seed: int
                           ) -> dict[str, ml_collections.ConfigDict]:
  """Trains (or resumes) each distinct teacher of `configs` once, with
  `config.seed = teacher_seed`, and returns `configs` loading it.

  Teachers go where the sweep keeps them (`<workdir>/teachers/<key>/`,
  `sweep.teacher_key`): methods whose teacher settings agree share one; a
  method that distils from n teachers trains teacher2..n beside the first
  in the same directory. Configs that already load their teachers
  (`teacher.checkpoint`) are returned as they are.

  Raises:
    errors.UserInputError: an invalid config, before anything is trained.
  """
  for config in configs.values():
    validation.validate(config)
  shared = {}
  for name, config in configs.items():
    if fields.parse_list(config.teacher.checkpoint):
      shared[name] = config
      continue
    teacher_config = sweep.with_overrides(config, {
        'seed': teacher_seed, 'num_seeds': 1, 'stages': 'teacher'})
    teacher_dir = os.path.join(workdir, 'teachers',
                               sweep.teacher_key(teacher_config))
    results = experiment.run(teacher_config, teacher_dir)
    checkpoints = [os.path.join(teacher_dir, 'checkpoints', stage.name)
                   for stage in stages.teacher_stages(config)
                   if stage.name in results['stages']]
    shared[name] = sweep.with_overrides(config, {
        'teacher.checkpoint': ','.join(checkpoints),
        'stages': ','.join(s for s in fields.parse_list(config.stages)
                           if s != 'teacher')})
  return shared


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """`sweep.summarize`'s groups (one per method) with, for each method, the
  mean distillation wall time (`distill_wall_time_s_mean`, s) and the paired
  difference of its distilled student from `REFERENCE_METHOD`'s of the same
  seed (`vs_reference_mean`, `vs_reference_ci`, `vs_reference_p`; absent
  for the reference itself and when it was not run)."""
  groups = sweep.summarize(rows)
  reference = {row['seed']: row['distilled_accuracy'] for row in rows
               if row['base'] == REFERENCE_METHOD}
  for group in groups:
    members = [row for row in rows if row['base'] == group['base']]
    group['distill_wall_time_s_mean'] = sum(
        row['distill_wall_time_s'] for row in members) / len(members)
    paired_seeds = [row['seed'] for row in members if row['seed'] in reference]
    if group['base'] == REFERENCE_METHOD or not paired_seeds:
      continue
    mine = {row['seed']: row['distilled_accuracy'] for row in members}
    paired = stats.paired_test([mine[s] for s in paired_seeds],
                               [reference[s] for s in paired_seeds])
    group.update(vs_reference_mean=paired.mean_difference,
                 vs_reference_ci=paired.ci_half_width,
                 vs_reference_p=paired.p_value)
  return groups


def methods_table(groups: Sequence[Mapping[str, Any]],
                  teacher_models: Mapping[str, str]) -> str:
  """The groups of `run_comparison` as a Markdown table.

  Args:
    groups: summary groups, one per method (`base` is the method's name).
    teacher_models: method -> a description of its teacher(s).
  """
  lines = ['| method | reference | teacher | teacher acc. | student, distilled '
           '| student, scratch | distilled - scratch | p | distilled - '
           f'{REFERENCE_METHOD} | p | distil wall time | seeds |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for g in groups:
    fmt = lambda role: stats.format_mean_ci(g[f'{role}_mean'], g[f'{role}_ci'])
    if 'vs_reference_mean' in g:
      versus = (stats.format_mean_ci(g['vs_reference_mean'],
                                     g['vs_reference_ci']) + ' | '
                + stats.format_p(g['vs_reference_p']))
    else:
      versus = '- | -'
    lines.append(
        f'| `{g["base"]}` | {methods.reference(g["base"])} | '
        f'{teacher_models[g["base"]]} | {fmt("teacher")} | '
        f'{fmt("distilled")} | {fmt("scratch")} | '
        f'{stats.format_mean_ci(g["difference_mean"], g["difference_ci"])} | '
        f'{stats.format_p(g["p_value"])} | {versus} | '
        f'{g["distill_wall_time_s_mean"]:.0f} s | '
        f'{len(g["seeds"])} |')
  return '\n'.join(lines) + '\n'


def pairs_table(groups_by_pair: Mapping[tuple[str, str],
                                        Sequence[Mapping[str, Any]]]) -> str:
  """The benchmark's table in the literature's layout (the CRD paper's):
  one column per teacher -> student pair; rows: the teacher, the student
  trained from scratch, then each method's distilled student; every cell
  the last-epoch test accuracy, mean ± 95% CI over seeds, with the paired
  test of distilled vs scratch (p) under each method's cell.

  Args:
    groups_by_pair: (teacher, student) -> the `run_comparison` groups of
      that pair, one per method (`base` is the method's name).

  Returns:
    A Markdown table (rows of methods missing from a pair show "-").
  """
  pairs = list(groups_by_pair)
  by_method = {pair: {g['base']: g for g in groups}
               for pair, groups in groups_by_pair.items()}
  names = list(dict.fromkeys(g['base'] for groups in groups_by_pair.values()
                             for g in groups))

  def first(pair):
    return next(iter(by_method[pair].values()))

  def cell(group, role):
    return stats.format_mean_ci(group[f'{role}_mean'], group[f'{role}_ci'])

  lines = ['| | ' + ' | '.join(f'{t} → {s}' for t, s in pairs) + ' |',
           '|---|' + '---:|' * len(pairs),
           '| teacher | ' + ' | '.join(cell(first(p), 'teacher')
                                       for p in pairs) + ' |',
           '| student (scratch) | ' + ' | '.join(cell(first(p), 'scratch')
                                                 for p in pairs) + ' |']
  for name in names:
    cells = []
    for pair in pairs:
      group = by_method[pair].get(name)
      cells.append('-' if group is None else
                   f'{cell(group, "distilled")} (p {stats.format_p(group["p_value"])})')
    lines.append(f'| `{name}` | ' + ' | '.join(cells) + ' |')
  seeds = sorted({len(g['seeds']) for groups in groups_by_pair.values()
                  for g in groups})
  lines.append('')
  lines.append(f'Last-epoch top-1 test accuracy (%), mean ± 95% CI over '
               f'{"/".join(map(str, seeds))} seeds; p: two-sided paired '
               't-test of distilled vs scratch over seeds.')
  return '\n'.join(lines) + '\n'
