r"""Similarity-preserving KD (Tung & Mori, ICCV 2019) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 3000 * SP of the conv2 outputs: the batch's
row-normalised Gram matrices of the flattened activations. Teacher and
scratch stages are the seed's; the teacher runs inside every distil step
(features cannot come from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/sp.py --workdir=runs/sp
Variants as in seed.py: experiments/sp.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to sp."""
  config = seed.get_config(arg)
  # CE + 3000 * SP (the record's default weight, RepDistiller's).
  return seed.with_method(config, 'sp', ce={'weight': 1.0},
                          sp=seed.feature_layers(config))
