r"""CIFAR-100, resnet56 -> resnet20: a pair of the CRD benchmark table.

The recipe (240 epochs, SGD, crop + flip) is in experiments/cifar100/common.py.
  python run.py --config=experiments/cifar100/resnet56_resnet20.py --workdir=runs/c100
  python run.py --config=experiments/cifar100/resnet56_resnet20.py:dkd  # any method
  python run.py --config=experiments/cifar100/resnet56_resnet20.py:quick  # smoke test
"""

import ml_collections

from experiments.cifar100 import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """resnet56 -> resnet20 with the method named in `arg` (default kd)."""
  return common.get_config('resnet56', 'resnet20', arg)
