r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + w * PKT of the flattened conv2 outputs. Teacher and scratch stages are the seed's; the teacher
runs inside every distil step (features cannot come from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/pkt.py --workdir=runs/pkt
Variants as in seed.py: experiments/pkt.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to pkt."""
  config = seed.get_config(arg)
  # CE + (30000 / 64) * PKT: the record's default weight, RepDistiller's
  # 30000 rescaled to kd_jax's mean over rows (see kd_jax/methods/pkt.py).
  return seed.with_method(config, 'pkt', ce={'weight': 1.0},
                          pkt=seed.feature_layers(config))
