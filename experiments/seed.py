r"""The tutorial's protocol: teacher, distilled student, student from scratch.

Train the seed CNN teacher 5 epochs; distil a fresh seed student 3 epochs from
it (alpha = 0.1, T = 10); train an identical student from scratch 3 epochs;
report the three test accuracies. Batch 64, Adam 1e-3, Fashion-MNIST.

The tutorial (a Keras example) computes the soft loss with
`keras.losses.KLDivergence()` on softmax(teacher / T) and softmax(student / T)
and does *not* multiply it by T**2; this config reproduces that with
`distill.kd.t2_scaling = False` (the library's own default is T**2 on, as in
Hinton et al. 2015). Keras also clips probabilities to [1e-7, 1] inside its KL;
we compute the exact KL from log-softmax instead.

Run (about 7 minutes on 2 CPU cores; see README):
  python run.py --config=experiments/seed.py --workdir=runs/seed

Variants, comma-separated after a colon:
  quick   a small slice (2,048 train / 1,024 test), 1 epoch per stage and one
          step per compiled chunk, for smoke tests (about 20 s):
            python run.py --config=experiments/seed.py:quick --workdir=/tmp/x
  mnist   the tutorial's own dataset, MNIST, through TFDS (needs a network the
          first time; with MNIST's IDX files at hand instead, add
          --config.data_source=idx --config.data_dir=DIR):
            python run.py --config=experiments/seed.py:mnist
  strong  a stronger teacher: bn_cnn (batch norm, 420,954 params; 92.4% on
          Fashion-MNIST after its 5 epochs), so that the differences between
          distillation methods show (about 4.5 minutes):
            python run.py --config=experiments/seed.py:strong
  mlp     Hinton et al.'s MLP student (800-800 ReLU, 1,276,810 params) for
          10 epochs, T = 4 with T^2 scaling: with the strong teacher
          (strong,mlp) the setting where distillation beats training the
          student from scratch here (see README):
            python run.py --config=experiments/seed.py:strong,mlp
  augment the CIFAR benchmark's augmentation (random crop after 4-pixel zero
          padding, horizontal flip) on every stage; the teacher then runs
          online in the distil stage (see README):
            python run.py --config=experiments/seed.py:augment
"""

import ml_collections

from kd_jax import augment
from kd_jax import methods
from kd_jax import optimizers

