r"""Hinton et al. (2015)'s MNIST experiment, for users with a network.

The paper's Section 3: a teacher MLP with two hidden layers of 1,200 ReLU
units and dropout (here 0.5 on the hidden layers; the paper also jittered
the inputs by up to two pixels and used dropout on the input), a student MLP
with two hidden layers of 800 units and no regularisation, and distillation
at T = 20. The paper reports 67 test errors for the teacher, 146 for the
student trained alone and 74 for the distilled student.

Differences from the paper, kept on purpose: Adam at 1e-3 with a cosine
schedule instead of SGD with momentum and max-norm constraints; no input
jitter (kd_jax caches the teacher's logits, which needs un-augmented inputs);
60 epochs per stage; 5,000 training images held out for calibration (set
--config.validation_size=0 to train on all 60,000). MNIST comes from TFDS
(downloaded on first use: a network and `pip install tensorflow`), or from
IDX files with --config.data_source=idx --config.data_dir=DIR.

Run (on a GPU, minutes; on 2 CPU cores, about an hour):
  python run.py --config=experiments/hinton_mnist.py
  python run.py --config=experiments/hinton_mnist.py --config.num_seeds=5
Variants as in seed.py (quick for a smoke test).
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Hinton et al.'s MNIST MLPs, T = 20, on MNIST through TFDS."""
  config = seed.get_config(arg)
  quick = 'quick' in (arg or '')
  config.name = config.name.replace('seed', 'hinton_mnist', 1)
  if 'mnist' not in (arg or ''):
    config.name += '_mnist'
  config.dataset, config.data_source = 'mnist', 'tfds'
  config.teacher.model = 'hinton_teacher_mlp'
  config.student.model = 'hinton_student_mlp'
  for model in (config.teacher, config.student):
    model.epochs = 1 if quick else 60
    model.optimizer.schedule = 'cosine'
  config.distill.kd.temperature = 20.0
  config.distill.kd.t2_scaling = True
  return config
