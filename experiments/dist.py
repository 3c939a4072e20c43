r"""DIST (Huang et al., NeurIPS 2022) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + T^2 * (2 * inter + 2 * intra) at T = 4: one minus
the mean Pearson correlation of the student's and teacher's tempered class
probabilities, per example (inter-class) and per class over the batch
(intra-class), the official CIFAR-100 setting. It reads logits only: the
teacher's logits are cached as for KD. Teacher and scratch stages are the
seed's.

Run (about as long as the seed experiment):
  python run.py --config=experiments/dist.py --workdir=runs/dist
Variants as in seed.py: experiments/dist.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to dist."""
  # CE + DIST at the record's defaults (beta = gamma = 2, T = 4; see
  # kd_jax/methods/dist.py for where they come from).
  return seed.with_method(seed.get_config(arg), 'dist', ce={'weight': 1.0})
