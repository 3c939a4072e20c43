r"""Decoupled KD (Zhao et al., CVPR 2022) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by DKD: CE(labels) + (alpha * TCKD + beta * NCKD) * T^2 with the
paper's alpha = 1, beta = 8, T = 4. Teacher and scratch stages are the seed's.

Run (about 2.5 minutes on 2 CPU cores, like the seed experiment):
  python run.py --config=experiments/dkd.py --workdir=runs/dkd
Variants as in seed.py: experiments/dkd.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to DKD."""
  config = seed.with_method(seed.get_config(arg), 'dkd')
  config.distill.temperature = 4.0
  return config
