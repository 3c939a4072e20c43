r"""Decoupled KD (Zhao et al., CVPR 2022) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by DKD: CE(labels) + (tckd_weight * TCKD + nckd_weight * NCKD) * T^2
with the paper's tckd_weight (alpha) = 1, nckd_weight (beta) = 8, T = 4, and
no warm-up. Teacher and scratch stages are the seed's.

Run (about 2.5 minutes on 2 CPU cores, like the seed experiment):
  python run.py --config=experiments/dkd.py --workdir=runs/dkd
Variants as in seed.py: experiments/dkd.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to DKD."""
  # The paper's CE + DKD (tckd_weight 1, nckd_weight 8, T = 4), without the
  # reference code's 20-epoch warm-up, which was tuned for 240 epochs: over
  # this 3-epoch stage it would keep the DKD term at 1/20 .. 3/20.
  return seed.with_method(seed.get_config(arg), 'dkd', ce={'weight': 1.0},
                          dkd={'warmup_epochs': 0})
