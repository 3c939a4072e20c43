r"""Relational KD (Park et al., CVPR 2019) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + RKD (distance 25, angle 50) on the flattened conv2
outputs, the seed CNNs' penultimate features. Teacher and scratch stages are
the seed's; the teacher runs inside every distil step (features cannot come
from the logit cache).

Slow with these layers: the angle term costs O(B^3 * D) and the seed
teacher's flattened conv2 output has D = 12,544, so the distil stage runs at
about 0.37 s/step here (~17 minutes for 3 epochs). A Gram-matrix form of
the angles (O(B^2 * D + B^3)) would remove most of that.

Run:
  python run.py --config=experiments/rkd.py --workdir=runs/rkd
Variants as in seed.py: experiments/rkd.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to rkd."""
  config = seed.get_config(arg)
  return seed.with_method(config, 'rkd', ce={'weight': 1.0},
                          rkd=seed.feature_layers(config))
