r"""Neuron selectivity transfer (Huang & Wang, 2017) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 50 * NST of the conv2 outputs: the MMD (polynomial
kernel, d = 2, c = 0) between the student's and teacher's channel
distributions over the 7x7 positions. Teacher and scratch stages are the
seed's; the teacher runs inside every distil step (features cannot come
from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/nst.py --workdir=runs/nst
Variants as in seed.py: experiments/nst.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to nst."""
  config = seed.get_config(arg)
  # CE + 50 * NST (the record's default weight, RepDistiller's).
  return seed.with_method(config, 'nst', ce={'weight': 1.0},
                          nst=seed.feature_layers(config))
