"""Tests for the methods' losses (`kd_jax.methods.<name>`), optax-style.

Expected values come from float64 NumPy references written from the papers'
definitions (in probability space, with loops over pairs and triplets where
the papers sum over them), from small cases worked out by hand, and from
invariants of each method. The checks that every loss shares (gradients,
frozen teacher, jit/vmap, padding, extreme inputs) run over one table of
cases, each compiled once per check. The objective terms that the methods'
records build from these losses are tested in tests/test_objective.py.
"""

from collections.abc import Callable
import functools
import math
from typing import NamedTuple

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses
from kd_jax.methods import at
from kd_jax.methods import dkd
from kd_jax.methods import fitnets
from kd_jax.methods import multi_teacher
from kd_jax.methods import pkt
from kd_jax.methods import rkd

_NUM_CLASSES = 10
_BATCH = 6
_NUM_TEACHERS = 3
# The error for a label id outside [0, K), K = _NUM_CLASSES.
_LABEL_RANGE = r'labels must be class ids in \[0, 10\)'


# --- float64 NumPy references, written from the papers. ----------------------


def _np_softmax(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p, q):
  """`sum_k p_k log(p_k / q_k)` over the last axis, with 0 log 0 = 0."""
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(p > 0, p * np.log(p / q), 0.0).sum(axis=-1)


def _np_weighted_mean(values, weights=None):
  if weights is None:
    return np.mean(values)
  weights = np.asarray(weights, np.float64)
  return (weights * values).sum() / weights.sum()


def _np_dkd(student, teacher, labels, temperature):
  """Per-example (TCKD, NCKD) from the DKD paper's definitions."""
  tckd, nckd = [], []
  for s, t, y in zip(student, teacher, labels):
    p_s, p_t = _np_softmax(s, temperature), _np_softmax(t, temperature)
    rest_s, rest_t = np.delete(p_s, y), np.delete(p_t, y)
    b_s = np.array([p_s[y], rest_s.sum()])
    b_t = np.array([p_t[y], rest_t.sum()])
    tckd.append(_np_kl(b_t, b_s))
    nckd.append(_np_kl(rest_t / rest_t.sum(), rest_s / rest_s.sum()))
  return np.array(tckd), np.array(nckd)


def _np_multi_teacher(student, teachers, temperature, teacher_weights,
                      t2_scaling):
  """Per-example KD from the teachers' mixture; `teachers` `[B, M, K]`."""
  teachers = np.asarray(teachers, np.float64)
  num_teachers = teachers.shape[1]
  if teacher_weights is None:
    teacher_weights = np.ones(num_teachers)
  w = np.asarray(teacher_weights, np.float64) / np.sum(teacher_weights)
  target = sum(w[m] * _np_softmax(teachers[:, m], temperature)
               for m in range(num_teachers))
  loss = _np_kl(target, _np_softmax(student, temperature))
  return loss * temperature**2 if t2_scaling else loss


def _np_hint(student, teacher):
  """Per-example mean squared error over the feature elements."""
  diff = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
  return (diff**2).reshape(len(diff), -1).mean(axis=1)


def _np_attention_map(features, p):
  # The official code's route: mean over channels, then normalise.
  energy = (np.abs(np.asarray(features, np.float64))**p).mean(axis=-1)
  energy = energy.reshape(len(energy), -1)
  return energy / np.linalg.norm(energy, axis=1, keepdims=True)


def _np_attention_transfer(student, teacher, p):
  diff = _np_attention_map(student, p) - _np_attention_map(teacher, p)
  return (diff**2).mean(axis=1)


def _np_huber(x):
  return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


def _np_rkd(student, teacher):
  """(distance, angle) losses over pairs / triplets of distinct examples."""
  s = np.asarray(student, np.float64).reshape(len(student), -1)
  t = np.asarray(teacher, np.float64).reshape(len(teacher), -1)
  n = len(s)
  pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
  triplets = [(i, j, k) for i, j in pairs for k in range(n) if k not in (i, j)]

  def distance_potentials(e):
    d = {(i, j): np.linalg.norm(e[i] - e[j]) for i, j in pairs}
    mu = np.mean(list(d.values()))
    return {pair: value / mu for pair, value in d.items()}

  def cosine_at_j(e, i, j, k):
    a, b = e[i] - e[j], e[k] - e[j]
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

  ds, dt = distance_potentials(s), distance_potentials(t)
  distance = np.mean([_np_huber(ds[pair] - dt[pair]) for pair in pairs])
  angle = np.mean([_np_huber(cosine_at_j(s, *ijk) - cosine_at_j(t, *ijk))
                   for ijk in triplets])
  return distance, angle


def _np_pkt(student, teacher, eps, weights=None):
  def conditional(e):
    e = np.asarray(e, np.float64).reshape(len(e), -1)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    kernel = (e @ e.T + 1) / 2
    return kernel / kernel.sum(axis=1, keepdims=True)

  p_s, p_t = conditional(student), conditional(teacher)
  per_row = (p_t * np.log((p_t + eps) / (p_s + eps))).sum(axis=1)
  return _np_weighted_mean(per_row, weights)


# --- helpers. -----------------------------------------------------------------


