"""Tests for `kd_jax.methods.dist` (DIST, Huang et al., NeurIPS 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import dist
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import term_batch
from method_checks import term_value_and_grads

_MASK = np.array([1, 1, 0, 1, 1, 0, 1], np.float32)
# One compiled program per input shape and setting (eager mode compiles
# every operation on its own, several times the cost).
_jit_loss = jax.jit(dist.dist_loss,
                    static_argnames=('temperature', 'beta', 'gamma'))


# --- float64 NumPy reference, written from the paper's equations. ------------


def _np_softmax(logits, temperature):
  z = np.asarray(logits, np.float64) / temperature
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_pearson(a, b):
  """Pearson's r of two vectors; 0 if either is constant."""
  a, b = a - a.mean(), b - b.mean()
  denominator = np.sqrt((a @ a) * (b @ b))
  return 0.0 if denominator == 0 else (a @ b) / denominator


def _np_dist(student, teacher, temperature, beta, gamma, keep=None):
  """`(loss, T^2 inter, T^2 intra)` of the examples `keep` (default all)."""
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  y_s = _np_softmax(student, temperature)
  y_t = _np_softmax(teacher, temperature)
  batch, classes = y_s.shape
  inter = 1 - np.mean([_np_pearson(y_s[i], y_t[i]) for i in range(batch)])
  intra = 1 - np.mean([_np_pearson(y_s[:, k], y_t[:, k])
                       for k in range(classes)])
  scale = temperature**2
  return (scale * (beta * inter + gamma * intra), scale * inter,
          scale * intra)


def _logits(seed=0, shape=(7, 5), scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal((2,) + shape)).astype(np.float32)


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values_with_and_without_a_mask(jit):
  student, teacher = _logits()
  settings = dict(temperature=4.0, beta=2.0, gamma=1.5)

  loss = _jit_loss if jit else dist.dist_loss
  cases = [(_MASK, _MASK.astype(bool))]
  if jit:  # Eager mode once only: it is slow.
    cases.append((None, None))
  for weights, keep in cases:
    value, aux = loss(student, teacher, weights=weights, **settings)
    expected, inter, intra = _np_dist(student, teacher, keep=keep, **settings)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(aux['inter'], inter, rtol=1e-5)
    np.testing.assert_allclose(aux['intra'], intra, rtol=1e-5)


def test_hand_computed_and_invariants():
  # Two classes, the teacher's classes swapped: every row and every column
  # is perfectly anti-correlated, inter = intra = 1 - (-1) = 2.
  student = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  value, aux = _jit_loss(student, student[:, ::-1], temperature=2.0,
                         beta=1.0, gamma=3.0)
  np.testing.assert_allclose(aux['inter'], 4 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(aux['intra'], 4 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(value, 8.0 + 3 * 8.0, rtol=1e-6)

  logits, teacher = _logits(1)
  # Identical logits: every correlation is 1.
  np.testing.assert_allclose(_jit_loss(logits, logits)[0], 0.0, atol=1e-5)
  reference = _jit_loss(logits, teacher)[0]
  rng = np.random.default_rng(2)
  examples, classes = (rng.permutation(n) for n in logits.shape)
  # The relations do not depend on the order of examples or of classes
  # (permuted alike in both networks), nor on a per-example shift of the
  # logits (the softmax).
  shift = rng.standard_normal((logits.shape[0], 1)).astype(np.float32)
  for s, t in ((logits[examples], teacher[examples]),
               (logits[:, classes], teacher[:, classes]),
               (logits + 10 * shift, teacher - 5 * shift)):
    np.testing.assert_allclose(_jit_loss(s, t)[0], reference, rtol=1e-5)
  # One example: the columns are constant, intra is T^2 (official code too).
  one = _jit_loss(logits[:1], teacher[:1], temperature=3.0)[1]
  np.testing.assert_allclose(one['intra'], 9.0, rtol=1e-6)


def test_errors():
  logits = jnp.zeros((4, 5))
  with pytest.raises(ValueError, match='same shape'):
    dist.dist_loss(logits, jnp.zeros((4, 6)))
  with pytest.raises(ValueError, match=r'\[B, K\] with K >= 2'):
    dist.dist_loss(jnp.zeros((4, 1)), jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match='temperature must be > 0'):
    dist.dist_loss(logits, logits, temperature=0.0)
  with pytest.raises(ValueError, match='gamma must be >= 0'):
    dist.dist_loss(logits, logits, gamma=-1.0)


def test_gradient_matches_finite_differences_in_float64():
  student, teacher = _logits(3)
  assert_gradient_matches_finite_differences(
      lambda s, t, w: dist.dist_loss(s, t, temperature=2.0, weights=w)[0],
      student, args=(teacher, _MASK), zero_rows=_MASK, atol=1e-9)


# --- the record, its term and its configs. ------------------------------------


def test_term_is_the_loss_and_the_teacher_gets_no_gradient():
  term = dist.METHOD.loss(methods.default_section('dist'))
  student, teacher = _logits(4)
  (value, aux), (student_grad, teacher_grad) = term_value_and_grads(
      term, student, teacher, term_batch(_MASK))
  expected = _jit_loss(student, teacher, weights=_MASK, temperature=4.0,
                       beta=2.0, gamma=2.0)
  np.testing.assert_allclose(value, expected[0], rtol=1e-5)
  assert set(aux) == {'inter', 'intra'}
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)


def test_defaults_configs_and_cached_teacher_logits():
  section = methods.default_section('dist')
  # The official CIFAR-100 setting: CE + 2 * DIST(beta=1, gamma=1, tau=4).
  assert dict(section) == {'weight': 1.0, 'beta': 2.0, 'gamma': 2.0,
                           'temperature': 4.0}
  assert methods.reference('dist') == 'Huang et al., NeurIPS 2022'
  for config in quick_configs('dist'):
    assert config.distill.ce.weight == 1.0
    # Logits only: the teacher's logits may be cached.
    assert methods.teacher_layers(config.distill) == ()
  config = cifar_pair_config('dist')
  assert config.distill.method == 'dist'
  assert 'student_layers' not in config.distill.dist
