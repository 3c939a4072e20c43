r"""Arithmetic of the CIFAR-100 benchmark, and the GPU hours it implies.

  python benchmarks/cifar_flops.py [--tflops=25]

For each model of the 13 pairs (experiments/cifar100/common.py): the FLOPs
of one SGD train step at batch 64 (32x32x3, 100 classes), from XLA's cost
analysis of the lowered step (nothing is compiled or run). Then, per pair,
the hours of the recipe's three stages (240 epochs of 781 steps each: the
teacher, the KD distil stage = teacher forward + student step, the student
from scratch) at `--tflops` sustained. That is a lower bound: small
networks (resnet20, mobilenetv2, the ShuffleNets) are bound by kernel
launches and memory, not arithmetic, on a GPU; `benchmarks/gpu_check.sh`
measures real images/s where a GPU is available.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import common as bench  # pylint: disable=g-bad-import-order,unused-import
from experiments.cifar100 import common
from kd_jax import models
from kd_jax import train

_TFLOPS = flags.DEFINE_float('tflops', 25.0, 'Sustained TFLOP/s assumed.')

BATCH = 64
STEPS = 240 * (50_000 // BATCH)  # 240 epochs, the last partial batch dropped.


def train_step_gflop(name: str) -> float:
  """GFLOP of one train step of zoo model `name` at batch 64 (XLA's count)."""
  model = models.make_model(name, num_classes=100)
  state = train.create_train_state(model, jax.random.PRNGKey(0), (32, 32, 3))
  batch = {'image': jnp.zeros((BATCH, 32, 32, 3)),
           'label': jnp.zeros((BATCH,), jnp.int32)}
  cost = jax.jit(train.train_step).lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops'] / 1e9


def main(argv):
  del argv
  names = sorted({name for pair in common.PAIRS for name in pair})
  gflop = {name: train_step_gflop(name) for name in names}
  rate = _TFLOPS.value * 1e3  # GFLOP/s.

  def hours(gflop_per_step):
    return gflop_per_step * STEPS / rate / 3600

  print(f'| pair | teacher GFLOP/step | student GFLOP/step | teacher | '
        f'KD distil | scratch | one seed |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for teacher, student in common.PAIRS:
    # A forward pass is about a third of a train step's arithmetic.
    stages = (hours(gflop[teacher]), hours(gflop[teacher] / 3 + gflop[student]),
              hours(gflop[student]))
    print(f'| {teacher} → {student} | {gflop[teacher]:.1f} | '
          f'{gflop[student]:.1f} | ' + ' | '.join(f'{h:.2f} h' for h in stages)
          + f' | {sum(stages):.2f} h |')
  print(f'\nHours at {_TFLOPS.value:g} TFLOP/s sustained, {STEPS:,} steps '
        'per 240-epoch stage; a lower bound (see the docstring).')


if __name__ == '__main__':
  app.run(main)
