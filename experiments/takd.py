r"""Teacher assistant KD (Mirzadeh et al., AAAI 2020) on the seed protocol.

A teacher assistant of intermediate size (seed_assistant_cnn: 32 and 96
channels, 75,114 params, between the teacher's 273,802 and the student's
20,490) is distilled from the seed teacher, and the student from the
assistant, both with the seed's KD settings (alpha = 0.1, T = 10) and 3
epochs. Stages: teacher -> assistant1 -> distill, then scratch. More
assistants: --config.distill.takd.assistant_models=seed_assistant_cnn,<smaller>.

Run (about 3.5 minutes on 2 CPU cores):
  python run.py --config=experiments/takd.py --workdir=runs/takd
Variants as in seed.py: experiments/takd.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config distilled through one teacher assistant."""
  return seed.with_method(seed.get_config(arg), 'takd',
                          takd={'assistant_models': 'seed_assistant_cnn'})
