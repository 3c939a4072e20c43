"""Compares distillation methods on one teacher: a sweep over method configs.

`run_comparison` is `sweep.run_sweep` with one base config per method and a
grid over seeds: methods whose teacher settings agree share one trained
teacher (per seed) and one student from scratch; born-again networks, whose
teacher is the student's architecture, and ensemble distillation, which
trains its own teachers, get theirs. `methods_table` renders the summary.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from kd_jax import methods
from kd_jax import stats
from kd_jax import sweep

def run_comparison(configs: Mapping[str, ml_collections.ConfigDict],
                   workdir: str, seeds: Sequence[int] = (0,)
                   ) -> list[dict[str, Any]]:
  """Runs every method's experiment for every seed (resuming); returns the
  summary groups of `sweep.summarize`, one per method, in `configs` order.

  Args:
    configs: method name -> its experiment config.
    workdir: the comparison's directory (a sweep workdir).
    seeds: seeds to run each method with.
  """
  rows = sweep.run_sweep(configs, {'seed': list(seeds)}, workdir)
  return sweep.summarize(rows)


def methods_table(groups: Sequence[Mapping[str, Any]],
                  teacher_models: Mapping[str, str]) -> str:
  """The groups of `run_comparison` as a Markdown table.

  Args:
    groups: summary groups, one per method (`base` is the method's name).
    teacher_models: method -> a description of its teacher(s).
  """
  lines = ['| method | reference | teacher | teacher acc. | student, distilled '
           '| student, scratch | distilled - scratch | p | seeds |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|']
  for g in groups:
    fmt = lambda role: stats.format_mean_ci(g[f'{role}_mean'], g[f'{role}_ci'])
    lines.append(
        f'| `{g["base"]}` | {methods.reference(g["base"])} | '
        f'{teacher_models[g["base"]]} | {fmt("teacher")} | '
        f'{fmt("distilled")} | {fmt("scratch")} | '
        f'{stats.format_mean_ci(g["difference_mean"], g["difference_ci"])} | '
        f'{stats.format_p(g["p_value"])} | {len(g["seeds"])} |')
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
