"""Tests for `kd_jax.methods.sp` (similarity-preserving KD, Tung & Mori,
ICCV 2019)."""

import jax
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import sp
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_rejected
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import standard_normal
from method_checks import term_batch
from method_checks import term_value_and_grads

_MASK = np.array([1, 1, 0, 1, 1, 0], np.float32)
_jit_loss = jax.jit(sp.sp_loss)


# --- float64 NumPy reference, written from the paper's equations. ------------


def _np_sp(student, teacher, keep=None):
  """`(1 / b^2) ||G_s - G_t||_F^2`, `G = normalize_rows(Q Q^T)` of the
  reshaped activations `Q` (`[b, chw]`), over the examples `keep`."""
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  b = len(student)

  def gram(features):
    q = np.asarray(features, np.float64).reshape(b, -1)
    g = np.array([[q[i] @ q[j] for j in range(b)] for i in range(b)])
    return g / np.linalg.norm(g, axis=1, keepdims=True)

  return np.sum((gram(student) - gram(teacher))**2) / b**2


def _features(seed=0, student_shape=(6, 3, 3, 4), teacher_shape=(6, 2, 2, 5)):
  return standard_normal(seed, student_shape, teacher_shape)


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  # Widths and spatial sizes differ: only the batch is shared.
  student, teacher = _features()
  loss = _jit_loss if jit else sp.sp_loss
  np.testing.assert_allclose(loss(student, teacher, weights=_MASK),
                             _np_sp(student, teacher, _MASK.astype(bool)),
                             rtol=1e-5)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(loss(student, teacher, weights=None),
                               _np_sp(student, teacher), rtol=1e-5)


def test_invariants():
  student, teacher = _features(1)
  reference = _jit_loss(student, teacher, weights=None)
  assert reference > 0
  # Scaling either network's activations changes nothing (the rows are
  # normalised), as the paper notes; nor does reordering the examples of
  # both alike.
  for s, t in ((1e3 * student, teacher), (student, 1e-3 * teacher),
               (student[::-1], teacher[::-1])):
    np.testing.assert_allclose(_jit_loss(s, t, weights=None), reference,
                               rtol=1e-5)
  # The same activations (scaled): 0.
  np.testing.assert_allclose(
      _jit_loss(student, 7.0 * student, weights=None), 0.0, atol=1e-7)


def test_layers_sum_and_errors():
  (s1, t1), (s2, t2) = _features(2), _features(3)
  total, aux = sp.multi_layer_sp_loss([(s1, t1), (s2, t2)])
  assert aux == {}
  np.testing.assert_allclose(total, _np_sp(s1, t1) + _np_sp(s2, t2),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='feature_pairs is empty'):
    sp.multi_layer_sp_loss([])
  with pytest.raises(ValueError, match='layer 1: .*same batch size'):
    sp.multi_layer_sp_loss([(s1, t1), (s2, t2[:4])])


def test_gradient_matches_finite_differences_in_float64():
  student, teacher = _features(4)
  assert_gradient_matches_finite_differences(
      lambda s, t, w: sp.sp_loss(s, t, weights=w), student,
      args=(teacher, _MASK), zero_rows=_MASK)


# --- the record, its term and its configs. ------------------------------------


def test_term_pairs_layers_and_the_teacher_gets_no_gradient():
  term = sp.METHOD.loss(methods.default_section(
      'sp', student_layers='a,b', teacher_layers='x,y'))
  (s1, t1), (s2, t2) = _features(5), _features(6)
  (value, aux), (student_grad, teacher_grad) = term_value_and_grads(
      term, {'a': s1, 'b': s2}, {'x': t1, 'y': t2}, term_batch(_MASK))
  keep = _MASK.astype(bool)
  np.testing.assert_allclose(
      value, _np_sp(s1, t1, keep) + _np_sp(s2, t2, keep), rtol=1e-5)
  assert aux == {}
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)


def test_defaults_and_configs():
  assert methods.default_section('sp').weight == 3000.0  # RepDistiller's.
  assert methods.reference('sp') == 'Tung & Mori, ICCV 2019'
  config, strong = quick_configs('sp')
  assert methods.teacher_layers(config.distill) == ('conv2',)
  assert methods.teacher_layers(strong.distill) == ('block2',)
  # Layers pair up in order.
  config.distill.sp.teacher_layers = 'conv1,conv2'
  assert_rejected(config, '1 student and 2 teacher')
  # On a CIFAR pair, the last stage of each network (RepDistiller's
  # feat[-2]).
  cifar_pair_config('sp', 'stage3', 'stage3')
  assert sp.METHOD.zoo_settings(
      ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'embedding'),
      ('stem', 'stage1', 'stage2', 'stage3', 'embedding')) == {
          'student_layers': 'stage3', 'teacher_layers': 'stage4'}
