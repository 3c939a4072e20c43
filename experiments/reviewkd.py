r"""Knowledge review (Chen et al., CVPR 2021) on the seed protocol.

The seed experiment (experiments/seed.py) with the distil stage's loss
replaced by CE(labels) + 1 * ReviewKD of the student's conv1, conv2 (14x14x16,
7x7x32) and the teacher's conv1, conv2 (14x14x64, 7x7x256; bn_cnn's block1,
block2 with the strong variant): a trained review module fuses the
student's conv2 into its conv1 (attention based fusion at min(512, 32) = 32
channels) and maps each level to the teacher's channels, matched by the
hierarchical context loss (MSE of the maps and of their 4x4, 2x2, 1x1
average pools). Without the authors' 20-epoch warm-up, which was tuned for
240 epochs: over this 3-epoch stage it would keep the term at 1/20 .. 3/20.
The module trains with the student's parameters (saved in its checkpoints,
left out of its parameter count). Teacher and scratch stages are the
seed's; the teacher runs inside every distil step (features cannot come
from the logit cache).

Run (a few minutes on 2 CPU cores):
  python run.py --config=experiments/reviewkd.py --workdir=runs/reviewkd
Variants as in seed.py: experiments/reviewkd.py:quick, :strong, :mnist (mlp
is refused: its student has no feature maps).
"""

import ml_collections

from experiments import seed

# The teacher layers paired with the seed student's conv1, conv2 (14x14 and
# 7x7 maps in both teachers).
TEACHER_LAYERS = {'seed_teacher_cnn': 'conv1,conv2', 'bn_cnn': 'block1,block2'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with the distil stage's method set to reviewkd."""
  if 'mlp' in (arg or '').split(','):
    raise ValueError('experiments/reviewkd.py: variant mlp: ReviewKD fuses '
                     'the feature maps of a CNN student; use the seed student '
                     '(no mlp)')
  config = seed.get_config(arg)
  # CE + 1 * ReviewKD (the record's default weight, mdistiller's), no
  # warm-up.
  return seed.with_method(config, 'reviewkd', ce={'weight': 1.0}, reviewkd={
      'student_layers': 'conv1,conv2',
      'teacher_layers': TEACHER_LAYERS[config.teacher.model],
      'warmup_epochs': 0})
