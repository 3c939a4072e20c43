"""Figures for the README and reports: plain data in, one PNG out.

Every plotting function takes plain data (NumPy arrays, lists of dicts), never
reads files or configs, writes one PNG to `path` (creating its parent
directory) and returns `path` as a `str`. Figures are built on
`matplotlib.figure.Figure` with the Agg canvas, not on `pyplot`, so no global
state is touched and nothing needs a display.

Accuracies and confidence intervals are given as fractions in [0, 1]; sweeps
and training curves plot them in percent.
"""

from collections.abc import Mapping, Sequence
import io
import math
import os
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.ticker import NullLocator
import numpy as np

from kd_jax import workdir

PathLike = str | os.PathLike
DPI = 120
_SIZE = (6.0, 4.0)
_BAND_ALPHA = 0.2
_MARKER_SIZE = 4


# --- helpers. ----------------------------------------------------------------


def _new_figure(size: tuple[float, float] = _SIZE) -> Figure:
  fig = Figure(figsize=size, dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: PathLike) -> str:
  """Writes `fig` as a PNG to `path`, creating the parent directory;
  through a temporary file and a rename, so that a kill while drawing never
  leaves a partial figure at `path`."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=DPI)
  workdir.write_atomic(path, png.getvalue())
  fig.clear()
  return path


def _is_finite(x: Any) -> bool:
  return x is not None and math.isfinite(x)


def _group(items: Sequence[Mapping[str, Any]],
           key: str) -> dict[Any, list[Mapping[str, Any]]]:
  """`items` grouped by `item[key]`, groups in order of first appearance."""
  groups = {}
  for item in items:
    groups.setdefault(item.get(key), []).append(item)
  return groups


# --- tempered softmax. -------------------------------------------------------


def tempered_probabilities(logits: Any,
                           temperatures: Sequence[float]) -> np.ndarray:
  """`softmax(logits / T)` for each temperature `T`, in float64.

  Args:
    logits: `(K,)` finite logits.
    temperatures: `(N,)` temperatures, each > 0.

  Returns:
    `(N, K)` probabilities; row `n` is for `temperatures[n]` and sums to 1.
  """
  logits = np.asarray(logits, np.float64)
  temperatures = np.asarray(temperatures, np.float64)
  if logits.ndim != 1 or not logits.size:
    raise ValueError(f'logits must have shape (K,), got {logits.shape}.')
  if not np.all(np.isfinite(logits)):
    raise ValueError('logits must be finite.')
  if temperatures.ndim != 1 or not np.all(temperatures > 0):
    raise ValueError(f'temperatures must be a sequence of numbers > 0, got '
                     f'{temperatures}.')
  z = logits[None, :] / temperatures[:, None]
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def tempered_softmax_figure(
    path: PathLike, logits: Any,
    temperatures: Sequence[float] = (1, 2, 5, 10, 20)) -> str:
  """Plots `softmax(logits / T)` over the classes, one line per `T`.

  The classic distillation figure: a higher temperature flattens the
  distribution and reveals the "dark knowledge" in the non-arg-max classes.

  Args:
    path: where the PNG goes.
    logits: `(K,)` finite logits, e.g. a teacher's output for one example.
    temperatures: `(N,)` temperatures, each > 0.

  Returns:
    `path`, as a `str`.
  """
  probs = tempered_probabilities(logits, temperatures)
  num_classes = probs.shape[1]
  classes = np.arange(num_classes)
  fig = _new_figure()
  ax = fig.add_subplot()
  colors = _sequential_colors(len(temperatures))
  for temperature, row, color in zip(temperatures, probs, colors):
    ax.plot(classes, row, marker='o', markersize=_MARKER_SIZE, color=color,
            label=f'T = {temperature:g}')
  ax.set_title('Softmax with temperature: softmax(z / T)')
  ax.set_xlabel('class')
  ax.set_ylabel('probability')
  ax.set_ylim(0, min(1.0, 1.05 * probs.max()))
  if num_classes <= 20:
    ax.set_xticks(classes)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(title='temperature')
  return _save(fig, path)


def _sequential_colors(n: int) -> list[Any]:
  """`n` colours from dark to light, so that the order of `T` is visible."""
  return [colormaps['viridis'](v) for v in np.linspace(0.0, 0.85, n)]


# --- sweeps. -----------------------------------------------------------------


def sweep_figure(path: PathLike,
                 points: Sequence[Mapping[str, Any]],
                 *,
                 x_label: str,
                 y_label: str = 'test accuracy (%)',
                 log_x: bool = False,
                 baseline: Mapping[str, Any] | None = None,
                 title: str | None = None) -> str:
  """Plots accuracy against a swept hyper-parameter, with 95% CI bands.

  Args:
    path: where the PNG goes.
    points: dicts `{'series': str, 'x': float, 'mean': float, 'ci': float}`;
      `mean` and `ci` (the half-width of the interval) are fractions and are
      plotted in percent. A `ci` that is nan or missing draws no band. Series
      are drawn in order of first appearance, each sorted by `x`; a series of
      one point gets an error bar instead of a band.
    x_label: the swept hyper-parameter's name.
    y_label: the y axis's label.
    log_x: whether the x axis is logarithmic (every `x` must be > 0).
    baseline: optional `{'label': str, 'mean': float, 'ci': float}`, drawn as
      a horizontal dashed line with its band, e.g. the student trained from
      scratch.
    title: the title; by default `'<y_label> vs <x_label>'`.

  Returns:
    `path`, as a `str`.
  """
  if not points:
    raise ValueError('sweep_figure needs at least one point.')
  if log_x and any(not p['x'] > 0 for p in points):
    raise ValueError('log_x needs every x > 0.')
  fig = _new_figure()
  ax = fig.add_subplot()
  for series, group in _group(points, 'series').items():
    _plot_series(ax, str(series), sorted(group, key=lambda p: p['x']))
  if baseline is not None:
    _plot_baseline(ax, baseline)
  if log_x:
    _log_x_axis(ax, sorted({p['x'] for p in points}))
  ax.set_title(title or f'{_bare(y_label)} vs {x_label}')
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def _log_x_axis(ax: Any, xs: Sequence[float]) -> None:
  """A log x axis, ticked at the swept values when there are few."""
  ax.set_xscale('log')
  if len(xs) <= 12:
    ax.set_xticks(xs, [f'{x:g}' for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())


def _bare(label: str) -> str:
  """`label` without a trailing unit in parentheses: 'acc (%)' -> 'acc'."""
  head, sep, _ = label.rpartition(' (')
  return head if sep and label.endswith(')') else label


def _percent(values: Sequence[Any]) -> np.ndarray:
  return 100.0 * np.array([np.nan if v is None else v for v in values],
                          np.float64)


def _plot_series(ax: Any, label: str,
                 points: Sequence[Mapping[str, Any]]) -> None:
  x = np.array([p['x'] for p in points], np.float64)
  mean = _percent([p['mean'] for p in points])
  ci = _percent([p.get('ci') for p in points])
  has_ci = np.isfinite(ci)
  if len(points) == 1:
    ax.errorbar(x, mean, yerr=np.where(has_ci, ci, 0.0), marker='o',
                markersize=_MARKER_SIZE + 1, capsize=4, label=label)
    return
  (line,) = ax.plot(x, mean, marker='o', markersize=_MARKER_SIZE, label=label)
  if has_ci.any():
    ax.fill_between(x, np.where(has_ci, mean - ci, mean),
                    np.where(has_ci, mean + ci, mean), where=has_ci,
                    color=line.get_color(), alpha=_BAND_ALPHA, linewidth=0)


def _plot_baseline(ax: Any, baseline: Mapping[str, Any]) -> None:
  mean = 100.0 * baseline['mean']
  ci = baseline.get('ci')
  ax.axhline(mean, color='0.3', linestyle='--', linewidth=1.2,
             label=baseline.get('label', 'baseline'))
  if _is_finite(ci):
    ax.axhspan(mean - 100.0 * ci, mean + 100.0 * ci, color='0.5',
               alpha=_BAND_ALPHA / 2, linewidth=0)


# --- calibration. ------------------------------------------------------------


_ACCURACY_STYLE = {'facecolor': 'tab:blue', 'edgecolor': 'navy',
                   'linewidth': 0.6}
_GAP_STYLE = {'facecolor': (0.84, 0.15, 0.16, 0.25), 'edgecolor': 'tab:red',
              'hatch': '//', 'linewidth': 0.6}
_DIAGONAL_STYLE = {'color': '0.3', 'linestyle': '--', 'linewidth': 1}


def reliability_diagram(path: PathLike,
                        panels: Sequence[Mapping[str, Any]]) -> str:
  """Plots reliability diagrams (Guo et al., 2017), one panel per model.

  Each panel shows the accuracy of every confidence bin as a bar, the gap up
  (or down) to the bin's mean confidence as a hatched bar, the diagonal of
  perfect calibration, and the expected calibration error in the title.

  Args:
    path: where the PNG goes.
    panels: dicts `{'title': str, 'bin_lower': (M,), 'bin_upper': (M,),
      'accuracy': (M,), 'confidence': (M,), 'count': (M,), 'ece': float}`,
      fractions in [0, 1]. Bins with count 0 or a non-finite accuracy or
      confidence are skipped. A nan `ece` is shown as 'n/a'.

  Returns:
    `path`, as a `str`.
  """
  if not panels:
    raise ValueError('reliability_diagram needs at least one panel.')
  n = len(panels)
  fig = _new_figure((max(_SIZE[0], 3.3 * n), _SIZE[1]))
  axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
  for i, (ax, panel) in enumerate(zip(axes, panels)):
    _plot_reliability(ax, panel)
    if i == 0:
      ax.set_ylabel('accuracy')
  # Proxies, so that the legend is right also when the first panel is empty.
  handles = [Line2D([], [], label='perfect calibration', **_DIAGONAL_STYLE),
             Patch(label='accuracy', **_ACCURACY_STYLE),
             Patch(label='gap to confidence', **_GAP_STYLE)]
  axes[0].legend(handles=handles, loc='upper left', fontsize='small')
  return _save(fig, path)


def _plot_reliability(ax: Any, panel: Mapping[str, Any]) -> None:
  lower = np.asarray(panel['bin_lower'], np.float64)
  upper = np.asarray(panel['bin_upper'], np.float64)
  accuracy = np.asarray(panel['accuracy'], np.float64)
  confidence = np.asarray(panel['confidence'], np.float64)
  count = np.asarray(panel['count'], np.float64)
  keep = (count > 0) & np.isfinite(accuracy) & np.isfinite(confidence)
  lower, width = lower[keep], (upper - lower)[keep]
  accuracy, confidence = accuracy[keep], confidence[keep]
  ax.bar(lower, accuracy, width=width, align='edge', **_ACCURACY_STYLE)
  ax.bar(lower, confidence - accuracy, bottom=accuracy, width=width,
         align='edge', **_GAP_STYLE)
  ax.plot([0, 1], [0, 1], **_DIAGONAL_STYLE)
  if not keep.any():
    ax.text(0.5, 0.5, 'no data', ha='center', va='center', color='0.4')
  ece = panel.get('ece')
  ece_text = f'{100 * ece:.2f}%' if _is_finite(ece) else 'n/a'
  ax.set_title(f"{panel.get('title', '')}\nECE = {ece_text}")
  ax.set_xlabel('confidence')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_aspect('equal')
  ax.grid(alpha=0.3)


# --- training curves. --------------------------------------------------------


def training_curves(path: PathLike,
                    records: Sequence[Mapping[str, Any]]) -> str:
  """Plots accuracy and loss against epoch for every stage of a run.

  Args:
    path: where the PNG goes.
    records: dicts as in a run's `metrics.jsonl`: `{'stage': str, 'epoch':
      int (1-based, per stage), 'train/accuracy': float, 'test/accuracy':
      float, 'train/loss': float, 'test/loss': float, ...}`. Accuracies are
      fractions and are plotted in percent. Missing or non-finite values are
      skipped; a record without `epoch` is ignored; of repeated epochs the
      last record wins.

  Returns:
    `path`, as a `str`. One colour per stage, in order of first appearance;
    solid lines are test metrics, dashed lines train metrics.
  """
  records = [r for r in records if _is_finite(r.get('epoch'))]
  if not records:
    raise ValueError('training_curves needs at least one record with an '
                     'epoch.')
  stages = _group(records, 'stage')
  fig = _new_figure((9.0, _SIZE[1]))
  acc_ax, loss_ax = fig.subplots(1, 2)
  colors = [f'C{i % 10}' for i in range(len(stages))]
  for (stage, group), color in zip(stages.items(), colors):
    for split, style in (('test', '-'), ('train', '--')):
      _plot_curve(acc_ax, group, f'{split}/accuracy', 100.0, color, style)
      _plot_curve(loss_ax, group, f'{split}/loss', 1.0, color, style)
  for ax, name, unit in ((acc_ax, 'accuracy', ' (%)'), (loss_ax, 'loss', '')):
    ax.set_title(f'{name} per epoch')
    ax.set_xlabel('epoch')
    ax.set_ylabel(name + unit)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=c, linewidth=4, label=str(s))
             for s, c in zip(stages, colors)]
  handles += [Line2D([], [], color='k', linestyle='-', label='test'),
              Line2D([], [], color='k', linestyle='--', label='train')]
  loss_ax.legend(handles=handles, fontsize='small')
  return _save(fig, path)


def _plot_curve(ax: Any, records: Sequence[Mapping[str, Any]], key: str,
                scale: float, color: str, style: str) -> None:
  by_epoch = {r['epoch']: r[key] for r in records if _is_finite(r.get(key))}
  if not by_epoch:
    return
  epochs = sorted(by_epoch)
  ax.plot(epochs, [scale * by_epoch[e] for e in epochs], color=color,
          linestyle=style, marker='o', markersize=_MARKER_SIZE - 1)
