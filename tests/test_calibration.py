"""Tests for `kd_jax.calibration`.

Expected values come from tiny examples worked out by hand, from a float64
NumPy reference of the NLL written from the formula, and from synthetic data
whose calibration is known: labels drawn from `softmax(z)` make the logits `z`
calibrated and the logits `3 z` over-confident by a temperature of exactly 3.
"""

import math

import numpy as np
import pytest

from kd_jax import calibration

# Four examples, K = 3, with logits log(p) so that softmax(logits) = p.
# Confidence and correctness (arg-max == label):
#   0.90 correct, 0.85 wrong, 0.70 correct, 0.55 wrong.
_PROBS = np.array([[0.90, 0.05, 0.05],
                   [0.85, 0.10, 0.05],
                   [0.20, 0.70, 0.10],
                   [0.25, 0.20, 0.55]])
_LOGITS = np.log(_PROBS)
_LABELS = np.array([0, 1, 1, 0])


def _np_nll(logits, labels, temperature=1.0):
  """Mean `log sum_k exp(z_k / T) - z_y / T`, with its own log-sum-exp."""
  z = np.asarray(logits, np.float64) / temperature
  top = z.max(axis=-1)
  log_sum_exp = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))
  return np.mean(log_sum_exp - z[np.arange(len(labels)), labels])


