"""Tests for `kd_jax.methods.cc` (correlation congruence, Peng et al., ICCV
2019)."""

import importlib
import math

import jax
import numpy as np
import pytest

from experiments import cc as cc_experiment
from kd_jax import errors
from kd_jax import methods
from kd_jax import objective
from kd_jax import validation
from kd_jax.methods import cc

_MASK = np.array([1, 1, 0, 1, 0, 1], np.float32)
_jit_loss = jax.jit(cc.cc_loss, static_argnames=('gamma', 'order'))


# --- float64 NumPy reference, written from the paper's equations. ------------


def _np_correlation(embeddings, gamma, order):
  """`[B, B]`: the P-order Taylor series of the Gaussian RBF kernel of the
  L2-normalised embeddings, `k(F_i, F_j) ~ sum_p exp(-2 gamma) (2 gamma)^p /
  p! (F_i . F_j)^p`, entry by entry."""
  f = np.asarray(embeddings, np.float64).reshape(len(embeddings), -1)
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  b = len(f)
  return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma)**p
                        / math.factorial(p) * (f[i] @ f[j])**p
                        for p in range(order + 1))
                    for j in range(b)] for i in range(b)])


def _np_cc(student, teacher, gamma=0.4, order=2, keep=None):
  """`(1 / n^2) ||psi(F_t) - psi(F_s)||_F^2` over the examples `keep`."""
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  difference = (_np_correlation(teacher, gamma, order)
                - _np_correlation(student, gamma, order))
  return np.sum(difference**2) / len(student)**2


def _embeddings(seed=0, student_shape=(6, 5), teacher_shape=(6, 8)):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(student_shape).astype(np.float32),
          rng.standard_normal(teacher_shape).astype(np.float32))


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  # Widths differ: the B x B matrices compare without any added module.
  student, teacher = _embeddings()
  loss = _jit_loss if jit else cc.cc_loss
  value, aux = loss(student, teacher, gamma=0.7, order=3, weights=_MASK)
  assert aux == {}
  np.testing.assert_allclose(
      value, _np_cc(student, teacher, 0.7, 3, _MASK.astype(bool)), rtol=1e-5)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(
        loss(student, teacher, weights=None)[0], _np_cc(student, teacher),
        rtol=1e-5)


def test_the_taylor_series_approximates_the_gaussian_kernel():
  student, _ = _embeddings(1)
  unit = student / np.linalg.norm(student, axis=1, keepdims=True)
  squared = np.sum((unit[:, None] - unit[None, :])**2, axis=-1)
  exact = np.exp(-0.4 * squared)
  approx = np.asarray(jax.jit(cc.correlation_matrix, static_argnames=(
      'gamma', 'order'))(student, gamma=0.4, order=12))
  np.testing.assert_allclose(approx, exact, rtol=1e-5)
  # P = 2 falls short by the series' tail, largest at u_i . u_j = 1 (the
  # diagonal): 1 - exp(-0.8) (1 + 0.8 + 0.8^2 / 2) = 0.0474.
  low = np.asarray(cc.correlation_matrix(student, gamma=0.4, order=2))
  np.testing.assert_allclose(low, _np_correlation(student, 0.4, 2),
                             rtol=1e-5)
  tail = 1 - math.exp(-0.8) * (1 + 0.8 + 0.32)
  np.testing.assert_allclose(np.diagonal(exact - low), tail, rtol=1e-4)
  assert np.all(exact - low <= tail + 1e-6)


def test_invariants():
  student, teacher = _embeddings(2)
  reference = _jit_loss(student, teacher, weights=None)[0]
  assert reference > 0
  rng = np.random.default_rng(3)
  scales = rng.uniform(0.1, 10.0, (6, 1)).astype(np.float32)
  order = rng.permutation(6)
  # The embeddings are normalised (a positive scale per example changes
  # nothing), and reordering the examples of both alike changes nothing.
  for s, t in ((scales * student, teacher), (student, 1e3 * teacher),
               (student[order], teacher[order])):
    np.testing.assert_allclose(_jit_loss(s, t, weights=None)[0], reference,
                               rtol=1e-5)
  # The same directions: 0.
  np.testing.assert_allclose(
      _jit_loss(student, 3.0 * scales * student, weights=None)[0], 0.0,
      atol=1e-7)


