r"""CIFAR-100, resnet32x4 -> shufflenetv2: a pair of the CRD benchmark table.

The recipe (240 epochs, SGD, crop + flip) is in experiments/cifar100/common.py.
  python run.py --config=experiments/cifar100/resnet32x4_shufflenetv2.py --workdir=runs/c100
  python run.py --config=experiments/cifar100/resnet32x4_shufflenetv2.py:dkd  # any method
  python run.py --config=experiments/cifar100/resnet32x4_shufflenetv2.py:quick  # smoke test
"""

import ml_collections

from experiments.cifar100 import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """resnet32x4 -> shufflenetv2 with the method named in `arg` (default kd)."""
  return common.get_config('resnet32x4', 'shufflenetv2', arg)
