r"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 1000 * AT of the conv2 attention maps. Teacher and scratch stages are the seed's; the teacher
runs inside every distil step (features cannot come from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/at.py --workdir=runs/at
Variants as in seed.py: experiments/at.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to at."""
  config = seed.get_config(arg)
  config.name = config.name.replace('seed', 'at', 1)
  config.distill.method = 'at'
  # alpha = 1: cross-entropy with the labels plus the weighted feature loss,
  # no logit distillation, as in the paper.
  config.distill.alpha = 1.0
  config.distill.features.student_layers = 'conv2'
  config.distill.features.teacher_layers = 'conv2'
  # The weight CRD's reference code (RepDistiller) uses with this form.
  config.distill.features.weight = 1000.0
  return config
