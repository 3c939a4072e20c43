r"""Contrastive representation distillation (Tian et al., ICLR 2020) on the
seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 0.8 * CRD: the student's and the teacher's
penultimate features (the seed CNNs' conv2 maps, flattened; bn_cnn's
256-unit embedding with the `strong` variant), each through a trained
linear head to 128-dimensional unit vectors, contrasted with NCE against a
memory bank of both networks' embeddings of every training example: the
example itself and 16,384 examples of other classes, T = 0.07, bank
momentum 0.5 (the authors' CIFAR-100 settings). The heads train with the
student's parameters (saved in its checkpoints, left out of its parameter
count); the bank is part of the distil stage's train state (checkpointed;
a resumed run continues exactly). The teacher runs inside every distil
step (features cannot come from the logit cache).

With `quick` (1,792 training examples) the negatives are 1,024: an example
has only ~1,600 examples of other classes to draw from.

Run (drawing the negatives and scoring them adds about 0.23 s to each
distil step of 64 examples on a 2-core CPU; see benchmarks/crd_step.py):
  python run.py --config=experiments/crd.py --workdir=runs/crd
Variants as in seed.py: experiments/crd.py:quick, :strong, :mnist.
"""

import ml_collections

from experiments import seed

# The penultimate features of each seed teacher (the student's is conv2).
_TEACHER_EMBEDDING = {'seed_teacher_cnn': 'conv2', 'bn_cnn': 'embedding'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to crd."""
  config = seed.get_config(arg)
  crd = {'student_layers': 'conv2',
         'teacher_layers': _TEACHER_EMBEDDING[config.teacher.model]}
  if 'quick' in (arg or '').split(','):
    crd['nce_k'] = 1024
  # CE + 0.8 * CRD (RepDistiller's -r 1 -a 0 -b 0.8).
  return seed.with_method(config, 'crd', ce={'weight': 1.0}, crd=crd)
