"""Calibration metrics and post-hoc temperature scaling.

Follows Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017).
A classifier is calibrated when, among the examples it predicts with
confidence `p` (its largest softmax probability), a fraction `p` is correct.

* `expected_calibration_error` (ECE) bins the examples by confidence into
  `M` equal-width bins, bin `i` being `(i / M, (i + 1) / M]` (a confidence of
  exactly 0 goes to bin 0), and averages `|accuracy - mean confidence|` over
  the bins, weighted by the fraction of examples in each.
* `reliability_bins` gives the per-bin numbers behind a reliability diagram.
* `fit_temperature` finds the single `T > 0` that minimises the negative log
  likelihood of `softmax(logits / T)` on held-out validation logits; dividing
  test logits by it changes confidences but never the arg-max (accuracy).

Shapes: logits are `[N, K]` (`N` examples, `K` classes), labels `[N]` integer
class ids in `[0, K)`. These are evaluation-time metrics over a whole set of
logits, so they run in float64 NumPy / SciPy on the host (the temperature
search needs the precision) and return Python floats.
"""

import math
import numbers

import numpy as np
import numpy.typing as npt
from scipy import optimize
from scipy import special

ArrayLike = npt.ArrayLike


def _check_inputs(logits: ArrayLike,
                  labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """`(logits, labels)` as float64 `[N, K]` and integer `[N]`, `N >= 1`."""
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2 or logits.shape[1] == 0:
    raise ValueError(f'logits must have shape [N, K], got {logits.shape}.')
  if logits.shape[0] == 0:
    raise ValueError('logits and labels are empty.')
  if labels.shape != logits.shape[:1]:
    raise ValueError(f'labels must have shape {logits.shape[:1]} to match '
                     f'logits {logits.shape}, got {labels.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integer class ids, got dtype '
                     f'{labels.dtype}.')
  return logits.astype(np.float64), labels


def _check_label_range(labels: np.ndarray, num_classes: int) -> None:
  if np.any((labels < 0) | (labels >= num_classes)):
    raise ValueError(f'labels must be in [0, {num_classes}), got values in '
                     f'[{labels.min()}, {labels.max()}].')


def _check_num_bins(num_bins: int) -> None:
  if not isinstance(num_bins, numbers.Integral) or num_bins < 1:
    raise ValueError(f'num_bins must be an integer >= 1, got {num_bins}.')


def _confidence_and_correct(logits: np.ndarray, labels: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
  """`[N]` max softmax probability and `[N]` 0/1 correctness of the arg-max."""
  # 1 / sum_k exp(z_k - max z) is the largest softmax probability, exactly 1/K
  # for K equal logits, so confidences on a bin edge land where intended.
  shifted = logits - np.max(logits, axis=-1, keepdims=True)
  confidence = 1.0 / np.sum(np.exp(shifted), axis=-1)
  correct = (np.argmax(logits, axis=-1) == labels).astype(np.float64)
  return confidence, correct


def _bin_edges(num_bins: int) -> np.ndarray:
  return np.linspace(0.0, 1.0, num_bins + 1)


def _bin_index(confidence: np.ndarray, num_bins: int) -> np.ndarray:
  """`[N]` bin ids: `i` where `edges[i] < confidence <= edges[i + 1]`."""
  # The number of inner edges strictly below the confidence; 0 maps to bin 0.
  return np.searchsorted(_bin_edges(num_bins)[1:-1], confidence, side='left')


def reliability_bins(logits: ArrayLike,
                     labels: ArrayLike,
                     num_bins: int = 15) -> dict[str, np.ndarray]:
  """Per-bin accuracy and confidence, for a reliability diagram.

  Args:
    logits: `[N, K]`.
    labels: `[N]` integer class ids in `[0, K)`.
    num_bins: `M`, the number of equal-width confidence bins on [0, 1].

  Returns:
    A dict of `[M]` NumPy arrays: `'bin_lower'`, `'bin_upper'` (the edges of
    bin `i`, `(lower, upper]`), `'accuracy'` (fraction of the bin's examples
    whose arg-max is the label), `'confidence'` (their mean confidence), both
    float64 and NaN for empty bins (which plotting libraries skip), and
    `'count'` (int64 number of examples in each bin).

  Raises:
    ValueError: empty inputs, mismatched shapes, non-integer or out-of-range
      labels, or `num_bins < 1`.
  """
  _check_num_bins(num_bins)
  logits, labels = _check_inputs(logits, labels)
  _check_label_range(labels, logits.shape[1])
  confidence, correct = _confidence_and_correct(logits, labels)
  index = _bin_index(confidence, num_bins)
  count = np.bincount(index, minlength=num_bins)
  with np.errstate(invalid='ignore'):  # 0 / 0 in empty bins gives NaN.
    accuracy = np.bincount(index, correct, minlength=num_bins) / count
    mean_confidence = (
        np.bincount(index, confidence, minlength=num_bins) / count)
  edges = _bin_edges(num_bins)
  return {
      'bin_lower': edges[:-1],
      'bin_upper': edges[1:],
      'accuracy': accuracy,
      'confidence': mean_confidence,
      'count': count.astype(np.int64),
  }


def expected_calibration_error(logits: ArrayLike,
                               labels: ArrayLike,
                               num_bins: int = 15,
                               weights: ArrayLike | None = None) -> float:
  """Expected calibration error `sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|`.

  Args:
    logits: `[N, K]`.
    labels: `[N]` integer class ids in `[0, K)` (only checked on rows of
      positive weight, so padded rows may hold any integer).
    num_bins: `M`, the number of equal-width confidence bins on [0, 1].
    weights: `None`, or `[N]` non-negative per-example weights, e.g. a 0/1
      mask that is 0 on padded rows. `|B_b|` and `N` become sums of weights,
      and accuracy and confidence weighted means; rows of weight 0 are
      dropped before any arithmetic, so their logits may even be NaN.

  Returns:
    The ECE in [0, 1], a Python float.

  Raises:
    ValueError: empty inputs, mismatched shapes, negative or all-zero
      weights, non-integer or out-of-range labels, or `num_bins < 1`.
  """
  _check_num_bins(num_bins)
  logits, labels = _check_inputs(logits, labels)
  if weights is None:
    weights = np.ones(labels.shape, np.float64)
  else:
    weights = np.asarray(weights, np.float64)
    if weights.shape != labels.shape:
      raise ValueError(f'weights must have shape {labels.shape}, got '
                       f'{weights.shape}.')
    if not np.all(weights >= 0):
      raise ValueError('weights must be non-negative numbers.')
    keep = weights > 0
    if not np.any(keep):
      raise ValueError('All weights are 0: no examples to evaluate.')
    logits, labels, weights = logits[keep], labels[keep], weights[keep]
  _check_label_range(labels, logits.shape[1])
  confidence, correct = _confidence_and_correct(logits, labels)
  index = _bin_index(confidence, num_bins)
  # |B_b| |acc_b - conf_b| = |sum over the bin of w * (correct - confidence)|.
  gaps = np.bincount(index, weights * (correct - confidence),
                     minlength=num_bins)
  return float(np.sum(np.abs(gaps)) / np.sum(weights))


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  """Mean NLL of `softmax(logits / temperature)`; inputs already checked."""
  log_probs = special.log_softmax(logits / temperature, axis=-1)
  return float(-np.mean(np.take_along_axis(log_probs, labels[:, None], -1)))


def negative_log_likelihood(logits: ArrayLike,
                            labels: ArrayLike,
                            temperature: float = 1.0) -> float:
  """Mean negative log likelihood of the labels under `softmax(logits / T)`.

  Computed from `log_softmax`, so it stays finite for large logits.

  Args:
    logits: `[N, K]`.
    labels: `[N]` integer class ids in `[0, K)`.
    temperature: `T > 0`.

  Returns:
    `-mean_i log softmax(logits_i / T)[labels_i]`, a Python float.

  Raises:
    ValueError: empty inputs, mismatched shapes, non-integer or out-of-range
      labels, or `T <= 0`.
  """
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  logits, labels = _check_inputs(logits, labels)
  _check_label_range(labels, logits.shape[1])
  return _nll(logits, labels, temperature)


def fit_temperature(logits: ArrayLike,
                    labels: ArrayLike,
                    *,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
  """The temperature `T` minimising the NLL of `softmax(logits / T)`.

  Fit on held-out validation logits, never on the test set. The NLL is
  convex in `1 / T`, hence unimodal in `log T`, so a bounded 1-D search over
  `log T` (SciPy's bounded Brent method) finds the minimiser to about 1e-6
  relative.

  Args:
    logits: `[N, K]` validation logits.
    labels: `[N]` integer class ids in `[0, K)`.
    bounds: `(low, high)`, `0 < low < high`, the range searched. When the
      NLL keeps falling towards a bound (e.g. a model that is right on every
      validation example wants `T -> 0`), the result lies at that bound, or
      where the NLL stops changing in float64 before it.

  Returns:
    The fitted `T`, a Python float in `bounds`.

  Raises:
    ValueError: empty inputs, mismatched shapes, non-integer or out-of-range
      labels, or invalid `bounds`.
  """
  low, high = bounds
  if not 0 < low < high:
    raise ValueError(f'bounds must satisfy 0 < low < high, got {bounds}.')
  logits, labels = _check_inputs(logits, labels)
  _check_label_range(labels, logits.shape[1])
  result = optimize.minimize_scalar(
      lambda log_t: _nll(logits, labels, math.exp(log_t)),
      bounds=(math.log(low), math.log(high)), method='bounded',
      options={'xatol': 1e-6})
  return float(np.clip(math.exp(result.x), low, high))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def calibration_report(val_logits: ArrayLike,
                       val_labels: ArrayLike,
                       test_logits: ArrayLike,
                       test_labels: ArrayLike,
                       num_bins: int = 15) -> dict[str, float]:
  """Fits `T` on validation logits and scores the test set before and after.

  Args:
    val_logits: `[N_val, K]` held-out logits to fit the temperature on.
    val_labels: `[N_val]` integer class ids.
    test_logits: `[N_test, K]` logits to evaluate.
    test_labels: `[N_test]` integer class ids.
    num_bins: ECE bins.

  Returns:
    Python floats: `'temperature'` (fitted `T`), `'test_ece'` and
    `'test_ece_scaled'` (ECE of `test_logits` and of `test_logits / T`),
    `'test_nll'` and `'test_nll_scaled'` (likewise), and `'test_accuracy'`
    (the same with or without `T`).

  Raises:
    ValueError: invalid inputs (see `fit_temperature` and
      `expected_calibration_error`), or validation and test logits with
      different numbers of classes.
  """
  val_logits, val_labels = _check_inputs(val_logits, val_labels)
  test_logits, test_labels = _check_inputs(test_logits, test_labels)
  if val_logits.shape[1] != test_logits.shape[1]:
    raise ValueError(
        f'val_logits {val_logits.shape} and test_logits {test_logits.shape} '
        'must have the same number of classes.')
  temperature = fit_temperature(val_logits, val_labels)
  return {
      'temperature': temperature,
      'test_ece': expected_calibration_error(
          test_logits, test_labels, num_bins),
      'test_ece_scaled': expected_calibration_error(
          test_logits / temperature, test_labels, num_bins),
      'test_nll': negative_log_likelihood(test_logits, test_labels),
      'test_nll_scaled': negative_log_likelihood(
          test_logits, test_labels, temperature),
      'test_accuracy': _accuracy(test_logits, test_labels),
  }
