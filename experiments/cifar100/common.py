r"""The CIFAR-100 benchmark recipe of the KD literature, for one pair.

The CRD paper's table (Tian et al., ICLR 2020), re-used by DKD, DIST,
ReviewKD and logit standardisation, trains each teacher and student as
RepDistiller's `train_teacher.py` / `train_student.py` do:

  * CIFAR-100, all 50,000 training images (no validation hold-out), the
    10,000 test images; per-channel mean/std normalisation;
  * random crop after 4-pixel zero padding and horizontal flip, here inside
    the compiled steps (kd_jax/augment.py), the teacher run on each
    augmented batch in the distil stage;
  * batch 64, 240 epochs, SGD with momentum 0.9 and weight decay 5e-4,
    learning rate 0.05 (0.01 for MobileNetV2 and the ShuffleNets) times 0.1
    at epochs 150, 180 and 210;
  * KD: 0.1 CE + 0.9 KL at T = 4 with T^2; other methods CE (weight 1) plus
    the method's term at its paper's weight (RepDistiller's `-r 1 -b beta`).

Unlike most papers' code, the reported accuracy is the last epoch's, never
the best test epoch's.

Variants, comma-separated after the colon: `quick` (a 512/512-image slice,
one epoch per stage, the python loop: a smoke test that runs on a CPU) and
a method name (kd_jax.methods.METHODS, default kd), e.g.
  python run.py --config=experiments/cifar100/resnet56_resnet20.py:dkd
"""

import ml_collections

from experiments import seed
from kd_jax import fields
from kd_jax import methods
from kd_jax import optimizers
from kd_jax import zoo

# The 13 teacher -> student pairs of the CRD table, in its column order.
PAIRS = (
    ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'),
    ('resnet56', 'resnet20'), ('resnet110', 'resnet20'),
    ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'),
    ('vgg13', 'vgg8'), ('vgg13', 'mobilenetv2'), ('resnet50', 'mobilenetv2'),
    ('resnet50', 'vgg8'), ('resnet32x4', 'shufflenetv1'),
    ('resnet32x4', 'shufflenetv2'), ('wrn_40_2', 'shufflenetv1'),
)
# RepDistiller's learning rate for these students (and as teachers).
SMALL_LR_MODELS = ('mobilenetv2', 'shufflenetv1', 'shufflenetv2')
# Methods that are not a teacher -> student pair (assistants, several
# teachers, a teacher of the student's own architecture) have no recipe
# here.
UNSUPPORTED = ('takd', 'multi_teacher', 'born_again')


def sgd_recipe(model: str) -> ml_collections.ConfigDict:
  """RepDistiller's optimiser for `model`: SGD, momentum 0.9, weight decay
  5e-4, lr 0.05 (0.01 for SMALL_LR_MODELS) x 0.1 at epochs 150, 180, 210."""
  return optimizers.default_section(
      name='sgd', learning_rate=0.01 if model in SMALL_LR_MODELS else 0.05,
      schedule='step', decay_epochs='150,180,210', decay_rate=0.1,
      momentum=0.9, weight_decay=5e-4)


# The method of a pair's config without a method variant.
DEFAULT_METHOD = 'kd'


def _method_sections(method: str, teacher: str, student: str) -> dict:
  """The distil sections of `method` on the pair: KD as RepDistiller's
  `-r 0.1 -a 0.9`, LS-KD as its official code (CE 0.1), every other method
  CE (weight 1) plus its term at its record's weight, its layers from the
  record (`zoo_settings`)."""
  if method == 'kd':
    return {'ce': {'weight': 0.1},
            'kd': {'weight': 0.9, 'temperature': 4.0, 't2_scaling': True}}
  if method == 'lskd':  # The official KD + LS: 0.1 CE + 9 LS-KD at T = 2.
    return {'ce': {'weight': 0.1}}
  sections = {'ce': {'weight': 1.0}}
  own = methods.METHODS[method].zoo_settings(zoo.feature_names(teacher),
                                             zoo.feature_names(student))
  if own:
    sections[method] = own
  return sections


def get_config(teacher: str, student: str,
               arg: str | None = None) -> ml_collections.ConfigDict:
  """The benchmark config of `teacher` -> `student`; `arg`: variants."""
  variants = fields.parse_list(arg or '')
  chosen = [v for v in variants if v in methods.METHODS]
  unknown = sorted(set(variants) - set(chosen) - {'quick'})
  if unknown or len(chosen) > 1 or set(chosen) & set(UNSUPPORTED):
    raise ValueError(
        f'experiments/cifar100/{teacher}_{student}.py: variants {arg!r}: '
        'expected "quick" and at most one method of '
        f'{", ".join(m for m in methods.METHODS if m not in UNSUPPORTED)}')
  method = chosen[0] if chosen else DEFAULT_METHOD

  config = seed.get_config()
  config.name = f'cifar100_{teacher}_{student}_{method}'
  config.dataset = 'cifar100'
  config.validation_size = 0  # The benchmark trains on all 50,000 images.
  config.eval_batch_size = 250  # Divides the 10,000 test images.
  config.augment.crop_padding, config.augment.flip = 4, True
  # A whole epoch per compiled scan, rolled: the fast choice on GPU/TPU (on
  # CPU, XLA runs convolutions in a loop body far slower; see seed.py).
  config.steps_per_chunk, config.scan_unroll = 0, False
  config.checkpoint_every_steps = 0  # Epoch ends (782 steps).
  for role, model in (('teacher', teacher), ('student', student)):
    config[role].model = model
    config[role].num_classes = 100
    config[role].epochs = 240
    config[role].optimizer = sgd_recipe(model)
  config = seed.with_method(config, method,
                            **_method_sections(method, teacher, student))
  config.name = f'cifar100_{teacher}_{student}_{method}'

  if 'quick' in variants:
    config.name += '_quick'
    config.train_limit, config.test_limit = 512, 500
    config.teacher.epochs = config.student.epochs = 1
    config.teacher.optimizer.decay_epochs = ''
    config.student.optimizer.decay_epochs = ''
    config.teacher.optimizer.schedule = 'constant'
    config.student.optimizer.schedule = 'constant'
    config.loop = 'python'  # One compiled step: quick to compile on a CPU.
  return config
