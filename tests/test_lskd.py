"""Tests for `kd_jax.methods.lskd` (logit standardisation, Sun et al., CVPR
2024) and the `logit_standardization` switch of kd, dkd and multi_teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax import methods
from kd_jax.methods import dkd
from kd_jax.methods import kd
from kd_jax.methods import lskd
from kd_jax.methods import multi_teacher
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import term_batch
from method_checks import term_value_and_grads

_MASK = np.array([1, 1, 0, 1, 0, 1], np.float32)
_jit_loss = jax.jit(lskd.lskd_loss, static_argnames=('temperature',))


# --- float64 NumPy reference, written from the paper's equations. ------------


def _np_zscore(logits, eps=1e-7):
  """`(z - mean) / (std + eps)` per row, with the sample std (ddof 1) of the
  official code (torch's `std`)."""
  z = np.asarray(logits, np.float64)
  mean = z.mean(axis=-1, keepdims=True)
  std = z.std(axis=-1, ddof=1, keepdims=True)
  return (z - mean) / (std + eps)


def _np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_lskd(student, teacher, temperature, keep=None):
  """`T^2 KL(softmax(Z(t) / T) || softmax(Z(s) / T))`, mean over `keep`."""
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  log_s = _np_log_softmax(_np_zscore(student) / temperature)
  log_t = _np_log_softmax(_np_zscore(teacher) / temperature)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)
  return temperature**2 * kl.mean()


def _logits(seed=0, shape=(6, 7), scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal((2,) + shape)).astype(np.float32)


# --- the standardisation and the loss. ----------------------------------------


def test_standardized_logits():
  logits, _ = _logits()
  standardize = jax.jit(losses.standardize_logits)
  z = standardize(logits)
  np.testing.assert_allclose(z, _np_zscore(logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.std(z, axis=-1, ddof=1), 1.0, rtol=1e-5)
  # A constant row becomes zeros, with finite gradients.
  constant = jnp.full((2, 5), 3.0)
  np.testing.assert_array_equal(standardize(constant), 0.0)
  grad = jax.jit(jax.grad(lambda z: standardize(z)[:, 0].sum()))(constant)
  assert np.all(np.isfinite(grad))
  with pytest.raises(ValueError, match='K >= 2'):
    losses.standardize_logits(jnp.zeros((3, 1)))


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  student, teacher = _logits()
  loss = _jit_loss if jit else lskd.lskd_loss
  value, aux = loss(student, teacher, temperature=2.0, weights=_MASK)
  assert aux == {}
  np.testing.assert_allclose(
      value, _np_lskd(student, teacher, 2.0, _MASK.astype(bool)), rtol=1e-5)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(
        loss(student, teacher, temperature=3.0)[0],
        _np_lskd(student, teacher, 3.0), rtol=1e-5)


def test_invariants():
  student, teacher = _logits(1)
  reference = _jit_loss(student, teacher, temperature=2.0)[0]
  assert reference > 0
  rng = np.random.default_rng(2)
  # Z removes each example's shift and (positive) scale, in either network:
  # the student need not match the teacher's logit range.
  scale = rng.uniform(0.2, 5.0, (6, 1)).astype(np.float32)
  shift = rng.standard_normal((6, 1)).astype(np.float32)
  for s, t in ((scale * student + shift, teacher),
               (student, 10 * scale * teacher - shift)):
    np.testing.assert_allclose(_jit_loss(s, t, temperature=2.0)[0],
                               reference, rtol=1e-4)
  # A student whose logits are an affine map of the teacher's: 0.
  np.testing.assert_allclose(
      _jit_loss(0.1 * teacher + 4.0, teacher, temperature=2.0)[0], 0.0,
      atol=1e-6)


def test_gradient_matches_finite_differences_in_float64():
  student, teacher = _logits(3)
  assert_gradient_matches_finite_differences(
      lambda s, t, w: lskd.lskd_loss(s, t, temperature=2.0, weights=w)[0],
      student, args=(teacher, _MASK), zero_rows=_MASK)


def test_padded_rows_holding_nan_reach_no_gradient():
  student = jnp.ones((3, 4)).at[0, 0].set(2.0).at[2].set(jnp.nan)
  teacher = jnp.arange(12.0).reshape(3, 4).at[2].set(jnp.inf)
  weights = jnp.array([1.0, 1.0, 0.0])
  value, grad = jax.jit(jax.value_and_grad(lambda s: lskd.lskd_loss(
      s, teacher, weights=weights)[0]))(student)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad)) and np.all(grad[2] == 0)


