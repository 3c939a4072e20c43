"""The `export.py` command (also the `kd-jax-export` console script): a
finished stage of a run as deployable files and a deployment report.

  python export.py --workdir=runs/seed       # the distilled student
  python export.py --workdir=runs/seed --stage=teacher --format=jax

writes under `<workdir>/export/`: `<stage>.onnx`, `<stage>.jax_export`,
`report.md` and `report.json` (`export_stage`).
"""

import json
import os
import sys
from typing import Any

from absl import flags
from absl import logging

from kd_jax import cli
from kd_jax import deploy
from kd_jax import deploy_report
from kd_jax import errors
from kd_jax import experiment
from kd_jax import workdir as workdir_lib

# An exported program must give kd_jax's logits up to float32 rounding:
# |difference| at most this fraction of the largest |logit| (at least 1).
TOLERANCE = 1e-4


def _blobs(loaded: deploy.LoadedStage, formats: tuple[str, ...]
           ) -> dict[str, bytes]:
  program = deploy.inference_program(loaded)
  converters = {
      'jax': lambda: deploy.to_jax_export(program, loaded.image_shape),
      'onnx': lambda: deploy.to_onnx(program, loaded.image_shape,
                                     f'kd_jax_{loaded.name}'),
  }
  return {fmt: converters[fmt]() for fmt in formats}


def _check(row: dict[str, Any], stage: str) -> None:
  """Refuses an exported program whose logits are not kd_jax's."""
  for fmt, check in row['checks'].items():
    if check['max_abs_diff'] > TOLERANCE * max(1.0, check['max_abs_logit']):
      raise errors.UserInputError(
          f'--format={fmt}: the exported {stage} stage computes other logits '
          f'than kd_jax (max |difference| {check["max_abs_diff"]:.3g} on the '
          'test split); nothing was written. Please report this.')


def export_stage(workdir: str, stage: str = 'distill',
                 formats: str = 'onnx,jax', repeats: int = 50
                 ) -> dict[str, Any]:
  """Exports the finished `stage` of the run in `workdir` and reports on it.

  Everything is computed and checked first; only then are `<stage>.onnx`,
  `<stage>.jax_export`, `report.json` and `report.md` written to
  `<workdir>/export/` (each atomically), so a bad request writes nothing.

  Args:
    workdir: the run's `--workdir`.
    stage: the stage to export (default: the distilled student).
    formats: comma-separated `deploy.FORMATS`.
    repeats: timed calls per latency figure.

  Returns:
    The report (`report.json`): the stage's figures (`student`), those of
    the stage it was distilled from (`teacher`, or None) and `ratios`.

  Raises:
    errors.UserInputError: an unknown format or one whose packages are
      missing, a workdir without a kd_jax run, no such stage, an unfinished
      stage, data that cannot be read, or an export that does not reproduce
      kd_jax's logits.
  """
  chosen = deploy.parse_formats(formats)
  if repeats < 1:
    raise errors.UserInputError(f'--repeats={repeats}: expected at least 1')
  config, results = deploy.read_workdir(workdir)
  loaded = deploy.load_stage(workdir, stage, config, results)
  reference = deploy.reference_stage(config, results, stage)
  teacher = reference and deploy.load_stage(workdir, reference, config,
                                            results)
  test = experiment.load_data(config).test
  blobs = _blobs(loaded, chosen)
  row = deploy_report.measure(loaded, blobs, test.images, test.labels,
                              repeats)
  _check(row, stage)
  files = {fmt: stage + deploy.SUFFIXES[fmt] for fmt in chosen}
  report = {
      'workdir': os.path.abspath(workdir),
      'stage': stage,
      'files': files,
      'repeats': repeats,
      'test_examples': int(test.num_examples),
      'env': deploy_report.environment(),
      'student': row,
      'teacher': None,
  }
  if teacher:
    report['teacher'] = deploy_report.measure(
        teacher, _blobs(teacher, chosen), test.images, test.labels, repeats)
    report['ratios'] = deploy_report.compare(row, report['teacher'])
  directory = os.path.join(workdir, 'export')
  os.makedirs(directory, exist_ok=True)
  for fmt, name in files.items():
    workdir_lib.write_atomic(os.path.join(directory, name), blobs[fmt])
  workdir_lib.write_atomic(os.path.join(directory, 'report.json'),
                           json.dumps(report, indent=2) + '\n')
  workdir_lib.write_atomic(os.path.join(directory, 'report.md'),
                           deploy_report.markdown(report))
  return report


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'The --workdir of a finished run.',
                      required=True)
  flags.DEFINE_string('stage', 'distill', 'The stage to export: distill (the '
                      'distilled student), teacher, scratch, or any stage '
                      'of the run by name.')
  flags.DEFINE_string('format', ','.join(deploy.FORMATS),
                      'Comma-separated formats: onnx (needs the export '
                      'extra), jax (jax.export, StableHLO).')
  flags.DEFINE_integer('repeats', 50, 'Timed calls per latency figure.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.exit_with_error(errors.UserInputError(
        f'unexpected arguments: {" ".join(argv[1:])}'))
  cli.configure_jax()
  cli.quiet_orbax_logs()
  workdir = flags.FLAGS.workdir
  try:
    export_stage(workdir, flags.FLAGS.stage, flags.FLAGS.format,
                 flags.FLAGS.repeats)
  except errors.UserInputError as e:
    cli.exit_with_error(e)
  except OSError as e:
    cli.exit_with_filesystem_error(e, workdir)
  path = os.path.join(workdir, 'export', 'report.md')
  with open(path) as f:
    print(f.read())
  logging.info('report: %s', path)
  print(f'exported: {os.path.join(workdir, "export")}', file=sys.stderr)


def console_main() -> None:
  """Defines the flags and runs `main` (`python export.py`,
  `kd-jax-export`)."""
  define_flags()
  cli.run(main)
