"""The step benchmark runs and prints its table (figures are not asserted:
timings belong in benchmark output, never in test assertions)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_benchmark(script: str, *flags: str) -> str:
  """`benchmarks/<script>`'s standard output; fails on a non-zero exit."""
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', script), *flags],
      capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_steps_benchmark_prints_every_row_and_target():
  # Every row's code path at a small batch (the figures are not checked; at
  # batch 64 running the steps took a third of the time).
  stdout = _run_benchmark('steps.py', '--repeats=2', '--chunk=2', '--batch=8',
                          '--loop_chunks=2', '--loop_repeats=1')
  for row in ('| step (batch 8) |', '| teacher train step |',
              '| distil step, cached logits |',
              '| teacher train, chunk of 2 (per step) |',
              '| teacher train, epoch of 4 steps in loop.fit (per step) |',
              '| teacher train, the same 4 steps as direct chunk calls '
              '(per step) |',
              '| teacher train, 4 steps over the chunk row\'s 2 batches '
              '(per step) |',
              'teacher train, per round: loop.fit epoch / the same chunks '
              'called directly: ', 'matmul peak'):
    assert row in stdout
  assert stdout.count('] ') >= 9  # One line per target.


def test_crd_step_benchmark_prints_both_formulations():
  stdout = _run_benchmark('crd_step.py', '--repeats=1', '--num_data=600',
                          '--batch=4', '--negatives=32', '--feat_dim=8')
  for row in ('| draw the negatives', '| loss + gradient', '| both |'):
    assert row in stdout
