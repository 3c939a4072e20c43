r"""The CIFAR-100 recipe's training steps, JAX (kd_jax) next to PyTorch.

  python benchmarks/cifar_steps.py [--repeats=20] [--models=resnet8x4,kd]
      [--torch_python=/work/peers-venv/bin/python] [--chunk=0] [--batch=64]

At batch 64 (`--batch`) of 32x32x3 images, 100 classes, with the recipe of
experiments/cifar100/common.py (random crop after 4-pixel zero padding and
horizontal flip inside the step, CIFAR-100 normalisation as the model's
first operation, SGD with momentum 0.9 and weight decay 5e-4 at lr 0.05),
times in kd_jax the single jitted train step of resnet8x4, resnet32x4,
wrn_40_2 and resnet56 and the resnet32x4 -> resnet8x4 distil step (`kd`:
0.1 CE + 0.9 T^2 KL at T = 4, the teacher online in inference mode on the
augmented batch, as experiments/cifar100/resnet32x4_resnet8x4.py
configures it). A single jitted step is what the recipe's CPU variant
(`:quick`, `config.loop = 'python'`) runs; the full recipe's rolled scan
over an epoch is the accelerator's choice (see benchmarks/gpu_check.sh).
`--chunk=K` adds rows for K steps as one unrolled `loop.make_scan_steps`
call (as benchmarks/steps.py; off by default: a CIFAR ResNet unrolled K
times takes about K times a step's compile time on a CPU), or with
`--nochunk_unroll` one rolled scan, as the full recipe runs an epoch on an
accelerator (benchmarks/gpu_check.sh).

Then, in the same invocation, runs benchmarks/torch_cifar.py (the same five
steps written plainly in PyTorch) under `--torch_python` and prints one
Markdown table: median ms per step of each (over `--repeats` calls after
3 warm-up calls, fewer if `--repeats` is smaller; min-max below it), PyTorch ms / JAX ms (above
1: JAX faster), images/s, XLA's cost-analysis GFLOP per step and the share
of the machine's matmul peak it reaches, compile time; and, per row,
whether "JAX at least as fast" holds.
"""

import functools
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order
from experiments.cifar100 import common as cifar_recipe
from experiments.cifar100 import resnet32x4_resnet8x4
from kd_jax import augment
from kd_jax import dataset_info
from kd_jax import distil_setup
from kd_jax import loop
from kd_jax import models
from kd_jax import optimizers
from kd_jax import precision
from kd_jax import train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TORCH_PYTHON = '/work/peers-venv/bin/python'
# Step name -> (row label, model trained); 'kd' distils resnet32x4 into it.
STEPS = {
    'resnet8x4': ('resnet8x4 train', 'resnet8x4'),
    'resnet32x4': ('resnet32x4 train', 'resnet32x4'),
    'wrn_40_2': ('wrn_40_2 train', 'wrn_40_2'),
    'resnet56': ('resnet56 train', 'resnet56'),
    'kd': ('resnet32x4 -> resnet8x4 KD distil', 'resnet8x4'),
}
TEACHER = 'resnet32x4'
BATCH = 64
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
STEPS_PER_EPOCH = 782  # ceil(50,000 / 64), for the step schedule.
EPOCHS = 240
WARMUP = 3
HEADER = ('| step | JAX ms | PyTorch ms | JAX/PyTorch speed ratio | '
          'JAX % of peak |')

_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per step.')
_MODELS = flags.DEFINE_list(
    'models', list(STEPS),
    f'Steps to time, a subset of {",".join(STEPS)} (kd: the resnet32x4 -> '
    'resnet8x4 distil step).')
_TORCH_PYTHON = flags.DEFINE_string(
    'torch_python',
    DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else '',
    'Python with torch for the PyTorch column (benchmarks/torch_cifar.py); '
    '"" skips it.')
_CHUNK = flags.DEFINE_integer(
    'chunk', 0, 'If > 0, also time chunks of this many steps as one unrolled '
    'scan (slow to compile on CPU).')
_BATCH = flags.DEFINE_integer(
    'batch', BATCH, 'Images per step, in JAX and PyTorch (the comparison is '
    'at the default; a smaller batch makes a quicker smoke run).')
