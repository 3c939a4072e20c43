"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", 2015).

The term is the soft loss `T^2 * KL(softmax(teacher / T) || softmax(student
/ T))` (`kd_jax.losses.distillation_loss`); the paper's objective adds the
cross-entropy with the labels, so the method's terms are `ce, kd`. The
tutorial's `alpha * CE + (1 - alpha) * soft` is `ce.weight = alpha`,
`kd.weight = 1 - alpha` (experiments/seed.py). The defaults are the CIFAR-100
benchmark's (RepDistiller, mdistiller: CE 0.1, KD 0.9, T = 4). With
`logit_standardization` on, both networks' logits are z-scored first (Sun et
al., CVPR 2024; kd_jax/methods/lskd.py holds the paper's setting).
"""

import ml_collections

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common


def _term(section: ml_collections.ConfigDict) -> objective.TermFn:
  temperature, t2_scaling, form = (section.temperature, section.t2_scaling,
                                   section.form)
  standardize = section.logit_standardization

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    weights = objective.batch_weights(batch)
    student_logits, teacher_logits = student.logits, teacher.logits
    if standardize:
      student_logits = common.standardized(student_logits, weights)
      teacher_logits = common.standardized(teacher_logits, weights)
    return losses.distillation_loss(
        student_logits, teacher_logits, temperature, t2_scaling=t2_scaling,
        form=form, weights=weights), {}
  return term


METHOD = objective.Method(
    name='kd',
    reference='Hinton et al., 2015',
    description="the teacher's temperature-softened class probabilities",
    settings={
        'weight': objective.term_weight(0.9),
        'temperature': objective.Setting(
            4.0, fields.positive_float(),
            'Softmax temperature T of the soft term. Number > 0.'),
        't2_scaling': objective.Setting(
            True, fields.boolean(),
            'Multiply the soft term by T**2 (Hinton et al.) so that its '
            'gradients keep their scale as T changes.'),
        'form': objective.Setting(
            'kl', fields.one_of(losses.DISTILLATION_FORMS),
            'kl = KL(p_teacher^T || p_student^T); cross_entropy = '
            'H(p_teacher^T, p_student^T) (larger by the teacher\'s entropy, '
            'same gradient).'),
        'logit_standardization': common.logit_standardization_setting(),
    },
    loss=_term,
    terms=(ce.TERM.name, 'kd'),
)
