"""Tests for `kd_jax.losses`, in the manner of optax's loss tests.

Expected values come from float64 NumPy references written from the formulas
(with their own log-sum-exp), from small cases worked out by hand, and from
invariants of the method, one of them (the temperature flattens the softmax)
as a randomized property test. Grids of temperatures and alphas are evaluated
in one vmapped call per test, and derivatives against finite differences from
one compiled program, so that few programs are compiled.
"""

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses

_FORMS = ('kl', 'cross_entropy')
_NUM_CLASSES = 10
# tests/test_methods.py's batch size: a run of both compiles each eager
# operation on [B, K] logits once.
_BATCH = 6
_TEMPERATURES = (0.5, 1.0, 4.0, 10.0)
_ALPHAS = (0.0, 0.1, 0.5, 1.0)


# --- float64 NumPy references, written from the formulas. -------------------


def _np_log_softmax(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_xlogy_sum(p, log_q):
  """`sum_k p_k log q_k` over the last axis, with 0 log 0 = 0."""
  with np.errstate(invalid='ignore'):  # 0 * -inf, discarded by `where`.
    return np.where(p > 0, p * log_q, 0.0).sum(axis=-1)


def _np_entropy(logits, temperature):
  log_p = _np_log_softmax(logits, temperature)
  return -_np_xlogy_sum(np.exp(log_p), log_p)


def _np_distillation(student, teacher, temperature, t2_scaling, form):
  """Per-example KL(p_t || p_s) or H(p_t, p_s) at temperature T."""
  log_s = _np_log_softmax(student, temperature)
  log_t = _np_log_softmax(teacher, temperature)
  cross_entropy = -_np_xlogy_sum(np.exp(log_t), log_s)
  if form == 'kl':
    loss = cross_entropy - _np_entropy(teacher, temperature)
  else:
    loss = cross_entropy
  return loss * temperature**2 if t2_scaling else loss


def _np_hard(logits, labels):
  log_p = _np_log_softmax(logits)
  labels = np.asarray(labels)
  if labels.ndim == log_p.ndim - 1:
    return -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
  return -(labels * log_p).sum(axis=-1)


def _np_weighted_mean(values, weights=None):
  if weights is None:
    return np.mean(values)
  weights = np.asarray(weights, np.float64)
  return (weights * values).sum() / weights.sum()


def _np_class_variance(logits, num_classes, temperature):
  """Variance across classes of `softmax(logits / T)`, to float64 rounding.

  Args:
    logits: `[N, C]`; row `n` has `num_classes[n]` classes, the rest of the
      row is ignored.
    num_classes: `[N]`.
    temperature: `[N]`.

  Returns:
    `[N]` variances `(1 / K) sum_k (p_k - 1 / K)^2`, from `K p_k - 1 =
    sum_j e_j (exp(d_kj) - 1) / sum_j e_j`, `e_j = exp((z_j - max z) / T)`,
    `d_kj = (z_k - z_j) / T`: an `expm1` where `|d_kj| < 1`, else `e_k - e_j`.
    Both are accurate where `p_k` is close to `1 / K`, where `p_k - 1 / K`
    would cancel.
  """
  logits = np.asarray(logits, np.float64)
  present = np.arange(logits.shape[1]) < np.asarray(num_classes)[:, None]
  logits = np.where(present, logits, 0.0)
  temperature = np.asarray(temperature, np.float64)[:, None]
  top = np.max(np.where(present, logits, -np.inf), axis=1, keepdims=True)
  e = np.where(present, np.exp((logits - top) / temperature), 0.0)
  d = (logits[:, :, None] - logits[:, None, :]) / temperature[..., None]
  with np.errstate(over='ignore', invalid='ignore'):
    terms = np.where(np.abs(d) < 1, e[:, None, :] * np.expm1(d),
                     e[:, :, None] - e[:, None, :])
  pairs = present[:, :, None] & present[:, None, :]
  centered = np.where(pairs, terms, 0.0).sum(axis=2) / e.sum(
      axis=1, keepdims=True)  # K p_k - 1.
  k = np.asarray(num_classes, np.float64)
  return np.where(present, centered**2, 0.0).sum(axis=1) / k**3


# --- helpers. -----------------------------------------------------------------


def _batch(batch_size=_BATCH, scale=3.0, seed=0):
  """Random float32 student and teacher logits `[B, K]`, labels, mask `[B]`."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, _NUM_CLASSES)
  student = (scale * rng.standard_normal(shape)).astype(np.float32)
  teacher = (scale * rng.standard_normal(shape)).astype(np.float32)
  labels = rng.integers(0, _NUM_CLASSES, batch_size).astype(np.int32)
  mask = (rng.uniform(size=batch_size) < 0.7).astype(np.float32)
  mask[0] = 1.0  # At least one real example.
  return student, teacher, labels, mask


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


def _grid():
  """Every (temperature, alpha) pair, as two float32 vectors."""
  temperatures, alphas = np.meshgrid(_TEMPERATURES, _ALPHAS, indexing='ij')
  return (temperatures.ravel().astype(np.float32),
          alphas.ravel().astype(np.float32))


class ReferenceValuesTest(parameterized.TestCase):
  """Values against the float64 NumPy references over a grid of settings."""

  # Eager execution compiles each operation for each new shape, so it runs
  # on one batch size only.
  @parameterized.parameters(
      dict(batch_size=1, use_jit=True),
      dict(batch_size=_BATCH, use_jit=True),
      dict(batch_size=32, use_jit=True),
      dict(batch_size=_BATCH, use_jit=False),
  )
  def test_kd_loss(self, batch_size, use_jit):
    student, teacher, labels, mask = _batch(batch_size)
    temperatures, alphas = _grid()
    settings = [(form, t2_scaling, masked)
                for form in _FORMS
                for t2_scaling in (True, False)
                for masked in (False, True)]

    # Every setting and every (temperature, alpha) in one program.
    def loss_at(temperature, alpha):
      return [
          losses.kd_loss(
              student, teacher, labels, alpha=alpha, temperature=temperature,
              t2_scaling=t2_scaling, form=form,
              weights=mask if masked else None)
          for form, t2_scaling, masked in settings
      ]

    if use_jit:
      got = jax.jit(jax.vmap(loss_at))(temperatures, alphas)
    else:  # One eager call per grid point, stacked like vmap's outputs.
      got = jax.tree.map(lambda *values: np.stack(values), *[
          loss_at(float(t), float(a)) for t, a in zip(temperatures, alphas)])

    for (form, t2_scaling, masked), (loss, aux) in zip(settings, got):
      weights = mask if masked else None
      hard = _np_weighted_mean(_np_hard(student, labels), weights)
      soft = np.array([
          _np_weighted_mean(
              _np_distillation(student, teacher, t, t2_scaling, form), weights)
          for t in temperatures.astype(np.float64)
      ])
      with self.subTest(form=form, t2_scaling=t2_scaling, masked=masked):
        np.testing.assert_allclose(aux['student_loss'], hard, rtol=1e-5)
        np.testing.assert_allclose(
            aux['distillation_loss'], soft, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            loss, alphas * hard + (1 - alphas) * soft, rtol=1e-4, atol=1e-5)

  @parameterized.product(
      form=_FORMS, t2_scaling=(True, False), use_jit=(False, True))
  def test_distillation_per_example_with_batch_axes(self, form, t2_scaling,
                                                    use_jit):
    student, teacher, _, _ = _batch(12)
    student = student.reshape(3, 4, _NUM_CLASSES)
    teacher = teacher.reshape(3, 4, _NUM_CLASSES)
    fn = functools.partial(
        losses.distillation_loss_per_example, t2_scaling=t2_scaling, form=form)
    got = _maybe_jit(fn, use_jit)(student, teacher, 4.0)
    self.assertEqual(got.shape, (3, 4))
    np.testing.assert_allclose(
        got, _np_distillation(student, teacher, 4.0, t2_scaling, form),
        rtol=1e-4, atol=1e-5)

  @parameterized.parameters(False, True)
  def test_tempered_softmax(self, use_jit):
    logits, _, _, _ = _batch()
    for fn, ref in ((losses.tempered_log_softmax, _np_log_softmax),
                    (losses.tempered_softmax,
                     lambda x, t: np.exp(_np_log_softmax(x, t)))):
      got = _maybe_jit(fn, use_jit)(logits, 2.5)
      np.testing.assert_allclose(got, ref(logits, 2.5), rtol=1e-5, atol=1e-6)


class HandComputedTest(parameterized.TestCase):
  """Tiny cases worked out by hand."""

  # Student [0, 0] is uniform: p_s = [1/2, 1/2]. Teacher [2 ln 3, 0] at T = 2
  # is softmax([ln 3, 0]) = [3/4, 1/4].
  student = np.array([[0.0, 0.0]], np.float32)
  teacher = np.array([[2 * math.log(3.0), 0.0]], np.float32)

  @parameterized.product(use_jit=(False, True))
  def test_kl(self, use_jit):
    fn = _maybe_jit(
        functools.partial(losses.distillation_loss, t2_scaling=False), use_jit)
    # 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2
    #   = 0.3040988 - 0.1732868 = 0.1308120.
    np.testing.assert_allclose(
        fn(self.student, self.teacher, 2.0), 0.1308120, rtol=1e-5)

  @parameterized.product(use_jit=(False, True))
  def test_kl_t2_scaled(self, use_jit):
    fn = _maybe_jit(losses.distillation_loss, use_jit)
    # T^2 * 0.1308120 = 4 * 0.1308120 = 0.5232481.
    np.testing.assert_allclose(
        fn(self.student, self.teacher, 2.0), 0.5232481, rtol=1e-5)

  @parameterized.product(use_jit=(False, True))
  def test_cross_entropy(self, use_jit):
    fn = _maybe_jit(
        functools.partial(losses.distillation_loss, form='cross_entropy'),
        use_jit)
    # -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2 = 0.6931472; times T^2 = 4: 2.7725887.
    np.testing.assert_allclose(
        fn(self.student, self.teacher, 2.0), 2.7725887, rtol=1e-5)

  def test_mean_over_batch(self):
    student = np.concatenate([self.student, self.student])
    teacher = np.concatenate([self.teacher, self.student])
    # Row 2 has teacher == student, so KL = 0: mean = (0.1308120 + 0) / 2.
    np.testing.assert_allclose(
        losses.distillation_loss(student, teacher, 2.0, t2_scaling=False),
        0.0654060, rtol=1e-5)

  @parameterized.product(use_jit=(False, True))
  def test_hard_label_loss(self, use_jit):
    logits = np.array([[math.log(3.0), 0.0]] * 2, np.float32)
    fn = _maybe_jit(losses.hard_label_loss_per_example, use_jit)
    # softmax([ln 3, 0]) = [3/4, 1/4]:
    #   -ln(3/4) = 0.2876821, -ln(1/4) = 1.3862944.
    np.testing.assert_allclose(
        fn(logits, np.array([0, 1])), [0.2876821, 1.3862944], rtol=1e-5)

  @parameterized.product(use_jit=(False, True))
  def test_kd_loss(self, use_jit):
    fn = _maybe_jit(
        functools.partial(losses.kd_loss, alpha=0.1, temperature=2.0), use_jit)
    loss, aux = fn(self.student, self.teacher, np.array([0]))
    # hard = -ln(1/2) = 0.6931472; soft = 0.5232481 (test_kl_t2_scaled);
    # 0.1 * 0.6931472 + 0.9 * 0.5232481 = 0.0693147 + 0.4709233 = 0.5402380.
    np.testing.assert_allclose(aux['student_loss'], 0.6931472, rtol=1e-5)
    np.testing.assert_allclose(aux['distillation_loss'], 0.5232481, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5402380, rtol=1e-5)

  def test_gradient(self):
    # d/ds [T^2 KL] = T^2 (p_s - p_t) / T = 2 ([1/2, 1/2] - [3/4, 1/4])
    #   = [-0.5, 0.5].
    grad = jax.jit(jax.grad(losses.distillation_loss))(
        self.student, self.teacher, 2.0)
    np.testing.assert_allclose(grad, [[-0.5, 0.5]], rtol=1e-5)

  def test_tempered_softmax(self):
    # [2 ln 2, 0] / 2 = [ln 2, 0]: softmax = [2, 1] / 3.
    np.testing.assert_allclose(
        losses.tempered_softmax(np.array([2 * math.log(2.0), 0.0]), 2.0),
        [2 / 3, 1 / 3], rtol=1e-6)

  @parameterized.parameters(
      # (1 + 2) / 2 = 1.5
      ([1.0, 1.0, 0.0, 0.0], 1.5),
      # (1 * 1 + 3 * 2) / (1 + 3) = 7 / 4 = 1.75
      ([1.0, 3.0, 0.0, 0.0], 1.75),
      # No weight at all: 0 by convention.
      ([0.0, 0.0, 0.0, 0.0], 0.0),
      # No weights: (1 + 2 + 3 + 4) / 4 = 2.5
      (None, 2.5),
  )
  def test_weighted_mean(self, weights, expected):
    values = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    self.assertEqual(float(losses.weighted_mean(values, weights)), expected)


class InvariantsTest(parameterized.TestCase):

  @parameterized.parameters(*_FORMS)
  def test_identical_distributions(self, form):
    logits, _, _, _ = _batch()
    temperatures = np.array(_TEMPERATURES, np.float32)
    got = jax.vmap(
        lambda t: losses.distillation_loss_per_example(
            logits, logits, t, t2_scaling=False, form=form))(temperatures)
    # KL(p, p) = 0 and H(p, p) = H(p).
    for i, temperature in enumerate(temperatures):
      expected = 0.0 if form == 'kl' else _np_entropy(logits, temperature)
      np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(True, False)
  def test_cross_entropy_is_kl_plus_teacher_entropy(self, t2_scaling):
    student, teacher, _, _ = _batch()

    def loss(form, s, temperature):
      return losses.distillation_loss(
          s, teacher, temperature, t2_scaling=t2_scaling, form=form)

    # One program for both forms; the temperature is traced.
    @jax.jit
    def values_and_grads(temperature):
      return [jax.value_and_grad(functools.partial(loss, form))(
          student, temperature) for form in ('kl', 'cross_entropy')]

    for temperature in _TEMPERATURES:
      (kl, kl_grad), (ce, ce_grad) = values_and_grads(temperature)
      entropy = np.mean(_np_entropy(teacher, temperature))
      scale = temperature**2 if t2_scaling else 1.0
      np.testing.assert_allclose(ce - kl, scale * entropy, rtol=1e-4)
      np.testing.assert_allclose(ce_grad, kl_grad, rtol=1e-5, atol=1e-7)

  @parameterized.parameters(*_FORMS)
  def test_alpha_one_is_plain_cross_entropy(self, form):
    student, teacher, labels, _ = _batch()
    loss, aux = losses.kd_loss(
        student, teacher, labels, alpha=1.0, temperature=4.0, form=form)
    np.testing.assert_allclose(
        loss, np.mean(_np_hard(student, labels)), rtol=1e-6)
    self.assertEqual(loss, aux['student_loss'])
    self.assertEqual(loss, losses.hard_label_loss(student, labels))

  @parameterized.parameters(*_FORMS)
  def test_alpha_zero_is_pure_distillation(self, form):
    student, teacher, labels, _ = _batch()
    loss, aux = losses.kd_loss(
        student, teacher, labels, alpha=0.0, temperature=4.0, form=form)
    self.assertEqual(loss, aux['distillation_loss'])
    self.assertEqual(
        loss, losses.distillation_loss(student, teacher, 4.0, form=form))

  @parameterized.parameters(*_FORMS)
  def test_t2_scaling_multiplies_by_t_squared(self, form):
    student, teacher, _, _ = _batch()
    for temperature in (0.05, 0.5, 2.0, 10.0, 100.0):
      scaled, unscaled = (
          losses.distillation_loss_per_example(
              student, teacher, temperature, t2_scaling=t2, form=form)
          for t2 in (True, False))
      np.testing.assert_array_equal(
          scaled, unscaled * np.float32(temperature**2))

  @parameterized.product(form=_FORMS, t2_scaling=(True, False))
  def test_one_hot_teacher_at_t1_gives_cross_entropy(self, form, t2_scaling):
    student, _, labels, _ = _batch()
    # exp(-50) ~ 2e-22: the teacher is one-hot up to float32 rounding.
    teacher = 50.0 * np.eye(_NUM_CLASSES, dtype=np.float32)[labels]
    np.testing.assert_allclose(
        losses.distillation_loss(
            student, teacher, 1.0, t2_scaling=t2_scaling, form=form),
        losses.hard_label_loss(student, labels), rtol=1e-6)

  def test_tempered_softmax_flattens_with_same_argmax(self):
    logits, _, _, _ = _batch()
    temperatures = (0.05, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0)
    entropies = []
    for temperature in temperatures:
      probs = losses.tempered_softmax(logits, temperature)
      np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
      np.testing.assert_array_equal(
          probs.argmax(-1), logits.argmax(-1))
      entropies.append(_np_entropy(logits, temperature))
    self.assertTrue(np.all(np.diff(entropies, axis=0) > 0))
    np.testing.assert_allclose(entropies[-1], np.log(_NUM_CLASSES), rtol=1e-2)

  def test_all_ones_weights_equal_plain_mean(self):
    student, teacher, labels, _ = _batch()
    ones = np.ones(_BATCH, np.float32)
    plain_loss, plain_aux = losses.kd_loss(
        student, teacher, labels, alpha=0.1, temperature=4.0)
    loss, aux = losses.kd_loss(
        student, teacher, labels, alpha=0.1, temperature=4.0, weights=ones)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    for key in plain_aux:
      np.testing.assert_allclose(aux[key], plain_aux[key], rtol=1e-6)

  def test_padded_rows_count_for_nothing(self):
    student, teacher, labels, _ = _batch()
    keep = np.array([1, 0, 1, 1, 0, 1], bool)

    # kd_loss (both forms), and the hard and soft losses on their own.
    def values_and_grads(s, t, y, w):
      def kd(s, form):
        return losses.kd_loss(
            s, t, y, alpha=0.3, temperature=4.0, form=form, weights=w)

      results = {form: jax.value_and_grad(kd, has_aux=True)(s, form)
                 for form in _FORMS}
      results['hard'] = jax.value_and_grad(
          lambda s: losses.hard_label_loss(s, y, weights=w))(s)
      results['soft'] = jax.value_and_grad(
          lambda s: losses.distillation_loss(s, t, 4.0, weights=w))(s)
      return results

    dropped = jax.jit(values_and_grads)(
        student[keep], teacher[keep], labels[keep], None)
    # Padded rows hold garbage in the student and the teacher logits (NaN,
    # infinities, huge values) and out-of-range labels (-1, the usual
    # sentinel, and K + 3), which pass unchecked inside jit.
    garbage = ((np.nan, np.nan), (np.inf, -np.inf), (-np.inf, np.nan),
               (1e4, -1e4))
    students = np.stack([student] * len(garbage))
    teachers = np.stack([teacher] * len(garbage))
    padded_labels = np.stack([labels] * len(garbage))
    for i, (in_student, in_teacher) in enumerate(garbage):
      students[i, ~keep] = in_student
      # Odd elements keep the real logit of class 0: partial garbage.
      teachers[i, ~keep, i % 2:] = in_teacher
      padded_labels[i, ~keep] = -1 if i % 2 else _NUM_CLASSES + 3
    padded = jax.jit(jax.vmap(values_and_grads, in_axes=(0, 0, 0, None)))(
        students, teachers, padded_labels, keep.astype(np.float32))
    for name in dropped:
      dropped_value, dropped_grad = dropped[name]
      padded_value, padded_grad = padded[name]
      with self.subTest(loss=name):
        for got, expected in zip(jax.tree.leaves(padded_value),
                                 jax.tree.leaves(dropped_value)):
          np.testing.assert_allclose(
              got, np.full(len(garbage), expected), rtol=1e-6)
        self.assertFalse(np.any(np.isnan(padded_grad)))
        np.testing.assert_allclose(
            padded_grad[:, keep], np.stack([dropped_grad] * len(garbage)),
            rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(padded_grad[:, ~keep], 0.0)

  def test_zero_weights_give_zero_and_finite_gradient(self):
    student, teacher, labels, _ = _batch()
    zeros = np.zeros(_BATCH, np.float32)

    def loss(s):
      return losses.kd_loss(
          s, teacher, labels, alpha=0.5, temperature=4.0, weights=zeros)[0]

    value, grad = jax.jit(jax.value_and_grad(loss))(student)
    self.assertEqual(value, 0.0)
    np.testing.assert_array_equal(grad, 0.0)


class TemperatureTest(absltest.TestCase):
  """The tutorial's claim, as a randomized property test."""

  def test_variance_across_classes_never_grows_with_temperature(self):
    # Raising T from T1 to T2 >= T1 >= 1 flattens softmax(x / T): its
    # variance across classes does not grow, for logits of any sign and
    # scale. (d/d(1/T) sum_k p_k^2 = 2 Cov_p(p_k, x_k) >= 0, p_k increasing
    # in x_k.) Rows of up to 50 classes, padded with -inf (probability 0),
    # so that one call covers every K.
    rng = np.random.default_rng(0)
    n, max_classes = 2000, 50
    num_classes = rng.integers(2, max_classes + 1, n)
    scales = 10.0**rng.uniform(-3, 3, n)
    shifts = rng.choice([-1.0, 1.0], n) * 10.0**rng.uniform(-3, 3, n)
    shifts[rng.uniform(size=n) < 0.1] = 0.0
    logits = shifts[:, None] + scales[:, None] * rng.standard_normal(
        (n, max_classes))
    ties = rng.uniform(size=n) < 0.1  # Integer logits: tied classes.
    logits[ties] = np.round(logits[ties])
    logits = logits.astype(np.float32)
    present = np.arange(max_classes) < num_classes[:, None]
    low, high = np.sort(rng.uniform(1.0, 100.0, (2, n)), axis=0)
    close = rng.uniform(size=n) < 0.3  # Temperatures a hair apart.
    high[close] = low[close] * (1.0 + 10.0**rng.uniform(-6, -2, close.sum()))
    temperatures = np.stack([low, high]).astype(np.float32)  # [2, N]
    self.assertTrue(np.all(temperatures[0] < temperatures[1]))

    probs = np.asarray(losses.tempered_softmax(
        np.where(present, logits, -np.inf), temperatures[..., None]),
                       np.float64)  # [2, N, C]
    np.testing.assert_array_equal(probs[:, ~present], 0.0)
    k = num_classes.astype(np.float64)
    variance = np.where(present, (probs - 1.0 / k[:, None])**2,
                        0.0).sum(axis=-1) / k
    reference = np.stack([_np_class_variance(logits, num_classes, t)
                          for t in temperatures])

    # The float64 reference: only float64 rounding.
    np.testing.assert_array_less(
        reference[1], reference[0] * (1 + 1e-12) + 1e-300)
    # The library's float32 probabilities: |error| <= r p_k, with r a few
    # float32 ulps times the size of the logits over T (which x / T rounds
    # at) and the number of classes (the sum). The variance then errs by at
    # most (2 / K) sum_k |p_k - 1 / K| r p_k + (1 / K) sum_k (r p_k)^2.
    reference_probs = np.exp(np.stack([
        _np_log_softmax(np.where(present, logits, -np.inf), t[:, None])
        for t in temperatures.astype(np.float64)]))
    size = np.max(np.abs(np.where(present, logits, 0.0)), axis=1)
    r = np.finfo(np.float32).eps * (4 + k + 4 * size / temperatures)
    slack = (2 * np.sum(np.abs(reference_probs - 1 / k[:, None])
                        * reference_probs, axis=-1) * r
             + np.sum(reference_probs**2, axis=-1) * r**2) / k + 1e-30
    np.testing.assert_array_less(np.abs(variance - reference), slack)
    np.testing.assert_array_less(variance[1], variance[0] + slack.sum(0))
    # Not a vacuous claim: the variance fell by more than the slack in most
    # draws.
    self.assertGreater(np.mean(variance[0] - variance[1] > slack.sum(0)),
                       0.5)


class GradientsTest(parameterized.TestCase):

  def test_check_grads(self):
    student, teacher, labels, mask = (
        x.astype(np.float64) if x.dtype == np.float32 else x
        for x in _batch(3, scale=1.0))
    soft_labels = np.exp(_np_log_softmax(teacher, 3.0))

    # One function through every path (both forms, integer and soft labels,
    # weights, two temperatures) keeps the number of compilations low.
    def loss(s):
      kl, _ = losses.kd_loss(s, teacher, labels, alpha=0.3, temperature=2.0,
                             form='kl', weights=mask)
      ce, _ = losses.kd_loss(s, teacher, soft_labels, alpha=0.6,
                             temperature=0.5, form='cross_entropy')
      return kl + ce

    # What `jax.test_util.check_grads(loss, order=2, modes=('fwd', 'rev'))`
    # checks, against central differences of the value and of the gradient
    # along random directions, from one compiled program (check_grads
    # compiles eight for the same checks).
    @jax.jit
    def derivatives(s, tangent, cotangent):
      value, grad = jax.value_and_grad(loss)(s)
      _, forward = jax.jvp(loss, (s,), (tangent,))  # Forward mode.
      # Second order, forward- and reverse-over-reverse.
      _, forward_over_reverse = jax.jvp(jax.grad(loss), (s,), (tangent,))
      _, grad_vjp = jax.vjp(jax.grad(loss), s)
      (reverse_over_reverse,) = grad_vjp(cotangent)
      return value, grad, forward, forward_over_reverse, reverse_over_reverse

    rng = np.random.default_rng(0)
    eps, tolerance = 1e-4, 1e-5  # check_grads' step and float64 tolerance.
    with jax.enable_x64(True):
      for _ in range(3):
        tangent, cotangent = rng.standard_normal((2,) + student.shape)
        _, grad, forward, forward_over_reverse, reverse_over_reverse = (
            derivatives(student, tangent, cotangent))
        self.assertEqual(grad.dtype, np.float64)
        value_plus, grad_plus, *_ = derivatives(
            student + eps * tangent, tangent, cotangent)
        value_minus, grad_minus, *_ = derivatives(
            student - eps * tangent, tangent, cotangent)
        value_difference = (value_plus - value_minus) / (2 * eps)
        grad_difference = (grad_plus - grad_minus) / (2 * eps)
        for got, expected in (
            (forward, value_difference),
            (np.vdot(grad, tangent), value_difference),
            (forward_over_reverse, grad_difference),
            (np.vdot(reverse_over_reverse, tangent),
             np.vdot(cotangent, grad_difference))):
          np.testing.assert_allclose(got, expected, rtol=tolerance,
                                     atol=tolerance)

  @parameterized.product(form=_FORMS, use_jit=(False, True))
  def test_no_gradient_reaches_teacher(self, form, use_jit):
    student, teacher, labels, _ = _batch()

    def loss(t):
      return losses.kd_loss(
          student, t, labels, alpha=0.1, temperature=4.0, form=form)[0]

    grad = _maybe_jit(jax.grad(loss), use_jit)(teacher)
    _, tangent = jax.jvp(loss, (teacher,), (np.ones_like(teacher),))
    np.testing.assert_array_equal(grad, 0.0)
    self.assertEqual(tangent, 0.0)

  @parameterized.parameters(True, False)
  def test_student_gradient_closed_form(self, t2_scaling):
    student, teacher, _, _ = _batch()
    temperature = 4.0
    grad_fn = jax.jit(jax.grad(losses.distillation_loss),
                      static_argnames='t2_scaling')
    grad = grad_fn(student, teacher, temperature, t2_scaling=t2_scaling)
    # d/ds KL(p_t || p_s) = (p_s - p_t) / T per example; the mean adds 1 / B.
    diff = (np.exp(_np_log_softmax(student, temperature))
            - np.exp(_np_log_softmax(teacher, temperature)))
    expected = diff / temperature / len(student)
    if t2_scaling:
      expected *= temperature**2
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


class StabilityTest(parameterized.TestCase):

  # Compiled only: the eager path runs the same operations, and
  # TransformsTest checks that jit and eager agree.
  @parameterized.parameters(*_FORMS)
  def test_extreme_logits(self, form):
    temperatures = np.array([0.05, 1.0, 100.0], np.float32)
    rng = np.random.default_rng(1)
    student = rng.uniform(-1e4, 1e4, (_BATCH, _NUM_CLASSES)).astype(np.float32)
    teacher = rng.uniform(-1e4, 1e4, (_BATCH, _NUM_CLASSES)).astype(np.float32)
    student[0] = teacher[0] = 0.0
    student[1, :] = -1e4
    student[1, 0] = 1e4
    teacher[1, :] = -1e4
    teacher[1, 1] = 1e4  # Maximal disagreement with the student.
    teacher[2] = student[2]
    labels = np.arange(_BATCH)
    for temperature in temperatures:
      # The teacher's tempered distribution has exact zeros (exp underflow).
      self.assertTrue(
          np.any(losses.tempered_softmax(teacher, temperature) == 0.0))

    def loss(s, temperature):
      return losses.kd_loss(
          s, teacher, labels, alpha=0.1, temperature=temperature, form=form)

    def evaluate(temperature):
      (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(
          student, temperature)
      # Hessian-vector product: second derivatives stay finite too.
      _, hvp = jax.jvp(lambda s: jax.grad(loss, has_aux=True)(s, temperature),
                       (student,), (np.ones_like(student),))
      return value, aux, grad, hvp[0]

    value, aux, grad, hvp = jax.jit(jax.vmap(evaluate))(temperatures)
    for array in (value, grad, hvp):
      self.assertTrue(np.all(np.isfinite(array)))
    for i, temperature in enumerate(temperatures):
      np.testing.assert_allclose(
          aux['distillation_loss'][i],
          np.mean(_np_distillation(student, teacher, float(temperature), True,
                                   form)),
          rtol=1e-4)
      np.testing.assert_allclose(
          aux['student_loss'][i], np.mean(_np_hard(student, labels)),
          rtol=1e-5)

  @parameterized.parameters(*_FORMS)
  def test_teacher_with_masked_classes(self, form):
    # A -inf teacher logit is a class of probability exactly 0: 0 log 0 = 0.
    student, teacher, _, _ = _batch()
    teacher[:, :3] = -np.inf
    value_and_grad = jax.jit(jax.value_and_grad(losses.distillation_loss),
                             static_argnames='form')
    value, grad = value_and_grad(student, teacher, 2.0, form=form)
    self.assertTrue(np.isfinite(value))
    self.assertTrue(np.all(np.isfinite(grad)))
    np.testing.assert_allclose(
        value, np.mean(_np_distillation(student, teacher, 2.0, True, form)),
        rtol=1e-5)

  def test_half_precision_logits_are_upcast(self):
    student, teacher, labels, _ = _batch()
    student, teacher = (
        jnp.asarray(x, jnp.bfloat16) for x in (student, teacher))
    loss, _ = losses.kd_loss(
        student, teacher, labels, alpha=0.1, temperature=4.0)
    self.assertEqual(loss.dtype, jnp.float32)
    # As accurate as float32 on the same (bfloat16-rounded) logits.
    student, teacher = (np.asarray(x, np.float32) for x in (student, teacher))
    expected = (0.1 * np.mean(_np_hard(student, labels)) + 0.9 * np.mean(
        _np_distillation(student, teacher, 4.0, True, 'kl')))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


class TransformsTest(parameterized.TestCase):

  @parameterized.parameters(*_FORMS)
  def test_jit_equals_no_jit(self, form):
    student, teacher, labels, mask = _batch()

    def loss(s, temperature):
      return losses.kd_loss(
          s, teacher, labels, alpha=0.1, temperature=temperature, form=form,
          weights=mask)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (value, aux), grad = grad_fn(student, 4.0)
    (jit_value, jit_aux), jit_grad = jax.jit(grad_fn)(student, 4.0)
    np.testing.assert_allclose(jit_value, value, rtol=1e-6)
    np.testing.assert_allclose(jit_grad, grad, rtol=1e-5, atol=1e-8)
    for key in aux:
      np.testing.assert_allclose(jit_aux[key], aux[key], rtol=1e-6)

  @parameterized.parameters(*_FORMS)
  def test_vmap_over_leading_axis(self, form):
    student, teacher, labels, mask = _batch(2 * _BATCH)
    student, teacher = (
        x.reshape(2, _BATCH, _NUM_CLASSES) for x in (student, teacher))
    labels, mask = labels.reshape(2, _BATCH), mask.reshape(2, _BATCH)

    def loss(s, t, y, w):
      return losses.kd_loss(
          s, t, y, alpha=0.1, temperature=4.0, form=form, weights=w)

    batched_loss, batched_aux = jax.jit(jax.vmap(loss))(
        student, teacher, labels, mask)
    self.assertEqual(batched_loss.shape, (2,))
    for i in range(2):
      loss_i, aux_i = loss(student[i], teacher[i], labels[i], mask[i])
      np.testing.assert_allclose(batched_loss[i], loss_i, rtol=1e-6)
      for key in aux_i:
        np.testing.assert_allclose(batched_aux[key][i], aux_i[key], rtol=1e-6)


class LabelsTest(parameterized.TestCase):

  @parameterized.parameters(-1, _NUM_CLASSES)
  def test_ids_outside_the_classes_raise(self, bad_id):
    # -1 does not count from the end: where labels are concrete (outside
    # jit), any id outside [0, K) is an error that names the range.
    logits, teacher, labels, mask = _batch()
    labels[0] = bad_id  # A row of weight 1 in `mask`.
    calls = {
        'hard_label_loss_per_example': lambda: (
            losses.hard_label_loss_per_example(logits, labels)),
        'hard_label_loss': lambda: losses.hard_label_loss(logits, labels),
        'hard_label_loss with weights': lambda: losses.hard_label_loss(
            logits, labels, weights=np.ones(_BATCH, np.float32)),
        'kd_loss': lambda: losses.kd_loss(
            logits, teacher, labels, alpha=0.1, temperature=2.0,
            weights=mask),
    }
    for name, call in calls.items():
      with self.subTest(call=name):
        with self.assertRaisesRegex(
            ValueError, r'labels must be class ids in \[0, 10\)'):
          call()

  @parameterized.parameters(False, True)
  def test_integer_and_one_hot_labels_agree(self, use_jit):
    logits, _, labels, mask = _batch()
    one_hot = np.eye(_NUM_CLASSES, dtype=np.float32)[labels]
    fn = _maybe_jit(losses.hard_label_loss_per_example, use_jit)
    np.testing.assert_allclose(fn(logits, labels), fn(logits, one_hot),
                               rtol=1e-6)
    np.testing.assert_allclose(
        losses.hard_label_loss(logits, labels, weights=mask),
        losses.hard_label_loss(logits, one_hot, weights=mask), rtol=1e-6)

  def test_soft_labels(self):
    logits, teacher, _, _ = _batch()
    soft = np.exp(_np_log_softmax(teacher)).astype(np.float32)
    np.testing.assert_allclose(
        losses.hard_label_loss_per_example(logits, soft),
        _np_hard(logits, soft), rtol=1e-5)

  @parameterized.named_parameters(
      ('wrong_ndim', np.zeros((_BATCH, 2, 10), np.float32)),
      ('wrong_shape', np.zeros((_BATCH - 1,), np.int32)),
      ('float_class_ids', np.zeros((_BATCH,), np.float32)),
  )
  def test_bad_labels_raise(self, labels):
    logits, _, _, _ = _batch()
    with self.assertRaises(ValueError):
      losses.hard_label_loss(logits, labels)


class ErrorsTest(parameterized.TestCase):

  def test_forms_dict(self):
    self.assertContainsSubset(_FORMS, losses.DISTILLATION_FORMS)
    student, teacher, _, _ = _batch()
    for form in losses.DISTILLATION_FORMS:
      loss = losses.distillation_loss_per_example(
          student, teacher, 2.0, form=form)
      self.assertEqual(loss.shape, (_BATCH,))

  def test_unknown_form_raises(self):
    student, teacher, labels, _ = _batch()
    calls = (
        lambda: losses.distillation_loss_per_example(
            student, teacher, 2.0, form='nope'),
        lambda: losses.distillation_loss(student, teacher, 2.0, form='nope'),
        lambda: losses.kd_loss(student, teacher, labels, alpha=0.1,
                               temperature=2.0, form='nope'),
    )
    for call in calls:
      with self.assertRaisesRegex(ValueError, r"'nope'.*'cross_entropy', 'kl'"):
        call()

  @parameterized.parameters(0.0, -1.0, float('nan'))
  def test_bad_temperature_raises(self, temperature):
    student, teacher, _, _ = _batch()
    with self.assertRaisesRegex(ValueError, 'temperature'):
      losses.distillation_loss(student, teacher, temperature)

  @parameterized.parameters(-0.1, 1.5)
  def test_bad_alpha_raises(self, alpha):
    student, teacher, labels, _ = _batch()
    with self.assertRaisesRegex(ValueError, 'alpha'):
      losses.kd_loss(student, teacher, labels, alpha=alpha, temperature=2.0)

  def test_mismatched_logits_raise(self):
    student, teacher, _, _ = _batch()
    with self.assertRaisesRegex(ValueError, 'same shape'):
      losses.distillation_loss(student, teacher[:, :5], 2.0)


if __name__ == '__main__':
  absltest.main()
