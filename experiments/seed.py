r"""The tutorial's protocol: teacher, distilled student, student from scratch.

Train the seed CNN teacher 5 epochs; distil a fresh seed student 3 epochs from
it (alpha = 0.1, T = 10); train an identical student from scratch 3 epochs;
report the three test accuracies. Batch 64, Adam 1e-3, Fashion-MNIST.

The tutorial (a Keras example) computes the soft loss with
`keras.losses.KLDivergence()` on softmax(teacher / T) and softmax(student / T)
and does *not* multiply it by T**2; this config reproduces that with
`distill.t2_scaling = False` (the library's own default is T**2 on, as in
Hinton et al. 2015). Keras also clips probabilities to [1e-7, 1] inside its KL;
we compute the exact KL from log-softmax instead.

Run (about 7 minutes on 2 CPU cores; see README):
  python run.py --config=experiments/seed.py --workdir=runs/seed

Variants, comma-separated after a colon:
  quick   a small slice (2,048 train / 1,024 test) and 1 epoch per stage, for
          smoke tests (well under a minute):
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
"""

import ml_collections

VARIANTS = ('quick', 'mnist', 'strong', 'mlp')
# The teacher layer that feature methods pair with the seed student's conv2
# (7x7x32): a 7x7 map in both teachers.
TEACHER_FEATURE_LAYER = {'seed_teacher_cnn': 'conv2', 'bn_cnn': 'block2'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The seed experiment's config; `arg` is '', 'quick', 'mnist' or 'quick,mnist'."""
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
  # Dataset name: fashion_mnist or mnist (kd_jax.data.DATASETS).
  config.dataset = 'fashion_mnist'
  # Where to look for data: auto (local IDX files, then TFDS data already on
  # disk; never waits on a network), idx (IDX files only) or tfds (TFDS,
  # downloading if needed).
  config.data_source = 'auto'
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
  # Stages to run, comma-separated, from teacher, distill, scratch; they run
  # in that order. distill uses the teacher trained in the same workdir.
  config.stages = 'teacher,distill,scratch'

  # The teacher (stage "teacher").
  config.teacher = ml_collections.ConfigDict()
  # Model name (kd_jax.models.MODELS).
  config.teacher.model = 'seed_teacher_cnn'
  # Output classes; must equal student.num_classes and cover the dataset's
  # labels. Integer >= 2.
  config.teacher.num_classes = 10
  # Training epochs. Integer >= 1.
  config.teacher.epochs = 5
  # Adam learning rate. Number > 0.
  config.teacher.learning_rate = 1e-3
  # Learning-rate schedule: constant, or cosine (decays to 0 over the
  # stage's epochs).
  config.teacher.schedule = 'constant'
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
  # Adam learning rate. Number > 0.
  config.student.learning_rate = 1e-3
  # Learning-rate schedule of each student stage: constant or cosine.
  config.student.schedule = 'constant'

  # The distillation loss.
  config.distill = ml_collections.ConfigDict()
  # Method: kd (Hinton et al. 2015: alpha * CE(labels) + (1 - alpha) * soft
  # term), multi_teacher (the same with the mixture of several teachers'
  # tempered distributions as the target; teachers from teacher.checkpoint),
  # dkd (Zhao et al. 2022, settings in distill.dkd), a feature method added
  # to kd: fitnets (Romero et al. 2015, a learned regressor maps the student's
  # layers to the teacher's), at (Zagoruyko & Komodakis 2017), rkd (Park et
  # al. 2019) or pkt (Passalis & Tefas 2018), settings in distill.features,
  # or a chain of kd stages: takd (Mirzadeh et al. 2020, teacher ->
  # distill.assistant_models -> student) or born_again (Furlanello et al.
  # 2018, distill.generations of the teacher's architecture, each distilled
  # from the one before; student.model must equal teacher.model).
  config.distill.method = 'kd'
  # Decoupled KD: ce_weight * CE + (alpha * TCKD + beta * NCKD) * T^2, with
  # T = distill.temperature. Numbers >= 0 (the paper's CIFAR defaults).
  # multi_teacher: the teachers' weights in the mixture, comma-separated in
  # the order of teacher.checkpoint (or teacher, teacher2, ...); '' = equal.
  # Numbers >= 0.
  config.distill.multi_teacher_weights = ''
  # multi_teacher without teacher.checkpoint: how many teachers the teacher
  # stage trains (teacher, teacher2, ...: same model and data order,
  # different initialisations). Integer >= 1 (>= 2 for multi_teacher).
  config.distill.num_teachers = 1
  # born_again: generations of students after the teacher; the last is the
  # distilled student, the others are stages generation1, generation2, ...
  # Integer >= 1.
  config.distill.generations = 2
  # takd: the teacher assistants' models (kd_jax.models.MODELS), largest
  # first, comma-separated; each trains student.epochs at
  # student.learning_rate, distilled from the one before (stages assistant1,
  # assistant2, ...).
  config.distill.assistant_models = 'seed_assistant_cnn'
  config.distill.dkd = ml_collections.ConfigDict()
  config.distill.dkd.alpha = 1.0
  config.distill.dkd.beta = 8.0
  config.distill.dkd.ce_weight = 1.0
  # Feature methods (fitnets, at, rkd, pkt) add weight * feature loss to the
  # kd objective above (alpha = 1 gives the papers' CE + weight * feature
  # loss). Layers are submodule names (e.g. conv2 of the seed CNNs) or names
  # a model sows (stage1..3, embedding of the ResNets), comma-separated;
  # fitnets and at pair them in order, rkd and pkt use the last one. The
  # teacher then runs inside every step (no logit cache).
  config.distill.features = ml_collections.ConfigDict()
  config.distill.features.student_layers = 'conv2'
  config.distill.features.teacher_layers = 'conv2'
  # Weight of the feature loss. Number >= 0.
  config.distill.features.weight = 1.0
  # Weight of the hard-label cross-entropy. Number in [0, 1].
  config.distill.alpha = 0.1
  # Softmax temperature T of the soft term. Number > 0.
  config.distill.temperature = 10.0
  # Multiply the soft term by T**2 (Hinton et al.). False here to match the
  # tutorial's Keras code; the library default is True.
  config.distill.t2_scaling = False
  # Soft term: kl = KL(p_teacher^T || p_student^T); cross_entropy =
  # H(p_teacher^T, p_student^T) (larger by the teacher's entropy, same
  # gradient).
  config.distill.form = 'kl'
  # Teacher outputs: cached (computed once for the whole training split and
  # gathered per batch; exact because the inputs are not augmented), online
  # (teacher forward inside every distil step) or auto (cached when exact).
  config.distill.teacher_logits = 'auto'

  if 'quick' in variants:
    config.name += '_quick'
    config.train_limit = 2048
    config.test_limit = 1024
    config.validation_size = 256
    config.teacher.epochs = 1
    config.student.epochs = 1
  if 'strong' in variants:
    config.name += '_strong'
    config.teacher.model = 'bn_cnn'
    config.teacher.schedule = 'cosine'
  if 'mlp' in variants:
    config.name += '_mlp'
    config.student.model = 'hinton_student_mlp'
    config.student.epochs = 10
    config.distill.t2_scaling = True
    config.distill.temperature = 4.0
  if 'mnist' in variants:
    config.name += '_mnist'
    config.dataset = 'mnist'
    config.data_source = 'tfds'
  return config


def with_method(config: ml_collections.ConfigDict, method: str, *,
                feature_weight: float | None = None,
                student_layer: str = 'conv2') -> ml_collections.ConfigDict:
  """`config` with its distil stage switched to `method`, renamed after it.

  For a feature method (`feature_weight` given): alpha = 1, i.e. the papers'
  cross-entropy with the labels plus `feature_weight` times the feature loss
  on the student's `student_layer` and the teacher's matching layer
  (`TEACHER_FEATURE_LAYER`), without logit distillation.
  """
  config.name = config.name.replace('seed', method, 1)
  config.distill.method = method
  if feature_weight is not None:
    config.distill.alpha = 1.0
    config.distill.features.student_layers = student_layer
    config.distill.features.teacher_layers = TEACHER_FEATURE_LAYER[
        config.teacher.model]
    config.distill.features.weight = feature_weight
  return config
