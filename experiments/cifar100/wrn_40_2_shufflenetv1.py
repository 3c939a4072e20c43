r"""CIFAR-100, wrn_40_2 -> shufflenetv1: a pair of the CRD benchmark table.

The recipe (240 epochs, SGD, crop + flip) is in experiments/cifar100/common.py.
  python run.py --config=experiments/cifar100/wrn_40_2_shufflenetv1.py --workdir=runs/c100
  python run.py --config=experiments/cifar100/wrn_40_2_shufflenetv1.py:dkd  # any method
  python run.py --config=experiments/cifar100/wrn_40_2_shufflenetv1.py:quick  # smoke test
"""

import ml_collections

from experiments.cifar100 import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """wrn_40_2 -> shufflenetv1 with the method named in `arg` (default kd)."""
  return common.get_config('wrn_40_2', 'shufflenetv1', arg)
