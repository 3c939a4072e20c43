"""Tests for `kd_jax.methods.cc` (correlation congruence, Peng et al., ICCV
2019)."""

import math

import jax
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import cc
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_rejected
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import standard_normal
from method_checks import term_batch
from method_checks import term_value_and_grads

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
  return standard_normal(seed, student_shape, teacher_shape)


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
  student, teacher = _embeddings(4)
  assert_gradient_matches_finite_differences(
      lambda s, t, w: cc.cc_loss(s, t, weights=w)[0], student,
      args=(teacher, _MASK), zero_rows=_MASK)


# --- the record, its term and its configs. ------------------------------------


def test_term_reads_the_last_layer_and_the_teacher_gets_no_gradient():
  section = methods.default_section('cc', student_layers='a,b',
                                    teacher_layers='x')
  assert cc.METHOD.student_layers(section) == ('b',)
  rng = np.random.default_rng(5)
  student = rng.standard_normal((6, 2, 2, 3)).astype(np.float32)
  teacher = rng.standard_normal((6, 7)).astype(np.float32)
  (value, aux), (student_grad, teacher_grad) = term_value_and_grads(
      cc.METHOD.loss(section), {'b': student}, {'x': teacher},
      term_batch(_MASK))
  np.testing.assert_allclose(
      value, _np_cc(student, teacher, keep=_MASK.astype(bool)), rtol=1e-5)
  assert aux == {}
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)


def test_defaults_and_configs():
  section = methods.default_section('cc')
  assert (section.weight, section.gamma, section.order) == (0.02, 0.4, 2)
  assert methods.reference('cc') == 'Peng et al., ICCV 2019'
  _, config = quick_configs('cc')
  config.distill.cc.order = 0
  assert_rejected(config, r'config.distill.cc.order = 0')
  # On a CIFAR pair, the pooled embedding of each network.
  cifar_pair_config('cc', 'embedding', 'embedding')
