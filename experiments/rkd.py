r"""Relational KD (Park et al., CVPR 2019) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + RKD (distance 25, angle 50) on the flattened
conv2 outputs, the seed CNNs' penultimate features. Teacher and scratch stages are the seed's; the teacher
runs inside every distil step (features cannot come from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/rkd.py --workdir=runs/rkd
Variants as in seed.py: experiments/rkd.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to rkd."""
  return seed.with_method(seed.get_config(arg), 'rkd', feature_weight=1.0)
