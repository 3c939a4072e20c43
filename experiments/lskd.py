r"""Logit standardisation (Sun et al., CVPR 2024) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by the paper's CIFAR-100 KD + logit standardisation: 0.1 *
CE(labels) + 9 * T^2 * KL between the softmaxes of the z-scored teacher and
student logits at the base temperature T = 2 (the official code's
--logit-stand --base-temp 2 --kd-weight 9 with its KD.LOSS.CE_WEIGHT 0.1).
It reads logits only: the teacher's logits are cached as for KD. Teacher
and scratch stages are the seed's.

Run (about as long as the seed experiment):
  python run.py --config=experiments/lskd.py --workdir=runs/lskd
Variants as in seed.py: experiments/lskd.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to lskd."""
  # 0.1 CE + 9 LS-KD at T = 2 (the record's defaults; see
  # kd_jax/methods/lskd.py for where they come from).
  return seed.with_method(seed.get_config(arg), 'lskd', ce={'weight': 0.1})
