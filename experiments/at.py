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
  # CE + 1000 * AT (the record's default weight, RepDistiller's).
  return seed.with_method(config, 'at', ce={'weight': 1.0},
                          at=seed.feature_layers(config))
