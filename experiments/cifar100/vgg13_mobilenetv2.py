r"""CIFAR-100, vgg13 -> mobilenetv2: a pair of the CRD benchmark table.

The recipe (240 epochs, SGD, crop + flip) is in experiments/cifar100/common.py.
  python run.py --config=experiments/cifar100/vgg13_mobilenetv2.py --workdir=runs/c100
  python run.py --config=experiments/cifar100/vgg13_mobilenetv2.py:dkd  # any method
  python run.py --config=experiments/cifar100/vgg13_mobilenetv2.py:quick  # smoke test
"""

import ml_collections

from experiments.cifar100 import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """vgg13 -> mobilenetv2 with the method named in `arg` (default kd)."""
  return common.get_config('vgg13', 'mobilenetv2', arg)