_CHUNK_UNROLL = flags.DEFINE_boolean(
    'chunk_unroll', True, 'Unroll the --chunk scans (the CPU choice); '
    '--nochunk_unroll: rolled, as the full recipe runs on GPU/TPU.')


def _model(name: str):
  info = dataset_info.DATASETS['cifar100']
  return models.make_model(name, input_mean=info.mean, input_std=info.std,
                           num_classes=NUM_CLASSES)


def _state(name: str) -> train.TrainState:
  """A fresh train state of zoo model `name` with the recipe's optimiser and
  augmentation, as `experiment.run` builds it."""
  return train.create_train_state(
      _model(name), jax.random.PRNGKey(0), IMAGE_SHAPE,
      tx=optimizers.make_optimizer(cifar_recipe.sgd_recipe(name),
                                   steps_per_epoch=STEPS_PER_EPOCH,
                                   epochs=EPOCHS),
      augment=augment.AugmentSettings.from_section(
          resnet32x4_resnet8x4.get_config().augment))  # Crop (pad 4), flip.


def _batch(size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, size=size).astype(np.int32)}


def _warmup(repeats: int) -> int:
  """Warm-up calls before `repeats` timed ones: `WARMUP`, fewer for a
  smoke run of fewer repeats."""
  return min(WARMUP, repeats)


def _step_and_args(step_name: str):
  """(step function, extra args after the batch) of a row."""
  if step_name != 'kd':
    return train.train_step, ()
  teacher = _model(TEACHER)
  teacher_variables = train.model_variables(_state(TEACHER))
  config = resnet32x4_resnet8x4.get_config()
  distiller = distil_setup.distiller(
      config, precision.compute_in(teacher.apply, config.precision),
      steps_per_epoch=STEPS_PER_EPOCH)
  return functools.partial(train.distill_step, distiller=distiller), (
      teacher_variables,)


