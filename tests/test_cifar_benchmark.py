"""The CIFAR step benchmark runs and prints its table (one jitted resnet8x4
step, the PyTorch column skipped: CI has no torch; figures are not
asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cifar_benchmark_prints_the_table_and_the_resnet8x4_row():
  result = subprocess.run(
      # At a small batch: at batch 64 running the step took half the time.
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'cifar_steps.py'),
       '--repeats=1', '--models=resnet8x4', '--torch_python=', '--batch=8'],
      capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert ('| step | JAX ms | PyTorch ms | JAX/PyTorch speed ratio | '
          'JAX % of peak |') in out
  assert '| resnet8x4 train |' in out
  assert 'batch 8, 32x32x3' in out
  assert 'matmul peak' in out and 'machine:' in out
  assert 'PyTorch column skipped' in out
  assert '| wrn_40_2 train |' not in out  # Only the chosen step.