def _np_softmax(logits):
  z = logits - logits.max(axis=-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def _calibrated_sample(num_examples, seed, num_classes=10, scale=2.0):
  """Logits `z` `[N, K]` and labels `[N]` drawn from `softmax(z)`."""
  rng = np.random.default_rng(seed)
  logits = scale * rng.standard_normal((num_examples, num_classes))
  cumulative = np.cumsum(_np_softmax(logits), axis=-1)
  uniform = rng.uniform(size=(num_examples, 1))
  labels = np.minimum((uniform > cumulative).sum(axis=-1), num_classes - 1)
  return logits, labels


# --- expected_calibration_error and reliability_bins. ------------------------


def test_ece_by_hand():
  # 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]:
  #   bin 4: 0.90 correct, 0.85 wrong: acc 1/2, conf 0.875, gap 0.375.
  #   bin 3: 0.70 correct: acc 1, conf 0.70, gap 0.30.
  #   bin 2: 0.55 wrong: acc 0, conf 0.55, gap 0.55.
  # ECE = 2/4 * 0.375 + 1/4 * 0.30 + 1/4 * 0.55 = 0.1875 + 0.075 + 0.1375 = 0.4.
  assert calibration.expected_calibration_error(
      _LOGITS, _LABELS, num_bins=5) == pytest.approx(0.4, rel=1e-12)


def test_ece_one_bin():
  # One bin: |acc - mean conf| = |2/4 - (0.90 + 0.85 + 0.70 + 0.55) / 4|
  #   = |0.5 - 0.75| = 0.25.
  assert calibration.expected_calibration_error(
      _LOGITS, _LABELS, num_bins=1) == pytest.approx(0.25, rel=1e-12)


def test_reliability_bins_by_hand():
  bins = calibration.reliability_bins(_LOGITS, _LABELS, num_bins=5)
  np.testing.assert_allclose(bins['bin_lower'], [0.0, 0.2, 0.4, 0.6, 0.8])
  np.testing.assert_allclose(bins['bin_upper'], [0.2, 0.4, 0.6, 0.8, 1.0])
  np.testing.assert_array_equal(bins['count'], [0, 0, 1, 1, 2])
  np.testing.assert_allclose(
      bins['accuracy'], [np.nan, np.nan, 0.0, 1.0, 0.5])
  np.testing.assert_allclose(
      bins['confidence'], [np.nan, np.nan, 0.55, 0.70, 0.875], rtol=1e-12)
  for key in bins:
    assert bins[key].shape == (5,), key


def test_ece_equals_reliability_bins_sum():
  logits, labels = _calibrated_sample(500, seed=1)
  logits = 3 * logits
  bins = calibration.reliability_bins(logits, labels)
  filled = bins['count'] > 0
  gaps = np.abs(bins['accuracy'] - bins['confidence'])[filled]
  expected = np.sum(bins['count'][filled] / len(labels) * gaps)
  assert calibration.expected_calibration_error(logits, labels) == (
      pytest.approx(expected, rel=1e-10))
  assert bins['count'].sum() == len(labels)


@pytest.mark.parametrize('num_classes, num_bins, expected_bin', [
    (2, 2, 0),  # Confidence 1/2 is the top edge of (0, 1/2].
    (2, 4, 1),  # (1/4, 1/2].
    (4, 4, 0),  # Confidence 1/4 is the top edge of (0, 1/4].
    (4, 3, 0),  # (0, 1/3].
])
def test_bins_are_closed_on_the_right(num_classes, num_bins, expected_bin):
  # K equal logits give confidence exactly 1/K.
  bins = calibration.reliability_bins(
      np.zeros((1, num_classes)), np.array([0]), num_bins)
  assert np.argmax(bins['count']) == expected_bin
  assert bins['count'].sum() == 1


def test_zero_confidence_goes_to_the_first_bin():
  # A softmax confidence is >= 1/K, so the rule is tested on the helper.
  confidence = np.array([0.0, 1e-12, 0.5, 0.5 + 1e-12, 1.0])
  np.testing.assert_array_equal(
      calibration._bin_index(confidence, 2), [0, 0, 0, 1, 1])


def test_ece_of_calibrated_logits_is_near_zero():
  logits, labels = _calibrated_sample(20_000, seed=0)
  # With ~1,300 examples per filled bin, sampling noise is ~0.01 at most.
  assert calibration.expected_calibration_error(logits, labels) < 0.02


def test_ece_weights():
  # Weights [2, 1, 1, 0], 5 bins: |sum_b w (correct - conf)| per bin:
  #   bin 4: |2 (1 - 0.90) + 1 (0 - 0.85)| = |0.2 - 0.85| = 0.65.
  #   bin 3: |1 (1 - 0.70)| = 0.30.  bin 2: weight 0, dropped.
  # ECE = (0.65 + 0.30) / 4 = 0.2375.
  assert calibration.expected_calibration_error(
      _LOGITS, _LABELS, num_bins=5, weights=[2, 1, 1, 0]) == (
          pytest.approx(0.2375, rel=1e-12))


def test_ece_zero_weight_rows_are_ignored():
  # Padded rows: NaN logits and a sentinel label, weight 0.
  logits = np.concatenate([_LOGITS, np.full((2, 3), np.nan)])
  labels = np.concatenate([_LABELS, [-1, 7]])
  weights = np.array([1, 1, 1, 1, 0, 0])
  assert calibration.expected_calibration_error(
      logits, labels, num_bins=5, weights=weights) == (
          pytest.approx(0.4, rel=1e-12))
  ones = calibration.expected_calibration_error(
      _LOGITS, _LABELS, num_bins=5, weights=np.ones(4))
  assert ones == pytest.approx(0.4, rel=1e-12)


# --- negative_log_likelihood. -----------------------------------------------


def test_nll_by_hand():
  # -(ln 0.90 + ln 0.10 + ln 0.70 + ln 0.25) / 4
  #   = (0.1053605 + 2.3025851 + 0.3566749 + 1.3862944) / 4 = 1.0377287.
  assert calibration.negative_log_likelihood(_LOGITS, _LABELS) == (
      pytest.approx(1.0377287, rel=1e-7))


@pytest.mark.parametrize('temperature', [0.05, 0.5, 1.0, 3.0, 20.0])
def test_nll_matches_numpy(temperature):
  logits, labels = _calibrated_sample(300, seed=2)
  assert calibration.negative_log_likelihood(
      logits, labels, temperature) == pytest.approx(
          _np_nll(logits, labels, temperature), rel=1e-12)


def test_nll_is_finite_for_large_logits():
  # log_softmax([1e4, 0])[0] = -log(1 + e^-1e4) = 0 and
  # log_softmax([0, 1e4])[0] = -1e4: NLL = (0 + 1e4) / 2 = 5000.
  logits = np.array([[1e4, 0.0], [0.0, 1e4]], np.float32)
  assert calibration.negative_log_likelihood(logits, np.array([0, 0])) == (
      pytest.approx(5000.0, rel=1e-12))


def test_nll_of_uniform_logits_is_log_k():
  assert calibration.negative_log_likelihood(
      np.zeros((3, 5)), np.array([0, 2, 4]), 0.3) == pytest.approx(
          math.log(5), rel=1e-12)


# --- fit_temperature and calibration_report. --------------------------------


def test_fit_temperature_recovers_known_overconfidence():
  logits, labels = _calibrated_sample(20_000, seed=3)
  temperature = calibration.fit_temperature(3 * logits, labels)
  assert temperature == pytest.approx(3.0, rel=0.03)


def test_fit_temperature_is_a_stationary_point():
  # d NLL / d beta at beta = 1 / T is mean_i (sum_k p_ik z_ik - z_i,y_i),
  # with p = softmax(beta z): 0 at an interior minimum.
  logits, labels = _calibrated_sample(2_000, seed=4)
  logits = 2.5 * logits
  temperature = calibration.fit_temperature(logits, labels)
  probs = _np_softmax(logits / temperature)
  expected_logit = np.sum(probs * logits, axis=-1)
  gradient = np.mean(expected_logit - logits[np.arange(len(labels)), labels])
  assert abs(gradient) < 1e-4
  nll = _np_nll(logits, labels, temperature)
  assert nll < _np_nll(logits, labels, temperature * 1.01)
  assert nll < _np_nll(logits, labels, temperature / 1.01)


def test_fit_temperature_scales_with_the_logits():
  logits, labels = _calibrated_sample(2_000, seed=5)
  base = calibration.fit_temperature(logits, labels)
  assert calibration.fit_temperature(4 * logits, labels) == pytest.approx(
      4 * base, rel=1e-4)


def test_fit_temperature_stops_at_the_bounds():
  # A margin of 1, so the NLL (2e-9 at T = 0.05) still falls in float64.
  logits = np.array([[1.0, 0.0], [0.0, 1.0]])
  # Always right: the NLL falls as T -> 0.
  assert calibration.fit_temperature(logits, np.array([0, 1])) == (
      pytest.approx(0.05, rel=1e-4))
  # Always wrong: the NLL falls as T -> inf.
  assert calibration.fit_temperature(logits, np.array([1, 0])) == (
      pytest.approx(20.0, rel=1e-4))
  assert calibration.fit_temperature(
      logits, np.array([1, 0]), bounds=(0.5, 2.0)) == pytest.approx(
          2.0, rel=1e-4)


def test_calibration_report():
  val_logits, val_labels = _calibrated_sample(20_000, seed=6)
  test_logits, test_labels = _calibrated_sample(20_000, seed=7)
  report = calibration.calibration_report(
      3 * val_logits, val_labels, 3 * test_logits, test_labels)
  assert set(report) == {'temperature', 'test_ece', 'test_ece_scaled',
                         'test_nll', 'test_nll_scaled', 'test_accuracy'}
  for value in report.values():
    assert type(value) is float  # pylint: disable=unidiomatic-typecheck
  assert report['temperature'] == pytest.approx(3.0, rel=0.03)
  assert report['test_ece'] > 0.1
  assert report['test_ece_scaled'] < report['test_ece'] / 10
  assert report['test_nll_scaled'] < report['test_nll']
  assert report['test_nll'] == pytest.approx(
      _np_nll(3 * test_logits, test_labels), rel=1e-10)
  assert report['test_nll_scaled'] == pytest.approx(
      _np_nll(3 * test_logits, test_labels, report['temperature']),
      rel=1e-10)
  # Accuracy is the same before and after scaling.
  accuracy = np.mean(np.argmax(test_logits, axis=-1) == test_labels)
  scaled_accuracy = np.mean(
      np.argmax(3 * test_logits / report['temperature'], axis=-1)
      == test_labels)
  assert report['test_accuracy'] == accuracy == scaled_accuracy


@pytest.mark.parametrize('temperature', [0.05, 0.3, 3.0, 20.0])
def test_temperature_never_changes_the_prediction(temperature):
  logits, labels = _calibrated_sample(1_000, seed=8)
  scaled = logits / temperature
  np.testing.assert_array_equal(
      np.argmax(scaled, axis=-1), np.argmax(logits, axis=-1))
  # The number of correct examples, summed over the bins, is unchanged.
  def num_correct(x):
    bins = calibration.reliability_bins(x, labels)
    return np.nansum(bins['accuracy'] * bins['count'])
  assert num_correct(scaled) == pytest.approx(num_correct(logits), abs=1e-9)


# --- invalid inputs. --------------------------------------------------------

_TWO = np.zeros((2, 3))


@pytest.mark.parametrize('logits, labels', [
    (np.zeros((0, 3)), np.zeros((0,), np.int32)),  # Empty.
    (np.zeros(3), np.array([0])),  # Logits not [N, K].
    (np.zeros((2, 0)), np.array([0, 0])),  # No classes.
    (_TWO, np.array([0, 1, 2])),  # Mismatched N.
    (_TWO, np.array([[0], [1]])),  # Labels not [N].
    (_TWO, np.array([0.0, 1.0])),  # Float labels.
    (_TWO, np.array([0, 3])),  # Out of range.
    (_TWO, np.array([-1, 0])),
])
@pytest.mark.parametrize('fn', [
    calibration.expected_calibration_error,
    calibration.reliability_bins,
    calibration.negative_log_likelihood,
    calibration.fit_temperature,
])
def test_invalid_inputs(fn, logits, labels):
  with pytest.raises(ValueError):
    fn(logits, labels)


@pytest.mark.parametrize('kwargs', [
    dict(num_bins=0),
    dict(num_bins=2.5),
    dict(weights=[1.0, 1.0, 1.0]),  # Wrong shape.
    dict(weights=[1.0, -1.0, 1.0, 1.0]),
    dict(weights=[1.0, np.nan, 1.0, 1.0]),
    dict(weights=[0.0, 0.0, 0.0, 0.0]),
])
def test_ece_invalid_arguments(kwargs):
  with pytest.raises(ValueError):
    calibration.expected_calibration_error(_LOGITS, _LABELS, **kwargs)


@pytest.mark.parametrize('temperature', [0.0, -1.0])
def test_nll_invalid_temperature(temperature):
  with pytest.raises(ValueError):
    calibration.negative_log_likelihood(_LOGITS, _LABELS, temperature)


@pytest.mark.parametrize('bounds', [(0.0, 1.0), (2.0, 1.0), (1.0, 1.0)])
def test_fit_temperature_invalid_bounds(bounds):
  with pytest.raises(ValueError):
    calibration.fit_temperature(_LOGITS, _LABELS, bounds=bounds)


def test_calibration_report_class_mismatch():
  with pytest.raises(ValueError):
    calibration.calibration_report(
        _LOGITS, _LABELS, np.zeros((2, 4)), np.array([0, 1]))
