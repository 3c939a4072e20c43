r"""Activation boundaries (Heo et al., AAAI 2019) on the seed protocol.

The seed experiment (experiments/seed.py) with the strong teacher (bn_cnn,
as in the `strong` variant) and AB's two stages before the scratch one:
  ab_init  the student's feature layers (every parameter but its
           classifier) learn the teacher's activation boundaries: the
           student's conv1 and conv2 outputs (14x14x16 and 7x7x32, before
           any activation) against the teacher's block1_preact and
           block2_preact (the same shapes, so the connectors are the
           identity), by the alternative loss with margin 1, levels
           weighted 1/2 and 1, times 3/1000 (RepDistiller's ABLoss).
  distill  from those parameters, CE(labels) alone, as RepDistiller runs
           AB (`-a 0`, no AB term after the initialisation).
The initialisation runs 1/8 of the student's epochs, at least 1
(RepDistiller's init_epochs: 30 of its 240), with the student's optimizer
at its base learning rate, held constant. Teacher and scratch stages are
the strong seed's; the teacher runs inside every step of the
initialisation (features cannot come from the logit cache); the distil
stage only logs its agreement with the teacher's cached logits.

Run (a little longer than experiments/seed.py:strong):
  python run.py --config=experiments/ab.py --workdir=runs/ab
Variants as in seed.py: experiments/ab.py:quick, :mnist (strong is
implied; mlp is refused: its student has no feature maps).
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The strong seed config with the distil stage's method set to ab."""
  variants = [v for v in (arg or '').split(',') if v]
  if 'mlp' in variants:
    raise ValueError('experiments/ab.py: variant mlp: AB needs the pre-ReLU '
                     'feature maps of a CNN student; use the seed student '
                     '(no mlp)')
  config = seed.get_config(','.join(variants + ['strong']))
  config.name = config.name.replace('_strong', '')
  # CE alone after the initialisation (the record's terms); the record's
  # layers (conv1,conv2 -> block1_preact,block2_preact) and margin 1; the
  # initialisation for RepDistiller's share of the student's epochs.
  return seed.with_method(config, 'ab', ce={'weight': 1.0}, ab={
      'student_layers': 'conv1,conv2',
      'teacher_layers': 'block1_preact,block2_preact',
      'init_epochs': max(1, config.student.epochs // 8)})
