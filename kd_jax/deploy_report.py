"""What a deployed student saves: size, arithmetic, latency and accuracy.

`measure` times and checks one exported model on this machine's CPU;
`compare` puts a student's figures beside its teacher's as ratios;
`markdown` writes the report a deployment engineer reads.
"""

from collections.abc import Callable, Mapping
import datetime
import os
import platform
import time
from typing import Any

import jax
import numpy as np

from kd_jax import deploy
from kd_jax import models
from kd_jax import provenance

# The batch sizes latency is measured at: one image (an interactive device)
# and a batch (a server).
LATENCY_BATCHES = (1, 64)


def flops_per_image(program: deploy.InferenceProgram,
                    image_shape: tuple[int, ...]) -> float:
  """FLOPs of one image's forward pass, from XLA's cost analysis of
  `program` lowered at batch 1 (nothing is run)."""
  cost = jax.jit(program).lower(
      jax.ShapeDtypeStruct((1, *image_shape), np.float32)).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops'])


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 2
              ) -> float:
  """Median wall time of `call()` in milliseconds over `repeats` calls,
  after `warmup` untimed ones (`call` must block until its result is
  ready)."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def jax_logits(program: deploy.InferenceProgram, images: np.ndarray,
               batch_size: int = 500) -> np.ndarray:
  """Logits `(N, K)` of `program` compiled by JAX, for images `(N, H, W,
  C)`."""
  compiled = jax.jit(program)
  return np.concatenate([np.asarray(compiled(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def _batch(images: np.ndarray, size: int) -> np.ndarray:
  """`size` test images (repeated if the split has fewer)."""
  return np.resize(images, (size, *images.shape[1:]))


def measure(loaded: deploy.LoadedStage, blobs: Mapping[str, bytes],
            images: np.ndarray, labels: np.ndarray, repeats: int
            ) -> dict[str, Any]:
  """One model's figures on this CPU.

  Args:
    loaded: the stage.
    blobs: its exported programs by format (`deploy.FORMATS`).
    images: test images `(N, H, W, C)` float32 in [0, 1].
    labels: their labels `(N,)`.
    repeats: timed calls per latency figure (their median is reported).

  Returns:
    `params`, `param_bytes` (float32), `flops_per_image`, the size of each
    exported file (`<format>_bytes`), `test_accuracy` (kd_jax's logits),
    `latency_ms[runtime][batch]`, and `checks[format]`: how the exported
    program's test logits agree with kd_jax's (`deploy.agreement`).
  """
  program = deploy.inference_program(loaded)
  params = models.count_params(loaded.variables['params'])
  reference = jax_logits(program, images)
  row = {
      'stage': loaded.name,
      'model': loaded.model_name,
      'params': params,
      'param_bytes': 4 * params,
      'flops_per_image': flops_per_image(program, loaded.image_shape),
      'test_accuracy': float(np.mean(reference.argmax(-1) == labels)),
      'latency_ms': {},
      'checks': {},
  }
  compiled = jax.jit(program)
  row['latency_ms']['jax'] = {
      str(b): median_ms(lambda x=jax.device_put(_batch(images, b)):
                        jax.block_until_ready(compiled(x)), repeats)
      for b in LATENCY_BATCHES}
  if 'jax' in blobs:
    row['jax_bytes'] = len(blobs['jax'])
    row['checks']['jax'] = deploy.agreement(
        reference, deploy.run_jax_export(blobs['jax'], images))
  if 'onnx' in blobs:
    row['onnx_bytes'] = len(blobs['onnx'])
    session = deploy.onnx_session(blobs['onnx'])
    row['checks']['onnx'] = deploy.agreement(
        reference, deploy.run_onnx(session, images))
    row['latency_ms']['onnxruntime'] = {
        str(b): median_ms(lambda x=_batch(images, b): session.run(
            ['logits'], {'images': x}), repeats)
        for b in LATENCY_BATCHES}
  return row


def compare(student: Mapping[str, Any], teacher: Mapping[str, Any]
            ) -> dict[str, float]:
  """The student against its teacher: `params` and `flops` as teacher /
  student (how many times fewer), `speedup[runtime][batch]` as teacher's
  latency / student's, `accuracy_points` as (student - teacher) x 100."""
  speedup = {
      runtime: {b: teacher['latency_ms'][runtime][b] / ms
                for b, ms in by_batch.items()}
      for runtime, by_batch in student['latency_ms'].items()
      if runtime in teacher['latency_ms']}
  return {
      'params': teacher['params'] / student['params'],
      'flops': teacher['flops_per_image'] / student['flops_per_image'],
      'speedup': speedup,
      'accuracy_points': 100 * (student['test_accuracy']
                                - teacher['test_accuracy']),
  }


def environment() -> dict[str, Any]:
  """Where the figures were measured: date, CPU, package versions."""
  versions = provenance.package_versions(
      ('jax', 'jaxlib', 'onnxruntime', 'jax2onnx'))
  return {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
      'jax_devices': str(jax.devices()[0].device_kind),
      'packages': {package: version for package, version in versions.items()
                   if version != provenance.NOT_INSTALLED},
  }


def _size(row: Mapping[str, Any], key: str) -> str:
  return f'{row[key] / 1e6:.3f} MB' if key in row else '-'


def _latency(row: Mapping[str, Any], runtime: str, batch: str) -> str:
  ms = row['latency_ms'].get(runtime, {}).get(batch)
  return '-' if ms is None else f'{ms:.2f} ms'


def _times(ratio: float | None, fewer: str, more: str) -> str | None:
  """A teacher / student ratio in words: '13.4x fewer', or for a ratio
  below 1 the inverse, '3.0x more'."""
  if ratio is None:
    return None
  return f'{ratio:.1f}x {fewer}' if ratio >= 1 else f'{1 / ratio:.1f}x {more}'


def markdown(report: Mapping[str, Any]) -> str:
  """The report as a Markdown page: one column per model (student, then its
  teacher and the ratio when there is one), then the export checks."""
  rows = [report['student']] + ([report['teacher']] if report['teacher']
                                else [])
  ratio = report.get('ratios')
  header = ['', *(f'{r["stage"]} ({r["model"]})' for r in rows)]
  if ratio:
    header.append('teacher / student')
  lines = ['# Deployment report', '',
           f'Workdir `{report["workdir"]}`, measured {report["env"]["date"]} '
           f'on {report["env"]["machine"]} (median of {report["repeats"]} '
           'calls per latency; inputs float32 NHWC in [0, 1]).', '',
           '| ' + ' | '.join(header) + ' |',
           '|---|' + '---:|' * (len(header) - 1)]

  def line(title, cells, ratio_cell=None):
    lines.append('| ' + ' | '.join([title, *cells] + (
        [ratio_cell or ''] if ratio else [])) + ' |')

  line('parameters', [f'{r["params"]:,}' for r in rows],
       ratio and _times(ratio['params'], 'fewer', 'more'))
  line('float32 weights', [_size(r, 'param_bytes') for r in rows])
  for fmt, title in (('onnx', 'ONNX file'), ('jax', 'jax.export file')):
    if fmt + '_bytes' in report['student']:
      line(title, [_size(r, fmt + '_bytes') for r in rows])
  line('FLOPs per image', [f'{r["flops_per_image"] / 1e6:.2f} M'
                           for r in rows],
       ratio and _times(ratio['flops'], 'fewer', 'more'))
  for runtime in report['student']['latency_ms']:
    for batch in map(str, LATENCY_BATCHES):
      speedup = ratio['speedup'].get(runtime, {}).get(batch) if ratio else None
      line(f'latency, {runtime}, batch {batch}',
           [_latency(r, runtime, batch) for r in rows],
           _times(speedup, 'faster', 'slower'))
  line('test accuracy', [f'{r["test_accuracy"]:.4f}' for r in rows],
       ratio and f'{ratio["accuracy_points"]:+.2f} points')
  lines += ['', 'Exported files against kd_jax\'s own logits on the test '
            f'split ({report["test_examples"]} images):', '']
  for fmt, check in report['student']['checks'].items():
    lines.append(f'- `{report["files"][fmt]}`: max |difference| '
                 f'{check["max_abs_diff"]:.2e}, same prediction for '
                 f'{100 * check["argmax_agreement"]:.2f}% of images')
  return '\n'.join(lines) + '\n'
