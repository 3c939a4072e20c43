r"""Overhaul of feature distillation (Heo et al., ICCV 2019) on the seed
protocol.

The seed experiment (experiments/seed.py) with the strong teacher (bn_cnn,
as in the `strong` variant) and the distil stage's loss replaced by
CE(labels) + 1e-3 * OFD (the authors' `loss_distill.sum() / batch_size /
1000`): the student's conv1 and conv2 outputs (14x14x16 and 7x7x32, before
any activation), each through a trained connector (conv1x1 + batch norm),
matched by the partial L2 distance to the teacher's block1_preact and
block2_preact (the same sizes: each block's max-pooled last batch norm,
before its ReLU) after the margin ReLU, levels weighted 1/2 and 1. The
margins come from the teacher's batch norms before those ReLUs, which the
seed teacher (no batch norm) does not have: whatever the variants, the
teacher here is bn_cnn. The connectors train with the student's parameters
(saved in its checkpoints, left out of its parameter count). Teacher and
scratch stages are the strong seed's; the teacher runs inside every
distil step (features cannot come from the logit cache).

Run (about as long as experiments/seed.py:strong):
  python run.py --config=experiments/ofd.py --workdir=runs/ofd
Variants as in seed.py: experiments/ofd.py:quick, :mnist (strong is
implied; mlp is refused: its student has no feature maps).
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The strong seed config with the distil stage's method set to ofd."""
  variants = [v for v in (arg or '').split(',') if v]
  if 'mlp' in variants:
    raise ValueError('experiments/ofd.py: variant mlp: OFD needs the feature '
                     'maps of a CNN student; use the seed student (no mlp)')
  config = seed.get_config(','.join(variants + ['strong']))
  config.name = config.name.replace('_strong', '')
  # CE + 1e-3 * OFD (the record's defaults: conv1,conv2 -> block1_preact,
  # block2_preact).
  return seed.with_method(config, 'ofd', ce={'weight': 1.0}, ofd={
      'student_layers': 'conv1,conv2',
      'teacher_layers': 'block1_preact,block2_preact'})