def test_errors():
  student, teacher = _embeddings()
  with pytest.raises(ValueError, match='gamma must be > 0'):
    cc.cc_loss(student, teacher, gamma=0.0)
  with pytest.raises(ValueError, match='order must be an integer >= 1'):
    cc.cc_loss(student, teacher, order=0)
  with pytest.raises(ValueError, match='same batch size'):
    cc.cc_loss(student, teacher[:4])


def test_gradient_matches_finite_differences_in_float64():
  student, teacher = (x.astype(np.float64) for x in _embeddings(4))
  weights = _MASK.astype(np.float64)
  rng = np.random.default_rng(0)
  eps = 1e-5
  with jax.enable_x64(True):
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda s: cc.cc_loss(s, teacher, weights=weights)[0]))
    _, grad = value_and_grad(student)
    assert grad.dtype == np.float64
    np.testing.assert_array_equal(grad[_MASK == 0], 0.0)
    for _ in range(3):
      direction = rng.standard_normal(student.shape)
      difference = (value_and_grad(student + eps * direction)[0]
                    - value_and_grad(student - eps * direction)[0])
      np.testing.assert_allclose(np.vdot(grad, direction),
                                 difference / (2 * eps), rtol=1e-6,
                                 atol=1e-10)


# --- the record, its term and its configs. ------------------------------------


def test_term_reads_the_last_layer_and_the_teacher_gets_no_gradient():
  section = methods.default_section('cc', student_layers='a,b',
                                    teacher_layers='x')
  assert cc.METHOD.student_layers(section) == ('b',)
  term = cc.METHOD.loss(section)
  rng = np.random.default_rng(5)
  student = rng.standard_normal((6, 2, 2, 3)).astype(np.float32)
  teacher = rng.standard_normal((6, 7)).astype(np.float32)
  logits = np.zeros((6, 10), np.float32)
  batch = {'label': np.zeros(6, np.int32), 'mask': _MASK}

  def evaluate(s, t):
    return term(objective.Outputs(logits, {'b': s}),
                objective.Outputs(logits, {'x': t}), batch)

  (value, aux), (student_grad, teacher_grad) = jax.jit(jax.value_and_grad(
      evaluate, argnums=(0, 1), has_aux=True))(student, teacher)
  keep = _MASK.astype(bool)
  np.testing.assert_allclose(value, _np_cc(student, teacher, keep=keep),
                             rtol=1e-5)
  assert aux == {}
  np.testing.assert_array_equal(teacher_grad, 0.0)
  assert np.all(np.isfinite(student_grad)) and np.any(student_grad != 0)
  np.testing.assert_array_equal(student_grad[~keep], 0.0)


def test_defaults_and_configs():
  section = methods.default_section('cc')
  assert (section.weight, section.gamma, section.order) == (0.02, 0.4, 2)
  assert methods.reference('cc') == 'Peng et al., ICCV 2019'
  for variant in ('quick', 'quick,strong'):
    config = cc_experiment.get_config(variant)
    validation.validate(config)
    assert config.distill.terms == 'ce,cc'
  config.distill.cc.order = 0
  with pytest.raises(errors.UserInputError,
                     match=r'config.distill.cc.order = 0'):
    validation.validate(config)
  # On a CIFAR pair, the pooled embedding of each network.
  pair = importlib.import_module('experiments.cifar100.resnet56_resnet20')
  config = pair.get_config('cc')
  validation.validate(config)
  assert config.distill.cc.student_layers == 'embedding'
  assert config.distill.cc.teacher_layers == 'embedding'
