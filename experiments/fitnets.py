r"""FitNets (Romero et al., ICLR 2015) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 100 * hint loss: a learned regressor (a 1x1
convolution here, since both conv2 maps are 7x7) maps the student's conv2
output (32 channels) to the teacher's (256 channels), and the mean squared
error to the teacher's conv2 output is the hint. The regressor's parameters
train with the student's (they are saved in its checkpoints and left out of
its parameter count). As in CRD's reference code (RepDistiller), hint and
label losses are trained jointly, not in the paper's two separate phases.
Teacher and scratch stages are the seed's; the teacher runs inside every
distil step.

Run (about 3 minutes on 2 CPU cores):
  python run.py --config=experiments/fitnets.py --workdir=runs/fitnets
Variants as in seed.py: experiments/fitnets.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to fitnets."""
  config = seed.get_config(arg)
  # CE + 100 * hint (the record's default weight: RepDistiller's, whose
  # hint loss is also a mean).
  return seed.with_method(config, 'fitnets', ce={'weight': 1.0},
                          fitnets=seed.feature_layers(config))
