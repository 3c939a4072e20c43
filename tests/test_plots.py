"""Tests for `kd_jax.plots`: each figure is a real PNG, edge cases included."""

import math
import os

import numpy as np
import pytest

from kd_jax import plots

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_MIN_BYTES = 5_000
_NAN = float('nan')


def _assert_png(path, returned):
  assert returned == os.fspath(path)
  with open(path, 'rb') as f:
    assert f.read(8) == _PNG_SIGNATURE
  assert os.path.getsize(path) > _MIN_BYTES


def _entropy(probs):
  return -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=-1)


# --- tempered softmax. -------------------------------------------------------

_LOGITS = np.array([1.0, 7.5, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5, 4.0, 0.0])
_TEMPERATURES = (0.5, 1, 2, 5, 10, 20, 100)


def test_tempered_probabilities_rows_are_distributions():
  probs = plots.tempered_probabilities(_LOGITS, _TEMPERATURES)
  assert probs.shape == (len(_TEMPERATURES), len(_LOGITS))
  assert np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)


def test_tempered_probabilities_keep_the_argmax_and_flatten():
  probs = plots.tempered_probabilities(_LOGITS, _TEMPERATURES)
  assert np.all(probs.argmax(axis=-1) == _LOGITS.argmax())
  entropy = _entropy(probs)
  assert np.all(np.diff(entropy) > 0)
  assert entropy[-1] < math.log(len(_LOGITS))


def test_tempered_probabilities_match_the_formula_at_t1():
  probs = plots.tempered_probabilities(_LOGITS, (1.0,))[0]
  expected = np.exp(_LOGITS) / np.exp(_LOGITS).sum()
  np.testing.assert_allclose(probs, expected, rtol=1e-12)


def test_tempered_probabilities_are_stable_for_huge_logits():
  probs = plots.tempered_probabilities([1e4, 0.0, -1e4], (0.05, 1.0, 1e3))
  assert np.all(np.isfinite(probs))
  np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0])


@pytest.mark.parametrize('logits, temperatures', [
    ([1.0, 2.0], (1.0, 0.0)),
    ([1.0, 2.0], (-1.0,)),
    ([[1.0, 2.0]], (1.0,)),
    ([], (1.0,)),
    ([1.0, math.inf], (1.0,)),
])
def test_tempered_probabilities_reject_bad_input(logits, temperatures):
  with pytest.raises(ValueError):
    plots.tempered_probabilities(logits, temperatures)


def test_tempered_softmax_figure(tmp_path):
  path = tmp_path / 'new' / 'dir' / 'softmax.png'
  _assert_png(path, plots.tempered_softmax_figure(path, _LOGITS))


def test_tempered_softmax_figure_many_classes_one_temperature(tmp_path):
  path = tmp_path / 'softmax.png'
  logits = np.random.default_rng(0).normal(size=100)
  _assert_png(path, plots.tempered_softmax_figure(str(path), logits, (4,)))


# --- sweeps. -----------------------------------------------------------------


def _sweep_points():
  points = []
  for series, offset in (('kd', 0.0), ('dkd', 0.01)):
    for x in (16, 1, 4, 2, 8):  # Unsorted on purpose.
      points.append({'series': series, 'x': x,
                     'mean': 0.95 + offset - 0.002 * abs(math.log2(x) - 2),
                     'ci': _NAN if x == 16 else 0.004})
  points.append({'series': 'one point', 'x': 4, 'mean': 0.94, 'ci': 0.005})
  points.append({'series': 'one point, no ci', 'x': 2, 'mean': 0.93,
                 'ci': _NAN})
  return points


def test_sweep_figure(tmp_path):
  path = tmp_path / 'sweeps' / 'temperature.png'
  baseline = {'label': 'student from scratch', 'mean': 0.93, 'ci': 0.003}
  returned = plots.sweep_figure(path, _sweep_points(), x_label='temperature T',
                                log_x=True, baseline=baseline)
  _assert_png(path, returned)