def _normal(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _logits(seed=0, batch_size=_BATCH, scale=3.0):
  """Random float32 student and teacher logits `[B, K]` and labels `[B]`."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, _NUM_CLASSES)
  student = (scale * rng.standard_normal(shape)).astype(np.float32)
  teacher = (scale * rng.standard_normal(shape)).astype(np.float32)
  labels = rng.integers(0, _NUM_CLASSES, batch_size).astype(np.int32)
  return student, teacher, labels


def _mask(batch_size=_BATCH):
  """A `[B]` 0/1 mask with some rows padded."""
  mask = np.ones(batch_size, np.float32)
  mask[1::3] = 0.0
  return mask


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


class _Case(NamedTuple):
  """A loss under test: `loss(student, teacher, labels, weights) -> scalar`.

  Student and teacher inputs have the batch on axis 0.
  """
  loss: Callable[..., jax.Array]
  student_shape: tuple[int, ...]
  teacher_shape: tuple[int, ...]


# Every method's reduced form, with weights. (Hinton's KD and the labels'
# cross-entropy are in `kd_jax.losses`, which tests/test_losses.py checks the
# same way; tests/test_objective.py checks the terms built from the losses.)
_CASES = {
    'dkd': _Case(
        lambda s, t, y, w: dkd.dkd_loss(
            s, t, y, weights=w, tckd_weight=1.0, nckd_weight=8.0,
            temperature=2.0)[0],
        (_BATCH, _NUM_CLASSES), (_BATCH, _NUM_CLASSES)),
    'multi_teacher': _Case(
        lambda s, t, y, w: multi_teacher.multi_teacher_distillation_loss(
            s, t, 2.0, teacher_weights=[0.2, 0.3, 0.5], weights=w)[0],
        (_BATCH, _NUM_CLASSES), (_BATCH, _NUM_TEACHERS, _NUM_CLASSES)),
    'hint': _Case(
        lambda s, t, y, w: fitnets.hint_loss(s, t, weights=w)[0],
        (_BATCH, 4, 4, 3), (_BATCH, 4, 4, 3)),
    'attention': _Case(
        lambda s, t, y, w: at.attention_transfer_loss(s, t, weights=w),
        (_BATCH, 4, 4, 3), (_BATCH, 4, 4, 5)),
    'rkd': _Case(
        lambda s, t, y, w: rkd.rkd_loss(s, t, weights=w)[0],
        (_BATCH, 5), (_BATCH, 7)),
    'pkt': _Case(
        lambda s, t, y, w: pkt.pkt_loss(s, t, weights=w)[0],
        (_BATCH, 5), (_BATCH, 7)),
}
_LABELS = np.arange(_BATCH, dtype=np.int32) % _NUM_CLASSES


def _case_inputs(case, seed=0, scale=1.0):
  return (_normal(case.student_shape, seed, scale),
          _normal(case.teacher_shape, seed + 1, scale))


# Stacks of this many input pairs go through one compiled program per case,
# shared by three tests (compilation is most of these tests' time).
_STACK = 8


@functools.cache
def _batched_value_and_grads(name):
  """Jitted `(students, teachers, labels) -> (values, student grads, teacher
  grads, teacher tangents)`, over a leading axis of `_STACK` input triples,
  with the weights `_mask()`."""
  case = _CASES[name]
  mask = _mask()

  def evaluate(student, teacher, labels):
    def loss(s, t):
      return case.loss(s, t, labels, mask)

    value, (student_grad, teacher_grad) = jax.value_and_grad(
        loss, argnums=(0, 1))(student, teacher)
    _, teacher_tangent = jax.jvp(lambda t: loss(student, t), (teacher,),
                                 (jnp.ones_like(teacher),))
    return value, student_grad, teacher_grad, teacher_tangent

  return jax.jit(jax.vmap(evaluate))


def _stacked_labels():
  return np.stack([_LABELS] * _STACK)


def _teacher_like(student, teacher_shape):
  """The student's values in the teacher's shape (each of several teachers
  a copy), or None where the shapes differ otherwise."""
  if teacher_shape == student.shape:
    return student
  if teacher_shape == student.shape[:1] + (_NUM_TEACHERS,) + student.shape[1:]:
    return np.broadcast_to(student[:, None], teacher_shape)
  return None


# --- checks shared by every loss. ---------------------------------------------


class CommonTest(parameterized.TestCase):

  @parameterized.parameters(*_CASES)
  def test_check_grads(self, name):
    # `jax.test_util.check_grads(..., order=1, modes=('rev',))` along three
    # random directions instead of one, from one compiled program (it
    # compiles three: the function, its linearisation and the transpose).
    case = _CASES[name]
    student, teacher = (x.astype(np.float64) for x in _case_inputs(case))
    mask = _mask().astype(np.float64)
    rng = np.random.default_rng(0)
    eps = 1e-4  # check_grads' step.
    with jax.enable_x64(True):
      value_and_grad = jax.jit(jax.value_and_grad(
          lambda s: case.loss(s, teacher, _LABELS, mask)))
      _, grad = value_and_grad(student)
      self.assertEqual(grad.dtype, np.float64)
      for _ in range(3):
        direction = rng.standard_normal(student.shape)
        difference = (value_and_grad(student + eps * direction)[0]
                      - value_and_grad(student - eps * direction)[0])
        np.testing.assert_allclose(np.vdot(grad, direction),
                                   difference / (2 * eps), rtol=1e-5,
                                   atol=1e-5)

  @parameterized.parameters(*_CASES)
  def test_jit_vmap_and_eager_agree_and_teacher_gets_no_gradient(self, name):
    case = _CASES[name]
    mask = _mask()
    batches = [_case_inputs(case, seed, scale=3.0)
               for seed in range(0, 2 * _STACK, 2)]
    students, teachers = (np.stack(side) for side in zip(*batches))
    values, student_grads, teacher_grads, teacher_tangents = (
        _batched_value_and_grads(name)(students, teachers, _stacked_labels()))
    # Eager values only: eager mode compiles every operation on its own,
    # 5 to 10 times the cost of one jit, and gradients would double it.
    eager_values = [case.loss(s, t, _LABELS, mask) for s, t in batches]
    np.testing.assert_allclose(values, eager_values, rtol=1e-5)
    self.assertTrue(np.all(np.isfinite(student_grads)))
    self.assertTrue(np.any(student_grads != 0))
    np.testing.assert_array_equal(student_grads[:, mask == 0], 0.0)
    # The teacher is frozen, in reverse and in forward mode.
    np.testing.assert_array_equal(teacher_grads, 0.0)
    np.testing.assert_array_equal(teacher_tangents, 0.0)

  @parameterized.parameters(*_CASES)
  def test_padded_rows_count_for_nothing(self, name):
    case = _CASES[name]
    student, teacher = _case_inputs(case)
    keep = _mask().astype(bool)
    dropped_value, dropped_grad = jax.jit(jax.value_and_grad(case.loss))(
        student[keep], teacher[keep], _LABELS[keep], None)
    # Padded rows hold garbage, NaN and infinities included, in the student
    # and the teacher inputs, different in each element of the stack, and
    # label ids out of range (-1, the usual sentinel, and K + 3), which only
    # pass unchecked because the program is jitted.
    rng = np.random.default_rng(4)
    students = np.stack([student] * _STACK)
    teachers = np.stack([teacher] * _STACK)
    labels = _stacked_labels()
    garbage = ((np.nan, np.nan), (np.inf, -np.inf), (-np.inf, np.nan),
               (1e4, -1e4), (0.0, 0.0), (1e-30, -1e-30))
    for i, (in_student, in_teacher) in enumerate(garbage):
      students[i, ~keep] = in_student
      teachers[i, ~keep] = in_teacher
    for i in range(len(garbage), _STACK):
      students[i, ~keep] = rng.uniform(-1e4, 1e4, students[i, ~keep].shape)
      teachers[i, ~keep] = rng.uniform(-1e4, 1e4, teachers[i, ~keep].shape)
    labels[0::2, ~keep] = -1
    labels[1::2, ~keep] = _NUM_CLASSES + 3
    values, grads, _, _ = _batched_value_and_grads(name)(
        students, teachers, labels)
    np.testing.assert_allclose(
        values, np.full(_STACK, dropped_value), rtol=1e-5)
    self.assertFalse(np.any(np.isnan(grads)))
    np.testing.assert_allclose(
        grads[:, keep], np.stack([dropped_grad] * _STACK), rtol=1e-4,
        atol=1e-8)
    np.testing.assert_array_equal(grads[:, ~keep], 0.0)

  @parameterized.parameters(*_CASES)
  def test_extreme_inputs_give_finite_values_and_gradients(self, name):
    case = _CASES[name]
    rng = np.random.default_rng(3)
    s_shape, t_shape = case.student_shape, case.teacher_shape

    def huge(shape):
      return rng.uniform(-1e4, 1e4, shape).astype(np.float32)

    def plus_minus(shape):  # +-1e4, mostly -1e4: near one-hot logits.
      return np.where(rng.uniform(size=shape) < 0.2, 1e4, -1e4).astype(
          np.float32)

    def same_rows(shape):  # Identical examples: distances 0.
      return np.broadcast_to(huge((1,) + shape[1:]), shape)

    zeros_s, zeros_t = (np.zeros(x, np.float32) for x in (s_shape, t_shape))
    same = huge(s_shape)
    same_teacher = _teacher_like(same, t_shape)
    pairs = [
        (huge(s_shape), huge(t_shape)),
        (plus_minus(s_shape), plus_minus(t_shape)),
        (1e-20 * huge(s_shape), huge(t_shape)),  # Tiny: squares underflow.
        (zeros_s, huge(t_shape)),
        (zeros_s, zeros_t),
        (same_rows(s_shape), huge(t_shape)),
        (same_rows(s_shape), same_rows(t_shape)),
        # Student equals teacher(s) where shapes allow; else a zero teacher.
        (same, zeros_t if same_teacher is None else same_teacher),
    ]
    students, teachers = (np.stack(side) for side in zip(*pairs))
    values, student_grads, _, _ = _batched_value_and_grads(name)(
        students, teachers, _stacked_labels())
    self.assertTrue(np.all(np.isfinite(values)), values)
    self.assertTrue(np.all(np.isfinite(student_grads)))


# --- Decoupled KD. ------------------------------------------------------------


class DKDTest(parameterized.TestCase):

  # (tckd_weight, nckd_weight, temperature).
  _SETTINGS = ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.5, 0.5),
               (0.0, 1.0, 10.0))

  @parameterized.parameters(True, False)
  def test_reference_values(self, use_jit):
    student, teacher, labels = _logits()
    settings = [(a, b, t, weights) for a, b, t in self._SETTINGS
                for weights in (None, _mask())]

    def all_settings():
      return [dkd.dkd_loss(student, teacher, labels, tckd_weight=a,
                           nckd_weight=b, temperature=t, weights=weights)
              for a, b, t, weights in settings]

    got = _maybe_jit(all_settings, use_jit)()
    for (tckd_weight, nckd_weight, t, weights), (loss, aux) in zip(
        settings, got):
      tckd, nckd = _np_dkd(student, teacher, labels, t)
      tckd = _np_weighted_mean(tckd, weights) * t**2
      nckd = _np_weighted_mean(nckd, weights) * t**2
      with self.subTest(tckd_weight=tckd_weight, nckd_weight=nckd_weight,
                        temperature=t, masked=weights is not None):
        self.assertEqual(set(aux), {'tckd', 'nckd'})
        np.testing.assert_allclose(aux['tckd'], tckd, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(aux['nckd'], nckd, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            loss, tckd_weight * tckd + nckd_weight * nckd, rtol=1e-4,
            atol=1e-6)

  def test_hand_computed(self):
    # Student [0, 0, 0]: p_s = [1/3, 1/3, 1/3]. Teacher [0, ln 3, 0] at T = 1:
    # p_t = [1/5, 3/5, 1/5]. Target class 0.
    student = np.zeros((1, 3), np.float32)
    teacher = np.array([[0.0, math.log(3.0), 0.0]], np.float32)
    loss, aux = jax.jit(functools.partial(
        dkd.dkd_loss, tckd_weight=1.0, nckd_weight=8.0, temperature=1.0))(
            student, teacher, np.array([0]))
    # TCKD: b_t = [1/5, 4/5], b_s = [1/3, 2/3]:
    #   0.2 ln(0.6) + 0.8 ln(1.2) = -0.1021651 + 0.1458573 = 0.0436921.
    # NCKD: p_hat_t = [3/4, 1/4], p_hat_s = [1/2, 1/2]:
    #   0.75 ln 1.5 + 0.25 ln 0.5 = 0.3040988 - 0.1732868 = 0.1308120.
    # Loss: 0.0436921 + 8 * 0.1308120 = 1.0901884.
    np.testing.assert_allclose(aux['tckd'], 0.0436921, rtol=1e-5)
    np.testing.assert_allclose(aux['nckd'], 0.1308120, rtol=1e-5)
    np.testing.assert_allclose(loss, 1.0901884, rtol=1e-5)
    # KD = TCKD + (1 - p_t) NCKD = 0.0436921 + 0.8 * 0.1308120 = 0.1483417
    #    = 0.2 ln 0.6 + 0.6 ln 1.8 + 0.2 ln 0.6.
    np.testing.assert_allclose(
        jax.jit(losses.distillation_loss)(student, teacher, 1.0), 0.1483417,
        rtol=1e-5)

  def test_kd_decomposes_into_tckd_and_nckd(self):
    # KD = TCKD + (1 - p_t^teacher) NCKD, per example (Zhao et al.).
    student, teacher, labels = _logits(batch_size=8)
    rng = np.random.default_rng(5)
    # Rows 4-7: +-1e4 logits, where the tempered probabilities underflow.
    student[4:] = rng.uniform(-1e4, 1e4, (4, _NUM_CLASSES))
    teacher[4:] = rng.uniform(-1e4, 1e4, (4, _NUM_CLASSES))
    teacher[6] = student[6]
    temperatures = np.array([0.5, 1.0, 4.0, 10.0, 1000.0], np.float32)

    @jax.jit
    @jax.vmap
    def terms(temperature):
      kd = losses.distillation_loss_per_example(
          student, teacher, temperature, t2_scaling=False)
      return (kd,) + dkd.dkd_terms_per_example(
          student, teacher, labels, temperature)

    kd, tckd, nckd = terms(temperatures)
    # Float32 log-probabilities of size |logits| / T carry an error of an
    # ulp of that size (6e-5 at 1e3), which the sums over classes keep.
    size = np.max(np.abs(np.stack([student, teacher])), axis=(0, 2))
    for i, t in enumerate(temperatures.astype(np.float64)):
      p_target = _np_softmax(teacher, t)[np.arange(8), labels]
      atol = 1e-5 + 4 * np.finfo(np.float32).eps * size / t
      with self.subTest(temperature=t):
        np.testing.assert_array_less(
            np.abs(tckd[i] + (1 - p_target) * nckd[i] - kd[i]),
            atol + 1e-4 * np.abs(kd[i]))
        # The moderate rows also against the reference.
        ref_tckd, ref_nckd = _np_dkd(student[:4], teacher[:4], labels[:4], t)
        np.testing.assert_allclose(tckd[i, :4], ref_tckd, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(nckd[i, :4], ref_nckd, rtol=1e-4,
                                   atol=1e-6)

  def test_terms_depend_on_their_own_part_only(self):
    student, teacher, labels = _logits()
    tckd, nckd = dkd.dkd_terms_per_example(student, teacher, labels, 2.0)
    rows = np.arange(_BATCH)
    # NCKD ignores the target logits entirely.
    moved = student.copy()
    moved[rows, labels] += 5.0
    _, moved_nckd = dkd.dkd_terms_per_example(moved, teacher, labels, 2.0)
    np.testing.assert_array_equal(moved_nckd, nckd)
    # TCKD depends on p_t only: a permutation of the non-target logits keeps
    # it (and, generally, changes NCKD).
    permuted = student.copy()
    for row, label in zip(permuted, labels):
      others = np.delete(np.arange(_NUM_CLASSES), label)
      row[others] = row[others[::-1]]
    permuted_tckd, permuted_nckd = dkd.dkd_terms_per_example(
        permuted, teacher, labels, 2.0)
    np.testing.assert_allclose(permuted_tckd, tckd, rtol=1e-5, atol=1e-7)
    self.assertFalse(np.allclose(permuted_nckd, nckd))
    # Both vanish when the student equals the teacher.
    same = dkd.dkd_terms_per_example(teacher, teacher, labels, 2.0)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)

  def test_labels(self):
    student, teacher, labels = _logits()
    expected = dkd.dkd_terms_per_example(student, teacher, labels, 2.0)
    terms = jax.jit(dkd.dkd_terms_per_example)
    for bad_id in (-1, _NUM_CLASSES, -_NUM_CLASSES, _NUM_CLASSES + 3):
      bad = labels.copy()
      bad[0] = bad_id
      with self.subTest(label=bad_id):
        # Ids outside [0, K), -1 included (it does not count from the end),
        # are an error where they can be checked...
        with self.assertRaisesRegex(ValueError, _LABEL_RANGE):
          dkd.dkd_terms_per_example(student, teacher, bad, 2.0)
        with self.assertRaisesRegex(ValueError, _LABEL_RANGE):
          dkd.dkd_loss(student, teacher, bad)
        # ... and NaN on their own row inside jit (padding needs a 0 weight).
        tckd, nckd = terms(student, teacher, bad, 2.0)
        self.assertTrue(np.isnan(tckd[0]) and np.isnan(nckd[0]))
        np.testing.assert_allclose(tckd[1:], expected[0][1:], rtol=1e-6)
        np.testing.assert_allclose(nckd[1:], expected[1][1:], rtol=1e-6)
    for bad_labels in (labels.astype(np.float32), labels[:-1],
                       np.eye(_NUM_CLASSES)[labels]):
      with self.assertRaisesRegex(ValueError, 'labels'):
        dkd.dkd_loss(student, teacher, bad_labels)

  def test_warmup_factor(self):
    # min(epoch / warmup_epochs, 1), epochs from 1.
    for epoch, expected in ((1, 0.05), (10, 0.5), (19, 0.95), (20, 1.0),
                            (40, 1.0)):
      np.testing.assert_allclose(dkd.warmup_factor(epoch, 20), expected,
                                 rtol=1e-6)
    # Traced epochs, as in a jitted step.
    epochs = np.arange(1, 31)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(lambda e: dkd.warmup_factor(e, 8)))(epochs),
        np.minimum(epochs / 8, 1.0), rtol=1e-6)
    # No warm-up: 1 from the first epoch.
    for epoch in (1, 5, 100):
      self.assertEqual(dkd.warmup_factor(epoch, 0), 1.0)

  def test_errors(self):
    student, teacher, labels = _logits()
    with self.assertRaisesRegex(ValueError, 'K >= 2'):
      dkd.dkd_loss(student[:, :1], teacher[:, :1], np.zeros(_BATCH, int))
    with self.assertRaisesRegex(ValueError, 'same shape'):
      dkd.dkd_loss(student, teacher[:, :5], labels)
    with self.assertRaisesRegex(ValueError, 'nckd_weight'):
      dkd.dkd_loss(student, teacher, labels, nckd_weight=-1.0)
    with self.assertRaisesRegex(ValueError, 'tckd_weight'):
      dkd.dkd_loss(student, teacher, labels, tckd_weight=-1.0)
    with self.assertRaisesRegex(ValueError, 'temperature'):
      dkd.dkd_loss(student, teacher, labels, temperature=0.0)


# --- Several teachers. --------------------------------------------------------


class MultiTeacherTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_reference_values(self, use_jit):
    student, _, _ = _logits()
    teachers = _normal((_BATCH, 3, _NUM_CLASSES), 7, scale=3.0)
    mask = _mask()
    settings = [(teacher_weights, t2_scaling, masked, temperature)
                for teacher_weights in (None, [0.2, 0.3, 0.5], [1.0, 2.0, 0.0])
                for t2_scaling in (True, False)
                for masked in (False, True)
                for temperature in (1.0, 4.0)]

    def all_settings():
      return [multi_teacher.multi_teacher_distillation_loss(
          student, teachers, temperature, teacher_weights=teacher_weights,
          t2_scaling=t2_scaling, weights=mask if masked else None)
              for teacher_weights, t2_scaling, masked, temperature in settings]

    got = _maybe_jit(all_settings, use_jit)()
    for setting, (value, aux) in zip(settings, got):
      teacher_weights, t2_scaling, masked, temperature = setting
      expected = _np_weighted_mean(
          _np_multi_teacher(student, teachers, temperature, teacher_weights,
                            t2_scaling),
          mask if masked else None)
      with self.subTest(setting=setting):
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-6)
        self.assertEqual(aux, {})

  def test_as_many_teachers_as_examples(self):
    # [B, M, K] with M == B: the teachers are the second axis, whichever
    # axis their count matches.
    student = _normal((4, _NUM_CLASSES), 0, scale=3.0)
    teachers = _normal((4, 4, _NUM_CLASSES), 9, scale=3.0)
    teacher_weights = [0.1, 0.2, 0.3, 0.4]
    got = jax.jit(functools.partial(
        multi_teacher.multi_teacher_distillation_loss_per_example,
        teacher_weights=teacher_weights))(student, teachers, 2.0)
    expected = _np_multi_teacher(student, teachers, 2.0, teacher_weights,
                                 True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The transposed reading, [M, B, K], is another loss.
    transposed = _np_multi_teacher(student, np.swapaxes(teachers, 0, 1), 2.0,
                                   teacher_weights, True)
    self.assertFalse(np.allclose(got, transposed, rtol=1e-2))

  def test_hand_computed(self):
    # Teachers [ln 3, 0] -> [3/4, 1/4] and [0, ln 3] -> [1/4, 3/4] at T = 1,
    # weights [3, 1] / 4: target = [10/16, 6/16] = [0.625, 0.375]. Student
    # uniform: KL = 0.625 ln 1.25 + 0.375 ln 0.75
    #   = 0.1394647 - 0.1078808 = 0.0315839.
    teachers = np.array([[[math.log(3.0), 0.0], [0.0, math.log(3.0)]]],
                        np.float32)
    loss, aux = jax.jit(functools.partial(
        multi_teacher.multi_teacher_distillation_loss,
        teacher_weights=[3.0, 1.0]))(np.zeros((1, 2), np.float32), teachers,
                                     1.0)
    np.testing.assert_allclose(loss, 0.0315839, rtol=1e-5)
    self.assertEqual(aux, {})

  def test_invariants(self):
    student, teacher, _ = _logits()
    others = _normal((_BATCH, 2, _NUM_CLASSES), 8, scale=3.0)
    mask = _mask()

    def loss(teachers, temperature, **kwargs):
      return multi_teacher.multi_teacher_distillation_loss(
          student, teachers, temperature, **kwargs)[0]

    for temperature in (0.5, 1.0, 4.0):
      with self.subTest(temperature=temperature):
        single = losses.distillation_loss(
            student, teacher, temperature, weights=mask)
        # One teacher is plain KD.
        np.testing.assert_allclose(
            loss(teacher[:, None], temperature, weights=mask), single,
            rtol=1e-6)
        # Identical teachers are one teacher, whatever their weights.
        np.testing.assert_allclose(
            loss(np.stack([teacher] * 3, axis=1), temperature,
                 teacher_weights=[1.0, 2.0, 3.0], weights=mask),
            single, rtol=1e-5)
        # A teacher of weight 0 is no teacher; weights are normalised.
        three = np.concatenate([teacher[:, None], others], axis=1)
        np.testing.assert_allclose(
            loss(three, temperature, teacher_weights=[1.0, 0.0, 0.0]),
            losses.distillation_loss(student, teacher, temperature),
            rtol=1e-6)
        np.testing.assert_allclose(
            loss(three, temperature, teacher_weights=[2.0, 4.0, 2.0]),
            loss(three, temperature, teacher_weights=[0.25, 0.5, 0.25]),
            rtol=1e-6)

  def test_errors(self):
    student, teacher, _ = _logits()
    shape_error = r'must be \[\.\.\., M, K\]'
    for fn in (multi_teacher.multi_teacher_distillation_loss,
               multi_teacher.multi_teacher_distillation_loss_per_example):
      with self.subTest(fn=fn.__name__):
        # One teacher's [B, K] logits, not a stack.
        with self.assertRaisesRegex(ValueError, shape_error):
          fn(student, teacher, 2.0)
        # The transposed stack [M, B, K] (M = 3 != B = 6).
        with self.assertRaisesRegex(ValueError, shape_error):
          fn(student, np.stack([teacher] * 3), 2.0)
        # Another number of classes.
        with self.assertRaisesRegex(ValueError, shape_error):
          fn(student, np.stack([teacher[:, :5]] * 3, axis=1), 2.0)
    for bad in ([1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]):
      with self.assertRaisesRegex(ValueError, 'teacher_weights'):
        multi_teacher.multi_teacher_distillation_loss(
            student, np.stack([teacher] * 3, axis=1), 2.0,
            teacher_weights=bad)


# --- FitNets hints. -----------------------------------------------------------


class HintTest(parameterized.TestCase):

  @parameterized.product(
      shape=((_BATCH, 8), (_BATCH, 4, 4, 3)), use_jit=(True, False))
  def test_reference_values(self, shape, use_jit):
    student, teacher = _normal(shape, 0), _normal(shape, 1)
    mask = _mask()
    per_example = _maybe_jit(fitnets.hint_loss_per_example, use_jit)(
        student, teacher)
    expected = _np_hint(student, teacher)
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    fn = _maybe_jit(lambda s, t: fitnets.hint_loss(s, t, weights=mask),
                    use_jit)
    value, aux = fn(student, teacher)
    np.testing.assert_allclose(
        value, _np_weighted_mean(expected, mask), rtol=1e-5)
    self.assertEqual(aux, {})

  def test_zero_when_equal_and_shape_errors(self):
    features = _normal((_BATCH, 4, 4, 3), 0)
    self.assertEqual(fitnets.hint_loss(features, features)[0], 0.0)
    with self.assertRaisesRegex(ValueError, r'\(6, 4, 4, 3\).*\(6, 4, 4, 2\)'):
      fitnets.hint_loss(features, features[..., :2])


# --- Attention transfer. ------------------------------------------------------


class AttentionTransferTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 4)
  def test_attention_map(self, p):
    features = _normal((_BATCH, 4, 3, 5), 0)
    maps = jax.jit(lambda a: at.attention_map(a, p=p))(features)
    self.assertEqual(maps.shape, (_BATCH, 12))
    np.testing.assert_allclose(
        maps, _np_attention_map(features, p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(maps, axis=1), 1.0, rtol=1e-6)
    # Invariant to the scale of the activations.
    for scale in (1e-3, 1e3):
      np.testing.assert_allclose(
          at.attention_map(scale * features, p=p), maps, rtol=1e-5,
          atol=1e-7)

  def test_zero_features(self):
    features = _normal((_BATCH, 4, 4, 3), 0)
    features[0] = 0.0
    maps, grad = jax.jit(lambda a: (at.attention_map(a), jax.grad(
        lambda a: at.attention_map(a).sum())(a)))(features)
    np.testing.assert_array_equal(maps[0], 0.0)
    self.assertTrue(np.all(np.isfinite(grad)))

  @parameterized.parameters(True, False)
  def test_reference_values(self, use_jit):
    # Student and teacher with different channel counts.
    student = _normal((_BATCH, 4, 4, 3), 0)
    teacher = _normal((_BATCH, 4, 4, 8), 1)
    mask = _mask()

    def fn(s, t):
      return (at.attention_transfer_loss_per_example(s, t),
              at.attention_transfer_loss(s, t, p=4, weights=mask))

    per_example, weighted = _maybe_jit(fn, use_jit)(student, teacher)
    np.testing.assert_allclose(
        per_example, _np_attention_transfer(student, teacher, 2), rtol=1e-5)
    np.testing.assert_allclose(
        weighted,
        _np_weighted_mean(_np_attention_transfer(student, teacher, 4), mask),
        rtol=1e-5)

  def test_hand_computed(self):
    # Two positions, one channel. Student [1, 0] -> map [1, 0]; teacher
    # [1, 1] -> [1, 1] / sqrt 2. Mean square of the difference:
    # ((1 - 1/sqrt 2)^2 + 1/2) / 2 = 1 - 1/sqrt 2 = 0.2928932.
    student = np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)
    teacher = np.ones((1, 1, 2, 1), np.float32)
    np.testing.assert_allclose(
        jax.jit(at.attention_transfer_loss)(student, teacher), 0.2928932,
        rtol=1e-6)

  def test_layers_sum(self):
    pairs = [(_normal((_BATCH, 8, 8, 3), 0), _normal((_BATCH, 8, 8, 6), 1)),
             (_normal((_BATCH, 4, 4, 5), 2), _normal((_BATCH, 4, 4, 10), 3))]
    mask = _mask()
    (total, aux), terms = jax.jit(lambda pairs: (
        at.multi_layer_attention_transfer_loss(pairs, weights=mask),
        [at.attention_transfer_loss(s, t, weights=mask)
         for s, t in pairs]))(pairs)
    np.testing.assert_allclose(total, sum(terms), rtol=1e-6)
    self.assertEqual(aux, {})
    self.assertGreater(min(terms), 0.0)

  def test_errors(self):
    student = np.zeros((_BATCH, 4, 4, 3), np.float32)
    teacher = np.zeros((_BATCH, 8, 8, 3), np.float32)
    with self.assertRaisesRegex(ValueError, r'\(6, 4, 4, 3\).*\(6, 8, 8, 3\)'):
      at.attention_transfer_loss(student, teacher)
    with self.assertRaisesRegex(
        ValueError, r'layer 1: .*\(6, 4, 4, 3\).*\(6, 8, 8, 3\)'):
      at.multi_layer_attention_transfer_loss(
          [(student, student), (student, teacher)])
    with self.assertRaisesRegex(ValueError, 'empty'):
      at.multi_layer_attention_transfer_loss([])
    with self.assertRaisesRegex(ValueError, 'p must be >= 1'):
      at.attention_map(student, p=0.5)


# --- Relational KD. -----------------------------------------------------------


@functools.cache
def _rkd_value_and_grad():
  """Jitted `(student, teacher) -> ((loss, aux), student grad)` of
  `rkd.rkd_loss`, shared by RKDTest's tests (one program per shape)."""
  return jax.jit(jax.value_and_grad(rkd.rkd_loss, has_aux=True))


class RKDTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_reference_values(self, use_jit):
    student = _normal((_BATCH, 5), 0)
    teacher = _normal((_BATCH, 7), 1)
    if use_jit:
      (loss, aux), _ = _rkd_value_and_grad()(student, teacher)
    else:
      loss, aux = rkd.rkd_loss(student, teacher)
      # The terms on their own are the aux entries.
      self.assertEqual(rkd.rkd_distance_loss(student, teacher),
                       aux['distance'])
      self.assertEqual(rkd.rkd_angle_loss(student, teacher), aux['angle'])
    distance, angle = _np_rkd(student, teacher)
    self.assertEqual(set(aux), {'distance', 'angle'})
    np.testing.assert_allclose(aux['distance'], distance, rtol=1e-5)
    np.testing.assert_allclose(aux['angle'], angle, rtol=1e-5)
    np.testing.assert_allclose(loss, 25 * distance + 50 * angle, rtol=1e-5)

  def test_hand_computed(self):
    # Teacher: a right isosceles triangle; student: an equilateral one.
    teacher = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    student = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(0.75)]],
                       np.float32)
    loss, aux = jax.jit(rkd.rkd_loss)(student, teacher)
    # Distances: teacher 1, 1, sqrt 2, mean mu = (2 + sqrt 2) / 3; potentials
    # 0.8786797, 0.8786797, 1.2426407. Student: all 1. Huber of the
    # differences 0.1213203 (twice), -0.2426407:
    #   (2 * 0.0073593 + 0.0294373) / 3 = 0.0147186.
    np.testing.assert_allclose(aux['distance'], 0.0147186, rtol=1e-5)
    # Angles: teacher cosines 0 (right angle), 0.7071068 (twice); student 0.5
    # everywhere. Huber: 0.125 and 0.0214466 (twice):
    #   (0.125 + 2 * 0.0214466) / 3 = 0.0559644.
    np.testing.assert_allclose(aux['angle'], 0.0559644, rtol=1e-5)
    # 25 * 0.0147186 + 50 * 0.0559644 = 0.3679656 + 2.7982203 = 3.1661860.
    np.testing.assert_allclose(loss, 3.1661860, rtol=1e-5)

  def test_invariants(self):
    student = _normal((_BATCH, 5), 0)
    teacher = _normal((_BATCH, 7), 1)
    rotation, _ = np.linalg.qr(_normal((5, 5), 2).astype(np.float64))
    rkd_loss = _rkd_value_and_grad()
    (_, aux), _ = rkd_loss(student, teacher)
    transformed = {
        'scaled_down': 0.01 * student,
        'scaled_up': 100.0 * student,
        'translated': student + 3.0,
        'rotated': (student @ rotation).astype(np.float32),
    }
    for name, moved in transformed.items():
      (_, moved_aux), _ = rkd_loss(moved, teacher)
      for term in ('distance', 'angle'):
        with self.subTest(transform=name, term=term):
          np.testing.assert_allclose(
              moved_aux[term], aux[term], rtol=1e-4, atol=1e-7)
    # Zero when the student's relations are the teacher's: here the teacher
    # is the student rotated into 7 dimensions, scaled and translated.
    embedding, _ = np.linalg.qr(_normal((7, 7), 4).astype(np.float64))
    embedded = (3.0 * student @ embedding[:5] + 1.0).astype(np.float32)
    (loss, _), _ = rkd_loss(student, embedded)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)

  def test_far_from_the_origin(self):
    # Post-ReLU features: a large common offset, small spread. The cosines
    # come from a Gram matrix; centring keeps its differences exact enough.
    spread = np.abs(_normal((_BATCH, 300), 3)) * 0.01
    student, teacher = spread + 50.0, spread[::-1] + 50.0
    _, aux = jax.jit(rkd.rkd_loss)(student, teacher)
    distance, angle = _np_rkd(student, teacher)
    np.testing.assert_allclose(aux['distance'], distance, rtol=1e-4)
    np.testing.assert_allclose(aux['angle'], angle, rtol=1e-4)

  def test_duplicate_examples_stay_finite(self):
    student = _normal((_BATCH, 5), 0)
    student[1] = student[0]
    teacher = _normal((_BATCH, 7), 1)
    (value, _), grad = _rkd_value_and_grad()(student, teacher)
    self.assertTrue(np.isfinite(value))
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_small_batches(self):
    # No pair at B = 1; at B = 2 the one distance normalises to 1 in both
    # networks; no triplet of distinct examples below B = 3: all give 0.
    for batch_size in (1, 2):
      student = _normal((batch_size, 5), 0)
      teacher = _normal((batch_size, 7), 1)
      (value, _), grad = _rkd_value_and_grad()(student, teacher)
      np.testing.assert_allclose(value, 0.0, atol=1e-7)
      # Zero up to float32 rounding of inputs of order 1.
      np.testing.assert_allclose(grad, 0.0, atol=2e-6)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'same batch size'):
      rkd.rkd_loss(np.zeros((4, 5)), np.zeros((3, 5)))
    with self.assertRaisesRegex(ValueError, r'\[B, D\]'):
      rkd.rkd_loss(np.zeros((4,)), np.zeros((4,)))
    with self.assertRaisesRegex(ValueError, 'angle_weight'):
      rkd.rkd_loss(np.zeros((4, 5)), np.zeros((4, 5)), angle_weight=-1.0)
    with self.assertRaisesRegex(ValueError, 'distance_weight'):
      rkd.rkd_loss(np.zeros((4, 5)), np.zeros((4, 5)), distance_weight=-1.0)