def _jax_rows(names: list[str], repeats: int, chunk: int,
              unroll: bool) -> dict[str, dict]:
  """Times each step in JAX; prints progress to stderr."""
  rows = {}
  batch = jax.device_put(_batch(_BATCH.value))
  for name in names:
    label, model = STEPS[name]
    step, step_args = _step_and_args(name)
    jitted = jax.jit(step, donate_argnums=train.state_donation())
    # Each call's state feeds the next, as in a training loop (donated off
    # CPU, see `train.state_donation`).
    timing = common.time_calls(jitted, _state(model), batch, *step_args,
                               repeats=repeats, warmup=_warmup(repeats))
    rows[name] = dict(label=label, compile_s=timing.compile_s,
                      times_ms=[1e3 * t for t in timing.times],
                      flops=timing.flops)
    print(f'  jax {label}: {timing.median_ms:.1f} ms (compile '
          f'{timing.compile_s:.1f} s)', file=sys.stderr, flush=True)
    if chunk > 0:
      many = jax.device_put(_batch(_BATCH.value * chunk, seed=1))
      indices = jnp.arange(_BATCH.value * chunk, dtype=jnp.int32).reshape(
          chunk, _BATCH.value)
      run = loop.make_scan_steps(step, unroll=unroll)
      timing = common.time_calls(run, _state(model), many, indices,
                                 *step_args, repeats=max(repeats // chunk, 3),
                                 warmup=_warmup(repeats))
      rows[f'{name}/chunk'] = dict(
          label=(f'{label}, {"unrolled" if unroll else "rolled"} scan of '
                 f'{chunk} (per step)'),
          compile_s=timing.compile_s,
          times_ms=[1e3 * t / chunk for t in timing.times],
          flops=timing.flops / chunk)
      print(f'  jax {label}, chunk: {timing.median_ms / chunk:.1f} ms/step '
            f'(compile {timing.compile_s:.1f} s)', file=sys.stderr,
            flush=True)
  return rows


def _torch_rows(python: str, names: list[str], repeats: int
                ) -> tuple[dict[str, dict], str]:
  """Runs benchmarks/torch_cifar.py; (rows by step name, note)."""
  if not python:
    return {}, 'PyTorch column skipped (--torch_python is empty).'
  if not os.path.exists(python):
    return {}, f'PyTorch column skipped: {python} does not exist.'
  command = [python, os.path.join(HERE, 'torch_cifar.py'),
             f'--repeats={repeats}', f'--warmup={_warmup(repeats)}',
             f'--batch={_BATCH.value}',
             f'--models={",".join(names)}']
  result = subprocess.run(command, capture_output=True, text=True,
                          check=False)
  rows = {}
  for line in result.stdout.splitlines():
    if line.startswith('{'):
      row = json.loads(line)
      rows[row['step']] = row
  if result.returncode:
    return rows, (f'PyTorch run failed (exit {result.returncode}): '
                  f'{result.stderr.strip()[-500:]}')
  versions = {r['torch'] for r in rows.values()}
  threads = {r['threads'] for r in rows.values()}
  return rows, (f'PyTorch: torch {", ".join(sorted(versions))}, '
                f'{", ".join(map(str, sorted(threads)))} threads, '
                f'{python}.')


def _median(values):
  return float(np.median(values))


def main(argv):
  del argv
  names = list(dict.fromkeys(_MODELS.value))
  unknown = sorted(set(names) - set(STEPS))
  if unknown:
    raise app.UsageError(f'--models: unknown {unknown}; known: {list(STEPS)}')
  repeats = _REPEATS.value
  start = time.perf_counter()
  peak_repeats = min(10, max(repeats, 3))
  peak = common.matmul_peak_gflops(repeats=peak_repeats)
  jax_rows = _jax_rows(names, repeats, _CHUNK.value, _CHUNK_UNROLL.value)
  jax_s = time.perf_counter() - start
  torch_rows, torch_note = _torch_rows(_TORCH_PYTHON.value, names, repeats)
  torch_s = time.perf_counter() - start - jax_s

  print(f'date: {time.strftime("%Y-%m-%d %H:%M")}')
  print(f'machine: {common.machine_line()}')
  print(f'matmul peak (2048^3 f32 through XLA, median of {peak_repeats}): '
        f'{peak:.1f} GFLOP/s')
  print(f'batch {_BATCH.value}, 32x32x3, {NUM_CLASSES} classes, crop (pad 4) '
        '+ flip inside the step, SGD momentum 0.9 wd 5e-4 lr 0.05; median of '
        f'{repeats} calls after {_warmup(repeats)} warm-up calls')
  print(torch_note)
  print(f'wall time: JAX {jax_s:.0f} s (with the matmul peak), PyTorch '
        f'{torch_s:.0f} s\n')
  print(HEADER + ' JAX images/s | PyTorch images/s | GFLOP/step (XLA) | '
        'JAX compile s | PyTorch first call s |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  verdicts = []
  for key, row in jax_rows.items():
    jax_ms = _median(row['times_ms'])
    gflop = row['flops'] / 1e9
    of_peak = 100 * gflop / (jax_ms * 1e-3) / peak
    other = torch_rows.get(key)
    if other is None:
      torch_ms = ratio = torch_ips = first = '-'
    else:
      torch_ms = f'{other["median_ms"]:.1f}'
      ratio = f'{other["median_ms"] / jax_ms:.2f}'
      torch_ips = f'{_BATCH.value / (other["median_ms"] * 1e-3):,.0f}'
      first = f'{other["first_call_s"]:.2f}'
      verdicts.append((row['label'], jax_ms <= other['median_ms'],
                       other['median_ms'] / jax_ms))
    print(f'| {row["label"]} | {jax_ms:.1f} | {torch_ms} | {ratio} | '
          f'{of_peak:.0f}% | {_BATCH.value / (jax_ms * 1e-3):,.0f} | '
          f'{torch_ips} | {gflop:.2f} | {row["compile_s"]:.1f} | {first} |')

  print('\nmin-max ms: ' + '; '.join(
      f'{row["label"]}: JAX {min(row["times_ms"]):.1f}-'
      f'{max(row["times_ms"]):.1f}'
      + (f', PyTorch {torch_rows[key]["min_ms"]:.1f}-'
         f'{torch_rows[key]["max_ms"]:.1f}' if key in torch_rows else '')
      for key, row in jax_rows.items()))
  print('speed ratio = PyTorch ms / JAX ms (above 1: JAX faster).')
  if not verdicts:
    print('"JAX at least as fast": not checked (no PyTorch column).')
  for label, ok, ratio in verdicts:
    print(f'  [{"holds" if ok else "FAILS"}] JAX at least as fast: {label} '
          f'({ratio:.2f}x)')


if __name__ == '__main__':
  app.run(main)
