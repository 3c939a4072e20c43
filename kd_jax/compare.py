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
