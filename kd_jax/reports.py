"""What a finished run reports: calibration, ensembles, tables and figures."""

from collections.abc import Mapping
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from kd_jax import calibration
from kd_jax import data as data_lib
from kd_jax import loop
from kd_jax import methods
from kd_jax import stages
from kd_jax import train


def stage_calibration(model, variables, dataset: data_lib.Dataset,
                      batch_size: int, mesh=None) -> dict[str, Any] | None:
  """Calibration of a trained network before and after temperature scaling.

  The temperature is fitted on `dataset.validation` (held out of training),
  and ECE / NLL are measured on the test split (see `kd_jax.calibration`).

  Returns:
    `calibration.calibration_report`'s numbers plus `'reliability'`: the
    test split's reliability bins before and after scaling (lists, for
    diagrams); None without a validation split.
  """
  if dataset.validation is None:
    return None
  logits = {name: np.asarray(loop.predict_logits(
      model.apply, variables, split, batch_size, desc=f'{name} logits',
      mesh=mesh))
            for name, split in (('validation', dataset.validation),
                                ('test', dataset.test))}
  report = calibration.calibration_report(
      logits['validation'], dataset.validation.labels, logits['test'],
      dataset.test.labels)
  bins = lambda scale: {  # Empty bins' NaN becomes null (strict JSON).
      k: [None if x != x else x for x in np.asarray(v).tolist()]
      for k, v in calibration.reliability_bins(
          logits['test'] / scale, dataset.test.labels).items()}
  return {**report, 'reliability': {
      'before': bins(1.0), 'after': bins(report['temperature'])}}


def ensemble_accuracies(model, members: list[Any], split: data_lib.Split,
                        batch_size: int, mesh=None
                        ) -> tuple[float, list[float]]:
  """Accuracy on `split` of the ensemble of `members` (variables of `model`;
  their mean softmax decides), and of each member (inference split over
  `mesh`, if given)."""
  logits = jax.numpy.stack(
      [loop.predict_logits(model.apply, variables, split, batch_size,
                            mesh=mesh)
       for variables in members], axis=1)
  labels = jax.numpy.asarray(split.labels)
  correct = lambda predicted: float(jax.numpy.mean(predicted == labels))
  return (correct(train.ensemble_prediction(logits)),
          [correct(train.ensemble_prediction(logits[:, m]))
           for m in range(len(members))])


def write_plots(directory: str, records: list[Mapping[str, Any]],
                results: Mapping[str, Any], titles: Mapping[str, str],
                teacher_logits=None) -> list[str]:
  """Figures of a finished run, as PNGs in `directory` (created if needed).

  training_curves.png (train and test accuracy and loss per epoch of every
  stage, from the metric `records` as `read_metrics` gives them),
  reliability.png (test reliability diagrams of each stage in `results`
  before temperature scaling, when calibration was measured) and
  tempered_softmax.png (the teacher's softmax at several temperatures on
  the first test image, the tutorial's figure, given `teacher_logits`
  `(K,)`). `titles` maps stage names to panel titles, in order.

  Returns:
    The paths written.
  """
  from kd_jax import plots  # pylint: disable=g-import-not-at-top
  written = []
  if records:
    written.append(plots.training_curves(
        os.path.join(directory, 'training_curves.png'), records))
  panels = []
  for name, title in titles.items():
    calib = (results['stages'].get(name) or {}).get('calibration')
    if calib:
      panels.append({'title': title, 'ece': calib['test_ece'],
                     **{k: np.asarray(v, float) for k, v in
                        calib['reliability']['before'].items()}})
  if panels:
    written.append(plots.reliability_diagram(
        os.path.join(directory, 'reliability.png'), panels))
  if teacher_logits is not None:
    written.append(plots.tempered_softmax_figure(
        os.path.join(directory, 'tempered_softmax.png'),
        np.asarray(teacher_logits)))
  return written


def results_table(results: Mapping[str, Any],
                  config: ml_collections.ConfigDict) -> str:
  """A Markdown table of each finished stage, with how it was produced."""
  rows = ['| stage | model | params | epochs | test accuracy | test ECE | '
          'test ECE, T-scaled (T) | wall time |',
          '|---|---|---:|---:|---:|---:|---:|---:|']
  for name, title in stages.stage_titles(config).items():
    info = results['stages'].get(name)
    if info is None:
      continue
    epochs = info.get('epochs', 'loaded')
    wall = (f'{info["wall_time_s"]:.1f} s' if 'wall_time_s' in info
            else 'loaded')
    calib = info.get('calibration')
    ece = (f'{100 * calib["test_ece"]:.2f}% | '
           f'{100 * calib["test_ece_scaled"]:.2f}% '
           f'({calib["temperature"]:.2f})' if calib else 'n/a | n/a')
    rows.append(
        f'| {title} | {info["model"]} | {info["params"]:,} | '
        f'{epochs} | {100 * info["test_accuracy"]:.2f}% | {ece} | {wall} |')
  ensemble = results['stages'].get('distill', {}).get(
      'teacher_ensemble_accuracy')
  if ensemble is not None:
    rows.append(f'\nThe teachers\' ensemble (mean softmax): '
                f'{100 * ensemble:.2f}%.')
  footer = (
      f'\nExperiment `{config.name}` on {results.get("dataset")} '
      f'({results.get("data_source")}), seed {config.seed}, batch '
      f'{config.batch_size}; {methods.summary(config)}. Test accuracy after '
      'the last epoch (never the best epoch); ECE with 15 equal-width bins, '
      'T-scaled with the temperature T fitted on the '
      f'{config.validation_size} validation examples held out of training; '
      'wall time includes compilation and per-epoch evaluation.\n')
  return '\n'.join(rows) + '\n' + footer
