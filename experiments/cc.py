r"""Correlation congruence (Peng et al., ICCV 2019) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 0.02 * CC of the flattened conv2 outputs: the
batch's correlation matrices under a 2nd-order Taylor expansion of the
Gaussian RBF kernel (gamma 0.4). The weight is RepDistiller's, set for a
different loss (see kd_jax/methods/cc.py); tune `distill.cc.weight`.
Teacher and scratch stages are the seed's; the teacher runs inside every
distil step (features cannot come from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/cc.py --workdir=runs/cc
Variants as in seed.py: experiments/cc.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to cc."""
  config = seed.get_config(arg)
  # CE + 0.02 * CC (the record's defaults; see kd_jax/methods/cc.py).
  return seed.with_method(config, 'cc', ce={'weight': 1.0},
                          cc=seed.feature_layers(config))
