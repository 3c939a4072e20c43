r"""Variational information distillation (Ahn et al., CVPR 2019) on the seed
protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 1 * VID of the conv2 outputs: the teacher's 7x7
map's negative log-likelihood under a Gaussian whose mean a trained
regressor (conv1x1-ReLU-conv1x1-ReLU-conv1x1, 32 -> 256 -> 256 -> 256
channels) predicts from the student's map and whose per-channel variance
is trained too (starting at 5). The regressor and variances train with
the student's parameters (saved in its checkpoints, left out of its
parameter count). Teacher and scratch stages are the seed's; the teacher
runs inside every distil step (features cannot come from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/vid.py --workdir=runs/vid
Variants as in seed.py: experiments/vid.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to vid."""
  config = seed.get_config(arg)
  # CE + 1 * VID (the record's default weight, RepDistiller's).
  return seed.with_method(config, 'vid', ce={'weight': 1.0},
                          vid=seed.feature_layers(config))
