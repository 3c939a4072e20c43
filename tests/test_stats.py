"""Tests for `kd_jax.stats` against values worked out by hand.

Student-t quantiles are hard-coded to 7 significant digits (the printed
table values 12.706, 2.776, 2.262, 2.132 and 4.604, to more digits), not
computed with SciPy. Two-sided p-values come from the closed form of the t
CDF for an even number of degrees of freedom (Abramowitz & Stegun 26.7.3),
written below with `math`; SciPy's `ttest_rel` is only a cross-check.
"""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kd_jax import stats

# t_{q, dof}: the q quantile of Student's t with dof degrees of freedom.
_T_0975_1 = 12.7062047
_T_0975_4 = 2.7764451
_T_0975_9 = 2.2621572
_T_095_4 = 2.1318468
_T_0995_4 = 4.6040949


def _two_sided_p_even_dof(t, dof):
  """`P(|T| > |t|)` for even `dof`: A&S 26.7.3 with theta = atan(t / sqrt(v)).

  `P(|T| <= t) = sin(theta) * (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...
  + (1*3*...*(v-3))/(2*4*...*(v-2)) cos^(v-2))`.
  """
  assert dof % 2 == 0
  theta = math.atan(abs(t) / math.sqrt(dof))
  cos2 = math.cos(theta)**2
  term, total = 1.0, 1.0
  for j in range(1, dof // 2):
    term *= (2 * j - 1) / (2 * j) * cos2
    total += term
  return 1 - math.sin(theta) * total


# --- mean_ci. ---------------------------------------------------------------


def test_mean_ci_one_to_five():
  # Mean 3; deviations -2..2, sum of squares 10, s^2 = 10 / 4 = 2.5,
  # s = 1.5811388, s / sqrt(5) = sqrt(0.5) = 0.7071068.
  # Half width = 2.7764451 * 0.7071068 = 1.9632432.
  mean, half_width = stats.mean_ci([1, 2, 3, 4, 5])
  assert mean == 3.0
  assert half_width == pytest.approx(_T_0975_4 * math.sqrt(0.5), rel=1e-7)
  assert half_width == pytest.approx(1.9632432, rel=1e-7)


@pytest.mark.parametrize('confidence, quantile, expected', [
    (0.90, _T_095_4, 1.5074433),  # 2.1318468 * 0.7071068.
    (0.99, _T_0995_4, 3.2555867),  # 4.6040949 * 0.7071068.
])
def test_mean_ci_other_levels(confidence, quantile, expected):
  _, half_width = stats.mean_ci([1, 2, 3, 4, 5], confidence)
  assert half_width == pytest.approx(quantile * math.sqrt(0.5), rel=1e-7)
  assert half_width == pytest.approx(expected, rel=1e-7)


def test_mean_ci_two_seeds():
  # Mean 0.82; s = |0.84 - 0.80| / sqrt(2) = 0.0282843, s / sqrt(2) = 0.02.
  # Half width = 12.7062047 * 0.02 = 0.2541241.
  mean, half_width = stats.mean_ci([0.80, 0.84])
  assert mean == pytest.approx(0.82, rel=1e-12)
  assert half_width == pytest.approx(_T_0975_1 * 0.02, rel=1e-7)


def test_mean_ci_ten_seeds():
  # 0..9: mean 4.5, sum of squares 2 * (0.5^2 + ... + 4.5^2) = 82.5,
  # s^2 = 82.5 / 9, s / sqrt(10) = sqrt(0.9166667) = 0.9574271.
  # Half width = 2.2621572 * 0.9574271 = 2.1658506.
  mean, half_width = stats.mean_ci(np.arange(10))
  assert mean == 4.5
  assert half_width == pytest.approx(
      _T_0975_9 * math.sqrt(82.5 / 9 / 10), rel=1e-7)
  assert half_width == pytest.approx(2.1658506, rel=1e-7)


def test_mean_ci_one_seed_has_nan_half_width():
  mean, half_width = stats.mean_ci([0.9])
  assert mean == 0.9
  assert math.isnan(half_width)


def test_mean_ci_equal_values_have_zero_half_width():
  # np.std(ddof=1) of three 0.1s is ~1.7e-17, not 0; the result must be 0.
  _, half_width = stats.mean_ci([0.1, 0.1, 0.1])
  assert half_width == 0.0


@pytest.mark.parametrize('values, confidence', [
    ([], 0.95),
    ([[1.0, 2.0]], 0.95),
    ([1.0, 2.0], 0.0),
    ([1.0, 2.0], 1.0),
    ([1.0, 2.0], 95),
])
def test_mean_ci_invalid(values, confidence):
  with pytest.raises(ValueError):
    stats.mean_ci(values, confidence)


# --- paired_test. -----------------------------------------------------------


def test_paired_test_five_seeds():
  # Differences a - b = [2, 1, 2, 3, 2]: mean 2, deviations [0, -1, 0, 1, 0],
  # s^2 = 2 / 4 = 0.5, standard error sqrt(0.5 / 5) = sqrt(0.1) = 0.3162278,
  # t = 2 / sqrt(0.1) = 2 sqrt(10) = 6.3245553 with 4 d.o.f.
  # CI half width = 2.7764451 * 0.3162278 = 0.8779890.
  # p: theta = atan(t / 2) = atan(sqrt(10)), so cos^2 = 1/11,
  # sin = sqrt(10/11), P(|T| <= t) = sqrt(10/11) (1 + 1/22), and
  # p = 1 - (23/22) sqrt(10/11) = 0.0031982.
  result = stats.paired_test([3, 5, 4, 6, 7], [1, 4, 2, 3, 5])
  expected_p = 1 - 23 / 22 * math.sqrt(10 / 11)
  assert result.n == 5
  assert result.mean_difference == 2.0
  assert result.t_statistic == pytest.approx(2 * math.sqrt(10), rel=1e-12)
  assert result.ci_half_width == pytest.approx(
      _T_0975_4 * math.sqrt(0.1), rel=1e-7)
  assert result.p_value == pytest.approx(expected_p, rel=1e-9)
  assert result.p_value == pytest.approx(0.0031982, rel=1e-4)
  assert expected_p == pytest.approx(
      _two_sided_p_even_dof(result.t_statistic, 4), rel=1e-12)


def test_paired_test_three_seeds():
  # Differences [1, 2, 6]: mean 3, deviations [-2, -1, 3], s^2 = 14 / 2 = 7,
  # t = 3 / sqrt(7 / 3) = 1.9639610, t^2 = 27 / 7, 2 d.o.f.
  # p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(27 / 41) = 0.1884973.
  result = stats.paired_test([2, 3, 7], [1, 1, 1])
  assert result.t_statistic == pytest.approx(3 / math.sqrt(7 / 3), rel=1e-12)
  assert result.p_value == pytest.approx(1 - math.sqrt(27 / 41), rel=1e-9)
  assert result.p_value == pytest.approx(
      _two_sided_p_even_dof(result.t_statistic, 2), rel=1e-12)


def test_paired_test_is_antisymmetric():
  forward = stats.paired_test([3, 5, 4, 6, 7], [1, 4, 2, 3, 5])
  backward = stats.paired_test([1, 4, 2, 3, 5], [3, 5, 4, 6, 7])
  assert backward.mean_difference == -forward.mean_difference
  assert backward.t_statistic == -forward.t_statistic
  assert backward.p_value == forward.p_value
  assert backward.ci_half_width == forward.ci_half_width


def test_paired_test_matches_scipy_ttest_rel():
  rng = np.random.default_rng(0)
  a = 0.9 + 0.01 * rng.standard_normal(7)
  b = a - 0.005 + 0.01 * rng.standard_normal(7)
  result = stats.paired_test(a, b)
  reference = scipy_stats.ttest_rel(a, b)
  assert result.t_statistic == pytest.approx(reference.statistic, rel=1e-10)
  assert result.p_value == pytest.approx(reference.pvalue, rel=1e-10)


def test_paired_test_constant_nonzero_difference():
  # 0.9 - 0.8 is the same float for every seed: zero variance, p = 0.
  result = stats.paired_test([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
  assert result.mean_difference == pytest.approx(0.1, rel=1e-12)
  assert result.t_statistic == math.inf
  assert result.p_value == 0.0
  assert result.ci_half_width == 0.0
  backward = stats.paired_test([0.8, 0.8, 0.8], [0.9, 0.9, 0.9])
  assert backward.t_statistic == -math.inf
  assert backward.p_value == 0.0


def test_paired_test_identical_results():
  result = stats.paired_test([0.9, 0.85, 0.8], [0.9, 0.85, 0.8])
  assert result.mean_difference == 0.0
  assert math.isnan(result.t_statistic)
  assert result.p_value == 1.0
  assert result.ci_half_width == 0.0


def test_paired_test_one_seed():
  result = stats.paired_test([0.9], [0.8])
  assert result.n == 1
  assert result.mean_difference == pytest.approx(0.1, rel=1e-12)
  assert math.isnan(result.ci_half_width)
  assert math.isnan(result.t_statistic)
  assert math.isnan(result.p_value)


@pytest.mark.parametrize('a, b', [
    ([0.9, 0.8], [0.9]),
    ([], []),
    ([[0.9]], [[0.8]]),
])
def test_paired_test_invalid(a, b):
  with pytest.raises(ValueError):
    stats.paired_test(a, b)


def test_paired_result_is_frozen():
  result = stats.paired_test([1, 2], [0, 0])
  with pytest.raises(dataclasses.FrozenInstanceError):
    result.p_value = 0.5


# --- formatting. ------------------------------------------------------------


@pytest.mark.parametrize('args, kwargs, expected', [
    ((0.8834, 0.0021), {}, '88.34 ± 0.21'),
    ((0.8834, 0.0021), dict(digits=1), '88.3 ± 0.2'),
    ((1.5, 0.25), dict(percent=False, digits=3), '1.500 ± 0.250'),
    ((0.8834, math.nan), {}, '88.34'),
    ((0.8834, 0.0), {}, '88.34 ± 0.00'),
])
def test_format_mean_ci(args, kwargs, expected):
  assert stats.format_mean_ci(*args, **kwargs) == expected


def test_format_mean_ci_of_mean_ci():
  # [0.88, 0.89, 0.90]: mean 0.89, s = 0.01, s / sqrt(3) = 0.0057735,
  # half width 4.3026527 (t_{0.975, 2}) * 0.0057735 = 0.0248414.
  assert stats.format_mean_ci(*stats.mean_ci([0.88, 0.89, 0.90])) == (
      '89.00 ± 2.48')


@pytest.mark.parametrize('p, expected', [
    (0.0031982, '0.003'),
    (0.05, '0.050'),
    (0.2, '0.200'),
    (1.0, '1.000'),
    (0.001, '0.001'),
    (0.00099, '< 0.001'),
    (0.0, '< 0.001'),
    (math.nan, 'n/a'),
])
def test_format_p(p, expected):
  assert stats.format_p(p) == expected


@pytest.mark.parametrize('p', [-0.1, 1.5])
def test_format_p_invalid(p):
  with pytest.raises(ValueError):
    stats.format_p(p)