# --- the record, the switch on kd, dkd and multi_teacher, the configs. --------


def _term_value_and_grads(record, section, student, teacher, batch):
  """`(value, (student_grad, teacher_grad))` of the record's term."""
  (value, _), grads = term_value_and_grads(record.loss(section), student,
                                           teacher, batch)
  return value, grads


def test_term_is_kd_with_the_switch_and_the_teacher_gets_no_gradient():
  student, teacher = _logits(4)
  batch = term_batch(_MASK, np.arange(6, dtype=np.int32) % 7)
  value, (student_grad, teacher_grad) = _term_value_and_grads(
      lskd.METHOD, methods.default_section('lskd'), student, teacher, batch)
  np.testing.assert_allclose(
      value, _np_lskd(student, teacher, 2.0, _MASK.astype(bool)), rtol=1e-5)
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)
  # KD with the switch on, at the same temperature, is the same term.
  switched = methods.default_section('kd', temperature=2.0,
                                     logit_standardization=True)
  kd_value, (kd_grad, kd_teacher_grad) = _term_value_and_grads(
      kd.METHOD, switched, student, teacher, batch)
  np.testing.assert_allclose(kd_value, value, rtol=1e-6)
  np.testing.assert_allclose(kd_grad, student_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(kd_teacher_grad, 0.0)
  # Off (the default), KD is unchanged.
  plain = _term_value_and_grads(kd.METHOD, methods.default_section('kd'),
                                student, teacher, batch)[0]
  np.testing.assert_allclose(
      plain, losses.distillation_loss(student, teacher, 4.0, weights=_MASK),
      rtol=1e-6)


def test_the_switch_on_dkd_and_multi_teacher():
  student, teacher = _logits(5)
  labels = np.array([0, 3, 1, 6, 2, 5], np.int32)
  batch = term_batch(_MASK, labels, epoch=1)
  keep = _MASK.astype(bool)
  z_s, z_t = (np.where(keep[:, None], _np_zscore(x), 0.0).astype(np.float32)
              for x in (student, teacher))
  section = methods.default_section('dkd', warmup_epochs=0,
                                    logit_standardization=True)
  value, (_, teacher_grad) = _term_value_and_grads(
      dkd.METHOD, section, student, teacher, batch)
  np.testing.assert_allclose(value, jax.jit(dkd.dkd_loss)(
      z_s, z_t, labels, weights=_MASK)[0], rtol=1e-5)
  np.testing.assert_array_equal(teacher_grad, 0.0)
  # Several teachers: each teacher's logits are z-scored on their own.
  teachers = np.stack([teacher, 3 * teacher[::-1] + 1.0], axis=1)
  section = methods.default_section('multi_teacher',
                                    logit_standardization=True)
  value, (_, teacher_grad) = _term_value_and_grads(
      multi_teacher.METHOD, section, student, teachers, batch)
  expected = jax.jit(multi_teacher.multi_teacher_distillation_loss)(
      z_s, _np_zscore(teachers).astype(np.float32), 4.0, weights=_MASK)[0]
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_array_equal(teacher_grad, 0.0)


def test_defaults_and_configs():
  # The official CIFAR-100 KD+LS setting: 0.1 CE + 9 KD(Z(s), Z(t)), T = 2.
  assert dict(methods.default_section('lskd')) == {'weight': 9.0,
                                                   'temperature': 2.0}
  assert methods.reference('lskd') == 'Sun et al., CVPR 2024'
  for name in ('kd', 'dkd', 'multi_teacher'):
    assert methods.default_section(name).logit_standardization is False
  for config in quick_configs('lskd'):
    assert config.distill.ce.weight == 0.1
    assert methods.teacher_layers(config.distill) == ()  # Cacheable.
  config = cifar_pair_config('lskd')
  assert config.distill.method == 'lskd'
  assert dict(config.distill.lskd) == {'weight': 9.0, 'temperature': 2.0}
