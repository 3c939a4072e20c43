r"""Factor transfer (Kim et al., NeurIPS 2018) on the seed protocol.

The seed experiment (experiments/seed.py) with the strong teacher (bn_cnn,
as in the `strong` variant) and FT's two stages before the scratch one:
  paraphraser  the paraphraser (an autoencoder: three 3x3 convolutions from
               the teacher's block2 map, 7x7x32 after its ReLU, to a 16-
               channel factor, three transposed ones back) learns to
               reconstruct that map (mean squared error) for
               `paraphraser_epochs`; the teacher and the student stay as
               they are, only the paraphraser trains.
  distill      CE(labels) + 200 * FT: the student's conv2 output (7x7x32)
               through a trained translator (three 3x3 convolutions with
               batch norm, to 16 channels) against the trained
               paraphraser's factor of the teacher's block2, compared as
               L2-normalised channel means of the squares, by L1 distance
               (RepDistiller's FactorTransfer and `-b 200`).
The paraphraser's stage runs 1/8 of the student's epochs, at least 1
(RepDistiller's init_epochs: 30 of its 240), with the student's optimizer
at its base learning rate, held constant. The translator trains with the
student's parameters (saved in its checkpoints, left out of its parameter
count). Teacher and scratch stages are the strong seed's; the teacher runs
inside every step of both stages (features cannot come from the logit
cache).

Run (a little longer than experiments/seed.py:strong):
  python run.py --config=experiments/ft.py --workdir=runs/ft
Variants as in seed.py: experiments/ft.py:quick, :mnist (strong is
implied; mlp is refused: its student has no feature maps).
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The strong seed config with the distil stage's method set to ft."""
  variants = [v for v in (arg or '').split(',') if v]
  if 'mlp' in variants:
    raise ValueError('experiments/ft.py: variant mlp: FT needs the feature '
                     'maps of a CNN student; use the seed student (no mlp)')
  config = seed.get_config(','.join(variants + ['strong']))
  config.name = config.name.replace('_strong', '')
  # CE + 200 * FT (the record's defaults: conv2 -> block2, rate 0.5); the
  # paraphraser for RepDistiller's share of the student's epochs, 30 / 240.
  return seed.with_method(config, 'ft', ce={'weight': 1.0}, ft={
      'student_layers': 'conv2', 'teacher_layers': 'block2',
      'paraphraser_epochs': max(1, config.student.epochs // 8)})
