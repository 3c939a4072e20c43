r"""Ensemble distillation: one student from three seed teachers.

The teacher stage trains three seed teachers (teacher, teacher2, teacher3)
that differ only in initialisation; the student is distilled from the
equal-weight mixture of their tempered distributions (alpha = 0.1, T = 10,
as the seed) and the ensemble's own test accuracy (mean softmax) is
reported beside each teacher's. To distil from teachers trained elsewhere
instead: --config.stages=distill,scratch
--config.teacher.checkpoint=DIR1,DIR2,... (their weights:
--config.distill.multi_teacher.teacher_weights=...).

Run (about 7 minutes on 2 CPU cores):
  python run.py --config=experiments/multi_teacher.py --workdir=runs/multi_teacher
Variants as in seed.py: experiments/multi_teacher.py:quick, :mnist.
"""

import ml_collections

from experiments import seed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed config with three teachers and multi-teacher distillation."""
  config = seed.get_config(arg)
  # The seed's alpha = 0.1 and T = 10 without T^2.
  return seed.with_method(
      config, 'multi_teacher', multi_teacher={
          'weight': config.distill.kd.weight,
          'temperature': config.distill.kd.temperature,
          't2_scaling': config.distill.kd.t2_scaling, 'num_teachers': 3})
