r"""Flow of solution procedure (Yim et al., CVPR 2017) on the seed protocol.

The seed experiment (experiments/seed.py) with the strong teacher (bn_cnn,
as in the `strong` variant) and the distil stage's loss replaced by
CE(labels) + 1 * FSP: the student's FSP matrix of conv1 -> conv2 (16 x 32;
the 14x14 conv1 map average-pooled to conv2's 7x7) matched to the
teacher's of block1 -> block2 (16 x 32, the same pooling). FSP needs the
same channel counts in both networks, which the seed teacher's conv1, conv2
(64, 256) do not have: whatever the variants, the teacher here is bn_cnn.
As a joint term, not the paper's separate first phase (see
kd_jax/methods/fsp.py). Teacher and scratch stages are the strong seed's;
the teacher runs inside every distil step.

Run (about as long as experiments/seed.py:strong):
  python run.py --config=experiments/fsp.py --workdir=runs/fsp
Variants as in seed.py: experiments/fsp.py:quick, :mnist (strong is
implied; mlp is refused: its student has no feature maps).
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The strong seed config with the distil stage's method set to fsp."""
  variants = [v for v in (arg or '').split(',') if v]
  if 'mlp' in variants:
    raise ValueError('experiments/fsp.py: variant mlp: FSP matrices need '
                     'the feature maps of a CNN student; use the seed '
                     'student (no mlp)')
  config = seed.get_config(','.join(variants + ['strong']))
  config.name = config.name.replace('_strong', '')
  # CE + 1 * FSP (the record's defaults: conv1,conv2 -> block1,block2).
  return seed.with_method(config, 'fsp', ce={'weight': 1.0}, fsp={
      'student_layers': 'conv1,conv2', 'teacher_layers': 'block1,block2'})