# --- Probabilistic knowledge transfer. ----------------------------------------


class PKTTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_reference_values(self, use_jit):
    student = _normal((_BATCH, 5), 0)
    teacher = _normal((_BATCH, 7), 1)
    keep = _mask().astype(bool)
    settings = [(eps, masked) for eps in (1e-7, 0.0)
                for masked in (False, True)]

    def fn(s, t):
      return [pkt.pkt_loss(s, t, eps=eps, weights=_mask() if masked else None)
              for eps, masked in settings]

    got = _maybe_jit(fn, use_jit)(student, teacher)
    for (eps, masked), (value, aux) in zip(settings, got):
      # Masked: the rows and columns of weight 0 dropped.
      rows = keep if masked else slice(None)
      with self.subTest(eps=eps, masked=masked):
        np.testing.assert_allclose(
            value, _np_pkt(student[rows], teacher[rows], eps), rtol=1e-5)
        self.assertEqual(aux, {})

  def test_invariants(self):
    student = _normal((_BATCH, 5), 0)
    teacher = _normal((_BATCH, 7), 1)
    pkt_loss = jax.jit(lambda s, t: pkt.pkt_loss(s, t)[0])
    value = pkt_loss(student, teacher)
    self.assertGreater(value, 0.0)
    for scale in (1e-3, 1e3):
      np.testing.assert_allclose(pkt_loss(scale * student, teacher), value,
                                 rtol=1e-5)
    np.testing.assert_allclose(pkt_loss(teacher, teacher), 0.0, atol=1e-7)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'same batch size'):
      pkt.pkt_loss(np.zeros((4, 5)), np.zeros((3, 5)))
    with self.assertRaisesRegex(ValueError, 'eps'):
      pkt.pkt_loss(np.zeros((4, 5)), np.zeros((4, 5)), eps=-1.0)


if __name__ == '__main__':
  absltest.main()
