"""Shared pieces of the benchmarks: timing, XLA cost analysis, machine peak."""

from collections.abc import Callable
import dataclasses
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kd_jax import cli  # pylint: disable=g-import-not-at-top
from kd_jax import models  # pylint: disable=g-import-not-at-top

# Every benchmark measures XLA:CPU as the entry points configure it
# (convolutions in Eigen). To time YNNPACK's convolutions instead, run with
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution.
cli.use_eigen_cpu_convolutions()


class FlaxPoolSeedCNN(models.SeedCNN):
  """The seed CNN with `flax.linen.max_pool`, the "before" of the pool rewrite."""

  def pool(self, x):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    return nn.max_pool(x, (2, 2), strides=(1, 1), padding='SAME')


@dataclasses.dataclass
class Timing:
  """Per-call wall times in seconds (after the first, compiling, call), and
  XLA's FLOPs of one call of the program compiled for them."""
  compile_s: float
  times: list[float]
  flops: float = float('nan')

  @property
  def median_ms(self) -> float:
    return 1e3 * statistics.median(self.times)

  @property
  def min_ms(self) -> float:
    return 1e3 * min(self.times)

  @property
  def max_ms(self) -> float:
    return 1e3 * max(self.times)


def flops_of(compiled) -> float:
  """FLOPs of one call of a compiled computation, by XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def time_calls(fn: Callable, carry, *args, repeats: int, warmup: int = 3,
               threads_carry: bool = True) -> Timing:
  """Compiles `fn` (jitted) once and times `repeats` calls after `warmup`
  calls; the FLOPs come from the same compiled program.

  With `threads_carry`, `fn` returns `(carry, out)` and the new carry is fed
  to the next call (a donated train state); otherwise `fn(carry, *args)` is
  called on the same inputs each time.
  """
  start = time.perf_counter()
  compiled = fn.lower(carry, *args).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    out = compiled(carry, *args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if threads_carry:
      carry = out[0]
  return Timing(compile_s, times, flops_of(compiled))


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Median GFLOP/s of an n x n x n float32 matmul through XLA on this machine."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  timing = time_calls(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats,
                      threads_carry=False)
  return 2 * n**3 / (timing.median_ms * 1e-3) / 1e9


def machine_line() -> str:
  """One line describing where the numbers were measured."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return (f'{time.strftime("%Y-%m-%d")}, {cpu}, {os.cpu_count()} cores, '
          f'jax {jax.__version__} on {jax.devices()[0].platform}, '
          f'XLA_FLAGS="{os.environ.get("XLA_FLAGS", "")}"')


def random_batch(size: int, num_classes: int = 10,
                 seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      'image': rng.uniform(size=(size, 28, 28, 1)).astype(np.float32),
      'label': rng.integers(0, num_classes, size=size).astype(np.int32),
  }
