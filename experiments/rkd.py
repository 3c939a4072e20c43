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
  config = seed.get_config(arg)
  config.name = config.name.replace('seed', 'rkd', 1)
  config.distill.method = 'rkd'
  # alpha = 1: cross-entropy with the labels plus the weighted feature loss,
  # no logit distillation, as in the paper.
  config.distill.alpha = 1.0
  config.distill.features.student_layers = 'conv2'
  config.distill.features.teacher_layers = 'conv2'
  config.distill.features.weight = 1.0
  return config
