r"""Born-again networks (Furlanello et al., ICML 2018) on Fashion-MNIST.

Teacher and students share one architecture, the seed student CNN, and one
budget (3 epochs each). Generation 1 is distilled from the teacher,
generation 2 from generation 1, and generation 3 (the distilled student)
from generation 2, with the paper's objective: cross-entropy to the previous
generation's predictions only (the kd term alone, T = 1). The scratch stage trains
the same network on labels, with generation 3's initialisation and data
order.

Run (about 1 minute on 2 CPU cores):
  python run.py --config=experiments/born_again.py --workdir=runs/born_again
Variants as in seed.py: experiments/born_again.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Three born-again generations of the seed student."""
  config = seed.with_method(
      seed.get_config(arg), 'born_again', born_again={'generations': 3},
      kd={'weight': 1.0, 'temperature': 1.0, 't2_scaling': False})
  config.teacher.model = config.student.model
  config.teacher.epochs = config.student.epochs
  return config
