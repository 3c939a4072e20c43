"""The method comparison's statistics, from synthetic sweep rows.

Expected values come from SciPy's paired t-test (`scipy.stats.ttest_rel`)
and NumPy, independently of `kd_jax.stats`. The comparison run itself is
tested end to end in tests/test_pipelines.py.
"""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kd_jax import compare
from kd_jax import sweep


def _rows(base, distilled, scratch, seconds):
  return [{'point': f'{base}__seed={seed}', 'base': base,
           'overrides': {'seed': seed}, 'seed': seed, 'teacher_accuracy': 90.0,
           'distilled_accuracy': d, 'scratch_accuracy': s,
           'distill_wall_time_s': t}
          for seed, (d, s, t) in enumerate(zip(distilled, scratch, seconds))]


SCRATCH = [85.1, 84.7, 85.6, 85.0, 84.9]
KD = [86.0, 85.2, 86.1, 85.9, 85.3]
OTHER = [85.8, 85.9, 86.6, 85.7, 86.2]


def test_each_method_is_paired_with_kd_of_the_same_seed():
  rows = (_rows('kd', KD, SCRATCH, [30.0] * 5)
          + _rows('other', OTHER, SCRATCH, [40.0, 42.0, 41.0, 39.0, 43.0]))
  groups = compare.summarize(rows[::-1])  # Row order does not matter.
  assert [g['base'] for g in groups] == ['other', 'kd']
  other, kd = groups
  assert 'vs_reference_mean' not in kd
  difference = np.subtract(OTHER, KD)
  assert other['vs_reference_mean'] == pytest.approx(difference.mean())
  assert other['vs_reference_ci'] == pytest.approx(
      scipy_stats.t.ppf(0.975, 4) * difference.std(ddof=1) / np.sqrt(5))
  assert other['vs_reference_p'] == pytest.approx(
      scipy_stats.ttest_rel(OTHER, KD).pvalue)
  assert other['distill_wall_time_s_mean'] == pytest.approx(41.0)
  # What the sweep reports is kept: the paired test against scratch.
  assert other['p_value'] == pytest.approx(
      scipy_stats.ttest_rel(OTHER, SCRATCH).pvalue)


def test_only_the_seeds_both_ran_are_paired():
  rows = (_rows('kd', KD[:3], SCRATCH[:3], [30.0] * 3)
          + _rows('other', OTHER, SCRATCH, [40.0] * 5))
  other = compare.summarize(rows)[1]
  assert other['vs_reference_p'] == pytest.approx(
      scipy_stats.ttest_rel(OTHER[:3], KD[:3]).pvalue)
  assert other['seeds'] == [0, 1, 2, 3, 4]


def test_without_kd_there_is_no_reference_column():
  groups = compare.summarize(_rows('dist', OTHER, SCRATCH, [40.0] * 5))
  assert 'vs_reference_mean' not in groups[0]
  table = compare.methods_table(groups, {'dist': 'bn_cnn'})
  assert '| - | - | 40 s | 5 |' in table


def test_distil_seconds_leave_out_teachers_and_scratch():
  results = {'stages': {
      'teacher': {'wall_time_s': 100.0}, 'teacher2': {'wall_time_s': 90.0},
      'assistant': {'wall_time_s': 12.5}, 'distill': {'wall_time_s': 30.25},
      'scratch': {'wall_time_s': 20.0}}}
  assert sweep.distil_seconds(results) == 42.75
  # A loaded teacher's row has no wall time.
  assert sweep.distil_seconds({'stages': {
      'teacher': {'test_accuracy': 0.9}, 'distill': {'wall_time_s': 3.0}}}) == 3