VARIANTS = ('quick', 'mnist', 'strong', 'mlp', 'augment')
# The teacher layer that feature methods pair with the seed student's conv2
# (7x7x32): a 7x7 map in both teachers.
TEACHER_FEATURE_LAYER = {'seed_teacher_cnn': 'conv2', 'bn_cnn': 'block2'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed experiment's config; `arg` is '' or variants, e.g. 'quick,mnist'."""
  variants = tuple(v for v in (arg or '').split(',') if v)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f'experiments/seed.py: unknown variant(s) {unknown}; '
                     f'known variants: {", ".join(VARIANTS)}')

  config = ml_collections.ConfigDict()
  # Run name; the default workdir is runs/<name>. Non-empty string.
  config.name = 'seed'
  # Seeds parameter init, dropout and the data order. Integer >= 0.
  config.seed = 0
  # Dataset name: fashion_mnist, mnist, cifar10 or cifar100
  # (kd_jax.data.DATASETS).
  config.dataset = 'fashion_mnist'
  # Where to look for data: auto (local files, then the download cache
  # ~/.cache/kd_jax/datasets, then TFDS data on disk, then downloads the
  # official files; fails at once when offline), idx (IDX files only),
  # download (the official files, checksums verified, cached) or tfds (TFDS,
  # downloading if needed).
  config.data_source = 'auto'
  # Directory URL of a mirror of the dataset's official files, for
  # data_source auto or download; '' = the canonical mirror
  # (kd_jax/dataset_info.py REMOTES). Checksums are verified either way.
  config.data_url = ''
  # A directory holding the four MNIST-format IDX files (optionally .gz);
  # '' = the dataset's known locations (/usr/share/datasets/fashion-mnist).
  config.data_dir = ''
  # Use only the first N training / test examples; 0 = all. Integer >= 0.
  config.train_limit = 0
  config.test_limit = 0
  # Training examples held out (a fixed subset, the same for every seed) as
  # a validation split, on which post-hoc temperature scaling is fitted for
  # the calibration report; 0 = none (train on all, as the tutorial does).
  # Integer >= 0.
  config.validation_size = 5000
  # Run seeds seed, seed + 1, ..., seed + num_seeds - 1 (each a replicate of
  # every stage, in <workdir>/seed<k>/) and report mean +- 95% CI and a
  # paired test of distilled vs scratch. Integer >= 1.
  config.num_seeds = 1
  # Training batch size for every stage; the last partial batch of an epoch
  # is dropped. Integer >= 1.
  config.batch_size = 64
  # Devices to train on, data parallel (kd_jax/parallel.py): the batch is
  # split across them and batch_size stays the global batch (it must be
  # divisible by the count). 0 = all devices JAX sees. Integer >= 0.
  config.num_devices = 0
  # Compute precision: float32, or bfloat16 (mixed precision for GPU/TPU:
  # bfloat16 forward and backward passes, float32 parameters, optimizer
  # state, losses and their reductions; on CPU it is slower, not faster).
  config.precision = 'float32'
  # Inference batch size (evaluation, teacher-logit cache); every example is
  # counted exactly once (the last batch is padded and masked). 256 was the
  # fastest here for the seed teacher (60k logits: 7.3 s vs 11.4 s at 1000).
  # Integer >= 1.
  config.eval_batch_size = 256
  # How training steps run: scan (the training split on device, chunks of
  # steps compiled as one lax.scan; fastest) or python (one jitted step per
  # batch from host arrays). Both give the same batches in the same order.
  config.loop = 'scan'
  # Where training batches come from: memory (the split loaded once; for
  # MNIST-sized data) or stream (read from disk batch by batch with grain,
  # for data that does not fit in memory; needs loop = 'python', computes
  # teacher logits online; gzipped IDX files are first decompressed into
  # ~/.cache/kd_jax/idx). Both give the same batches in the same order.
  config.input = 'memory'
  # Steps per compiled chunk with loop=scan; the host reads one summary per
  # chunk. 0 = one chunk per epoch. Integer >= 0 (1 to 64 when unrolled).
  config.steps_per_chunk = 8
  # Unroll each chunk into straight-line code. XLA:CPU runs convolutions in a
  # loop body ~20x slower (jax-ml/jax#12868), so True with small chunks is
  # fastest on CPU; on GPU/TPU prefer False with steps_per_chunk = 0.
  config.scan_unroll = True
  # Save each stage's train state every N steps (at the end of the chunk that
  # passes a multiple of N) and at every epoch's end; 0 = epoch ends only.
  # Re-running the same command resumes from the newest. Integer >= 0.
  config.checkpoint_every_steps = 400
  # Checkpoints kept per stage (the newest ones). Integer >= 1.
  config.checkpoints_to_keep = 2
  # Draw the run's figures (training curves, reliability diagrams, the
  # tutorial's tempered softmax) as PNGs under <workdir>/plots when it ends;
  # False skips them (about 2 s of matplotlib per run, which adds up over a
  # sweep). Does not change what is computed, so it may differ on a re-run.
  config.plots = True
  # Stages to run, comma-separated, from teacher, distill, scratch; they run
  # in that order. distill uses the teacher trained in the same workdir.
  config.stages = 'teacher,distill,scratch'
  # Augmentation of every stage's training batches, inside the compiled
  # steps (kd_jax/augment.py SETTINGS): crop_padding (random crop after
  # zero padding; 0 = off), flip (random horizontal flip), mixup_alpha (0 =
  # off). Off here, as in the tutorial; the augment variant turns on the
  # CIFAR benchmark's crop and flip. With augmentation the teacher runs on
  # each augmented batch (distill.teacher_logits cannot be 'cached').
  config.augment = augment.default_section()

  # The teacher (stage "teacher").
  config.teacher = ml_collections.ConfigDict()
  # Model name (kd_jax.models.MODELS).
  config.teacher.model = 'seed_teacher_cnn'
  # Output classes; must equal student.num_classes and cover the dataset's
  # labels. Integer >= 2.
  config.teacher.num_classes = 10
  # Training epochs. Integer >= 1.
  config.teacher.epochs = 5
  # The optimizer: Adam at 1e-3, constant (the tutorial's Keras default).
  # Fields (name, learning_rate, schedule, decay_epochs, decay_rate,
  # warmup_epochs, momentum, nesterov, weight_decay, b1, b2, eps) are
  # described in kd_jax/optimizers.py SETTINGS; the CIFAR benchmark's SGD
  # recipe is in experiments/cifar100/common.py.
  config.teacher.optimizer = optimizers.default_section()
  # Distil from a teacher trained elsewhere: a stage checkpoint directory
  # (e.g. runs/seed/checkpoints/teacher) or one of its step directories; its
  # parameters must fit teacher.model. Several, comma-separated, for
  # distill.method = multi_teacher. '' = train the teacher here (stage
  # "teacher"); when set, leave "teacher" out of stages.
  config.teacher.checkpoint = ''

  # The student: distilled (stage "distill") and, with identical
  # architecture, initialisation and data order, trained from scratch (stage
  # "scratch").
  config.student = ml_collections.ConfigDict()
  # Model name (kd_jax.models.MODELS).
  config.student.model = 'seed_student_cnn'
  # Output classes. Integer >= 2.
  config.student.num_classes = 10
  # Epochs of each student stage. Integer >= 1.
  config.student.epochs = 3
  # The optimizer of each student stage (as config.teacher.optimizer).
  config.student.optimizer = optimizers.default_section()

  # The distil stage: a method (its stages and teachers) and an objective,
  # a weighted sum of terms, each with its settings in a section of its own
  # named after it. The settings' meanings, defaults and ranges are in the
  # methods' records (kd_jax/methods/<name>.py); `with_method` below
  # switches to another method.
  config.distill = ml_collections.ConfigDict()
  # Method (kd_jax.methods.METHODS): kd, dkd, fitnets, at, rkd, pkt,
  # multi_teacher, born_again or takd; see the README's methods table.
  config.distill.method = 'kd'
  # Terms of the objective, comma-separated (kd_jax.methods.TERMS): ce (the
  # labels) and any method's term; each has the section of that name.
  config.distill.terms = 'ce,kd'
  # Teacher outputs: cached (computed once for the whole training split and
  # gathered per batch; exact because the inputs are not augmented), online
  # (teacher forward inside every distil step) or auto (cached when exact).
  config.distill.teacher_logits = 'auto'
  # The tutorial's alpha * CE + (1 - alpha) * soft term with alpha = 0.1:
  # ce.weight = alpha, kd.weight = 1 - alpha.
  config.distill.ce = methods.default_section('ce', weight=0.1)
  # T = 10 without T^2 scaling, to match the tutorial's Keras code (the
  # library's default is T^2 on).
  config.distill.kd = methods.default_section(
      'kd', weight=0.9, temperature=10.0, t2_scaling=False)

  if 'quick' in variants:
    config.name += '_quick'
    config.train_limit = 2048
    config.test_limit = 1024
    config.validation_size = 256
    config.teacher.epochs = 1
    config.student.epochs = 1
    # Compiling dominates a run this short: one step per compiled chunk
    # compiles in a fraction of the time of 8 unrolled steps (the whole run
    # took 22 s against 62 s here, 2026-12-02).
    config.steps_per_chunk = 1
  if 'strong' in variants:
    config.name += '_strong'
    config.teacher.model = 'bn_cnn'
    config.teacher.optimizer.schedule = 'cosine'
  if 'mlp' in variants:
    config.name += '_mlp'
    config.student.model = 'hinton_student_mlp'
    config.student.epochs = 10
    config.distill.kd.t2_scaling = True
    config.distill.kd.temperature = 4.0
  if 'mnist' in variants:
    config.name += '_mnist'
    config.dataset = 'mnist'
    config.data_source = 'tfds'
  if 'augment' in variants:
    config.name += '_augment'
    config.augment.crop_padding = 4
    config.augment.flip = True
  return config


