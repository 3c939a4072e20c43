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
  # The weight CRD's reference code (RepDistiller) uses with this form.
  return seed.with_method(seed.get_config(arg), 'at', feature_weight=1000.0)