def test_sweep_figure_all_nan_ci_and_nan_baseline_ci(tmp_path):
  path = tmp_path / 'alpha.png'
  points = [{'series': 'kd', 'x': a, 'mean': 0.9 + 0.01 * a, 'ci': _NAN}
            for a in (0.0, 0.5, 0.9)]
  baseline = {'label': 'scratch', 'mean': 0.9, 'ci': _NAN}
  _assert_png(path, plots.sweep_figure(path, points, x_label='alpha',
                                       baseline=baseline))


def test_sweep_figure_rejects_empty_and_nonpositive_log_x(tmp_path):
  with pytest.raises(ValueError):
    plots.sweep_figure(tmp_path / 'a.png', [], x_label='x')
  points = [{'series': 'kd', 'x': 0.0, 'mean': 0.9, 'ci': 0.01}]
  with pytest.raises(ValueError):
    plots.sweep_figure(tmp_path / 'b.png', points, x_label='x', log_x=True)


# --- calibration. ------------------------------------------------------------


def _panel(title, shift, num_bins=10):
  lower = np.linspace(0.0, 1.0, num_bins + 1)[:-1]
  confidence = lower + 0.5 / num_bins
  accuracy = np.clip(confidence - shift, 0.0, 1.0)
  count = np.arange(num_bins) * 10
  # The empty first bin reports nan; the empty last one reports zeros.
  confidence[0] = accuracy[0] = _NAN
  count[-1] = 0
  confidence[-1] = accuracy[-1] = 0.0
  return {'title': title, 'bin_lower': lower,
          'bin_upper': lower + 1.0 / num_bins, 'accuracy': accuracy,
          'confidence': confidence, 'count': count, 'ece': abs(shift)}


def test_reliability_diagram(tmp_path):
  path = tmp_path / 'calibration' / 'reliability.png'
  panels = [_panel('teacher', 0.05), _panel('student (KD)', 0.01),
            _panel('scratch', -0.03, num_bins=15)]
  _assert_png(path, plots.reliability_diagram(path, panels))


def test_reliability_diagram_one_panel_all_bins_empty(tmp_path):
  path = tmp_path / 'reliability.png'
  panel = {'title': 'empty', 'bin_lower': [0.0, 0.5], 'bin_upper': [0.5, 1.0],
           'accuracy': [_NAN, _NAN], 'confidence': [_NAN, _NAN],
           'count': [0, 0], 'ece': _NAN}
  _assert_png(path, plots.reliability_diagram(path, [panel]))


# --- training curves. --------------------------------------------------------


def _records():
  records = []
  for stage, epochs in (('teacher', 5), ('distill', 3), ('scratch', 1)):
    for epoch in range(1, epochs + 1):
      records.append({'stage': stage, 'epoch': epoch,
                      'train/accuracy': 0.8 + 0.02 * epoch,
                      'test/accuracy': 0.79 + 0.02 * epoch,
                      'train/loss': 0.6 / epoch, 'test/loss': 0.65 / epoch,
                      'train/grad_norm': 1.0})
  return records


def test_training_curves(tmp_path):
  path = tmp_path / 'run' / 'curves.png'
  _assert_png(path, plots.training_curves(path, _records()))


def test_training_curves_tolerate_missing_keys(tmp_path):
  records = _records()
  del records[1]['test/loss']
  del records[2]['train/accuracy']
  records[3]['test/accuracy'] = _NAN
  records.append({'stage': 'distill', 'note': 'no epoch'})
  records.append({'stage': 'extra', 'epoch': 1})  # No metrics at all.
  path = tmp_path / 'curves.png'
  _assert_png(path, plots.training_curves(path, records))


def test_training_curves_reject_no_records(tmp_path):
  with pytest.raises(ValueError):
    plots.training_curves(tmp_path / 'curves.png', [])
