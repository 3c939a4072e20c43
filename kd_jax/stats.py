"""Statistics over seeds for results tables: confidence intervals, paired tests.

A method is run with a handful of seeds (`n` of 3 to 10), so intervals use
Student's t distribution with `n - 1` degrees of freedom rather than the
normal approximation. Two methods run with the same seeds (same data order,
same initialisation of the shared parts) are compared with a paired t-test on
the per-seed differences, which removes the between-seed variance that both
methods share.

Inputs are 1-D sequences of per-seed values (e.g. test accuracies as fractions
in [0, 1]); results are Python floats, computed in float64 NumPy on the host.
Degenerate cases follow one rule: a quantity that the data cannot determine
(a spread from one seed) is NaN, never an error, so that a table of partial
runs still renders; values that are all identical have a spread of exactly 0.
"""

import dataclasses
import math

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike


def _as_vector(values: ArrayLike, name: str) -> np.ndarray:
  """`values` as a float64 `[n]` array, `n >= 1`."""
  vector = np.asarray(values, np.float64)
  if vector.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {vector.shape}.')
  if vector.size == 0:
    raise ValueError(f'{name} is empty.')
  return vector


def _sample_std(vector: np.ndarray) -> float:
  """Sample standard deviation (ddof=1) of a `[n]`, `n >= 2`, vector.

  Exactly 0 when all values are equal: `np.std` could return ~1e-17 there,
  since the float mean of equal values need not equal them.
  """
  if np.all(vector == vector[0]):
    return 0.0
  return float(np.std(vector, ddof=1))


def _t_quantile(confidence: float, dof: int) -> float:
  """The `(1 + confidence) / 2` quantile of Student's t with `dof` d.o.f."""
  return float(_student_t().ppf((1 + confidence) / 2, dof))


def _student_t():
  # Imported on first use: scipy.stats adds 0.8 s to the start of every
  # command, and only sweeps' summaries need it.
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  return scipy_stats.t


def mean_ci(values: ArrayLike,
            confidence: float = 0.95) -> tuple[float, float]:
  """Mean and Student-t confidence-interval half width over seeds.

  The interval is `mean ± t_{(1 + c) / 2, n - 1} * s / sqrt(n)`, with `s` the
  sample standard deviation (ddof=1).

  Args:
    values: `[n]` per-seed values.
    confidence: two-sided confidence level `c` in (0, 1).

  Returns:
    `(mean, half_width)` as floats; `half_width` is NaN when `n == 1` and 0
    when all values are equal.

  Raises:
    ValueError: empty or non-1-D `values`, or `confidence` outside (0, 1).
  """
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}.')
  vector = _as_vector(values, 'values')
  n = vector.size
  mean = float(np.mean(vector))
  if n == 1:
    return mean, math.nan
  std_error = _sample_std(vector) / math.sqrt(n)
  return mean, _t_quantile(confidence, n - 1) * std_error


@dataclasses.dataclass(frozen=True)
class PairedResult:
  """A two-sided paired t-test of `a - b` over `n` seeds.

  Attributes:
    mean_difference: mean over seeds of `a[i] - b[i]`.
    ci_half_width: half width of the 95% Student-t interval of
      `mean_difference` (NaN when `n == 1`, 0 when all differences are equal).
    t_statistic: `mean_difference / (s_d / sqrt(n))`; NaN when `n == 1` or
      when all differences are 0, `±inf` when they are all equal and nonzero.
    p_value: two-sided p-value of `mean_difference == 0`; NaN when `n == 1`,
      1.0 when all differences are 0, 0.0 when all are equal and nonzero.
    n: number of seeds.
  """
  mean_difference: float
  ci_half_width: float
  t_statistic: float
  p_value: float
  n: int


def paired_test(a: ArrayLike, b: ArrayLike) -> PairedResult:
  """Two-sided paired t-test of `a - b`, with `a[i]`, `b[i]` from seed `i`.

  The t statistic has `n - 1` degrees of freedom; the p-value equals
  `scipy.stats.ttest_rel(a, b).pvalue` whenever the differences vary. When
  they do not (zero variance), the t distribution is undefined, and the
  result is the limit of a vanishing spread: identical results (all
  differences 0) are no evidence of a difference (`t = NaN`, `p = 1`), and a
  constant nonzero difference is certain (`t = ±inf`, `p = 0`).

  Args:
    a: `[n]` per-seed values of the first method.
    b: `[n]` per-seed values of the second method, same seeds and order.

  Returns:
    A `PairedResult`; its t statistic and p-value are NaN when `n == 1`.

  Raises:
    ValueError: empty or non-1-D inputs, or `a` and `b` of different lengths.
  """
  a = _as_vector(a, 'a')
  b = _as_vector(b, 'b')
  if a.size != b.size:
    raise ValueError(
        f'a and b must have one value per seed each, got lengths {a.size} '
        f'and {b.size}.')
  differences = a - b
  n = differences.size
  mean, half_width = mean_ci(differences, 0.95)
  if n == 1:
    return PairedResult(mean, half_width, math.nan, math.nan, n)
  std_error = _sample_std(differences) / math.sqrt(n)
  if std_error == 0:
    if mean == 0:
      return PairedResult(mean, 0.0, math.nan, 1.0, n)
    return PairedResult(mean, 0.0, math.copysign(math.inf, mean), 0.0, n)
  t = mean / std_error
  p = 2 * float(_student_t().sf(abs(t), n - 1))
  return PairedResult(mean, half_width, t, p, n)


def format_mean_ci(mean: float,
                   half_width: float,
                   percent: bool = True,
                   digits: int = 2) -> str:
  """`'mean ± half_width'` for a results table, e.g. `'88.34 ± 0.21'`.

  Args:
    mean: the mean, a fraction (e.g. accuracy 0.8834) when `percent`.
    half_width: the interval's half width in the same units; NaN (one seed)
      is rendered as the bare mean, e.g. `'88.34'`.
    percent: multiply both numbers by 100 (no `%` sign is added).
    digits: decimal places of both numbers.

  Returns:
    The formatted string.
  """
  scale = 100.0 if percent else 1.0
  text = f'{mean * scale:.{digits}f}'
  if math.isnan(half_width):
    return text
  return f'{text} ± {half_width * scale:.{digits}f}'


def format_p(p: float) -> str:
  """A p-value for a table: `'0.003'`, `'< 0.001'`, or `'n/a'` for NaN.

  Args:
    p: a p-value in [0, 1], or NaN.

  Returns:
    Three decimals, `'< 0.001'` below 0.001, `'n/a'` for NaN.

  Raises:
    ValueError: `p` outside [0, 1].
  """
  if math.isnan(p):
    return 'n/a'
  if not 0 <= p <= 1:
    raise ValueError(f'p must be in [0, 1], got {p}.')
  if p < 1e-3:
    return '< 0.001'
  return f'{p:.3f}'
