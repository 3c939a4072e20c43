"""Tests for `kd_jax.methods.sp` (similarity-preserving KD, Tung & Mori,
ICCV 2019)."""

import importlib

import jax
import numpy as np
import pytest

from experiments import sp as sp_experiment
from kd_jax import errors
from kd_jax import methods
from kd_jax import objective
from kd_jax import validation
from kd_jax.methods import sp

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
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(student_shape).astype(np.float32),
          rng.standard_normal(teacher_shape).astype(np.float32))


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
  student, teacher = (x.astype(np.float64) for x in _features(4))
  weights = _MASK.astype(np.float64)
  rng = np.random.default_rng(0)
  eps = 1e-5
  with jax.enable_x64(True):
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda s: sp.sp_loss(s, teacher, weights=weights)))
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


def test_term_pairs_layers_and_the_teacher_gets_no_gradient():
  section = methods.default_section(
      'sp', student_layers='a,b', teacher_layers='x,y')
  term = sp.METHOD.loss(section)
  (s1, t1), (s2, t2) = _features(5), _features(6)
  batch = {'label': np.zeros(6, np.int32), 'mask': _MASK}
  logits = np.zeros((6, 10), np.float32)

  def evaluate(student, teacher):
    return term(objective.Outputs(logits, student),
                objective.Outputs(logits, teacher), batch)

  (value, aux), (student_grad, teacher_grad) = jax.jit(jax.value_and_grad(
      evaluate, argnums=(0, 1), has_aux=True))(
          {'a': s1, 'b': s2}, {'x': t1, 'y': t2})
  keep = _MASK.astype(bool)
  np.testing.assert_allclose(
      value, _np_sp(s1, t1, keep) + _np_sp(s2, t2, keep), rtol=1e-5)
  assert aux == {}
  for grad in jax.tree.leaves(teacher_grad):
    np.testing.assert_array_equal(grad, 0.0)
  for grad in jax.tree.leaves(student_grad):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    np.testing.assert_array_equal(grad[~keep], 0.0)


def test_defaults_and_configs():
  assert methods.default_section('sp').weight == 3000.0  # RepDistiller's.
  assert methods.reference('sp') == 'Tung & Mori, ICCV 2019'
  config = sp_experiment.get_config('quick')
  validation.validate(config)
  assert config.distill.terms == 'ce,sp'
  assert methods.teacher_layers(config.distill) == ('conv2',)
  strong = sp_experiment.get_config('quick,strong')
  validation.validate(strong)
  assert methods.teacher_layers(strong.distill) == ('block2',)
  # Layers pair up in order.
  config.distill.sp.teacher_layers = 'conv1,conv2'
  with pytest.raises(errors.UserInputError, match='1 student and 2 teacher'):
    validation.validate(config)
  # On a CIFAR pair, the last stage of each network (RepDistiller's
  # feat[-2]).
  pair = importlib.import_module('experiments.cifar100.resnet56_resnet20')
  config = pair.get_config('sp')
  validation.validate(config)
  assert (config.distill.sp.student_layers,
          config.distill.sp.teacher_layers) == ('stage3', 'stage3')
  assert sp.METHOD.zoo_settings(
      ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'embedding'),
      ('stem', 'stage1', 'stage2', 'stage3', 'embedding')) == {
          'student_layers': 'stage3', 'teacher_layers': 'stage4'}