def feature_layers(config: ml_collections.ConfigDict,
                   student_layer: str = 'conv2') -> dict[str, str]:
  """A feature method's layer settings: the student's `student_layer` and
  the teacher's matching layer (`TEACHER_FEATURE_LAYER`)."""
  return {'student_layers': student_layer,
          'teacher_layers': TEACHER_FEATURE_LAYER[config.teacher.model]}


def with_method(config: ml_collections.ConfigDict, method: str, *,
                terms: tuple[str, ...] | None = None,
                **sections: dict) -> ml_collections.ConfigDict:
  """`config` with its distil stage switched to `method`, renamed after it.

  The objective becomes `terms` (default: the method's paper objective,
  `kd_jax.methods.METHODS[method].terms`). Each term's section, and the
  method's own, is kept if `config` has it and `sections` does not name it,
  else built from the record's defaults with `sections[name]` applied, so
  `config.distill` carries exactly the sections it uses.
  """
  config.name = config.name.replace('seed', method, 1)
  record = methods.METHODS[method]
  terms = tuple(terms or record.terms)
  distill = ml_collections.ConfigDict({
      'method': method, 'terms': ','.join(terms),
      'teacher_logits': config.distill.teacher_logits})
  own = (method,) if record.settings else ()
  for name in dict.fromkeys(terms + own):
    if name in config.distill and name not in sections:
      distill[name] = config.distill[name]
    else:
      distill[name] = methods.default_section(name, **sections.get(name, {}))
  config.distill = distill
  return config
