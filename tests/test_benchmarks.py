"""The step benchmark runs and prints its table (figures are not asserted:
timings belong in benchmark output, never in test assertions)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_steps_benchmark_prints_every_row_and_target():
  result = subprocess.run(
      # Every row's code path at a small batch (the figures are not
      # checked; at batch 64 running the steps took a third of the time).
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'steps.py'),
       '--repeats=2', '--chunk=2', '--batch=8', '--loop_chunks=2',
       '--loop_repeats=1'],
      capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  for row in ('| step (batch 8) |', '| teacher train step |',
              '| distil step, cached logits |',
              '| teacher train, chunk of 2 (per step) |',
              '| teacher train, epoch of 4 steps in loop.fit (per step) |',
              'matmul peak'):
    assert row in result.stdout
  assert result.stdout.count('] ') >= 9  # One line per target.
