r"""Logit regression (Ba & Caruana, NeurIPS 2014) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 1/2 ||student logits - teacher logits||^2: no
temperature, the teacher's logits cached as for KD. Teacher and scratch
stages are the seed's.

Run (about as long as the seed experiment):
  python run.py --config=experiments/logit_l2.py --workdir=runs/logit_l2
Variants as in seed.py: experiments/logit_l2.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to logit_l2."""
  return seed.with_method(seed.get_config(arg), 'logit_l2',
                          ce={'weight': 1.0})
