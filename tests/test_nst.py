"""Tests for `kd_jax.methods.nst` (neuron selectivity transfer, Huang & Wang,
2017)."""

import jax
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import nst
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_rejected
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import standard_normal
from method_checks import term_batch
from method_checks import term_inputs
from method_checks import term_value_and_grads

_MASK = np.array([1, 0, 1, 1, 0], np.float32)
_jit_loss = jax.jit(nst.nst_loss)


# --- float64 NumPy references, written from the paper's equations. -----------


def _np_channels(example):
  """`[H, W, C]` -> `C` unit vectors over the `H * W` positions."""
  example = np.asarray(example, np.float64)
  channels = example.reshape(-1, example.shape[-1]).T
  norms = np.linalg.norm(channels, axis=1, keepdims=True)
  return np.where(norms > 0, channels / np.where(norms > 0, norms, 1), 0.0)


def _np_mmd2(student, teacher):
  """The paper's MMD^2 with `k(x, y) = (x^T y)^2`, by loops over channels."""
  s, t = _np_channels(student), _np_channels(teacher)
  k = lambda x, y: (x @ y)**2
  ss = sum(k(a, b) for a in s for b in s) / len(s)**2
  tt = sum(k(a, b) for a in t for b in t) / len(t)**2
  st = sum(k(a, b) for a in s for b in t) / (len(s) * len(t))
  return tt + ss - 2 * st


def _np_gram_form(student, teacher):
  """The same MMD^2 from the kernel's feature map: `(x^T y)^2 = <x x^T, y
  y^T>`, so MMD^2 `= ||mean_i s_i s_i^T - mean_j t_j t_j^T||_F^2`."""
  s, t = _np_channels(student), _np_channels(teacher)
  return np.sum((s.T @ s / len(s) - t.T @ t / len(t))**2)


def _np_pool(example, size):
  """Average pooling of `[H, W, C]` to `size`, cell by cell (torch's
  `adaptive_avg_pool2d` when the sizes divide)."""
  h, w = size
  fh, fw = example.shape[0] // h, example.shape[1] // w
  return np.array([[example[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(
      axis=(0, 1)) for j in range(w)] for i in range(h)])


def _np_nst(student, teacher, keep=None):
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  return np.mean([_np_mmd2(s, t) for s, t in zip(student, teacher)])


def _features(seed=0, student_shape=(5, 3, 3, 4), teacher_shape=(5, 3, 3, 6)):
  return standard_normal(seed, student_shape, teacher_shape)


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  student, teacher = _features()
  loss = _jit_loss if jit else nst.nst_loss
  expected = _np_nst(student, teacher, _MASK.astype(bool))
  np.testing.assert_allclose(loss(student, teacher, weights=_MASK), expected,
                             rtol=1e-5)
  # The two forms of the kernel's MMD^2 agree.
  np.testing.assert_allclose(
      expected, np.mean([_np_gram_form(s, t) for s, t in zip(
          student[_MASK == 1], teacher[_MASK == 1])]), rtol=1e-10)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(loss(student, teacher, weights=None),
                               _np_nst(student, teacher), rtol=1e-5)


def test_larger_maps_are_average_pooled_as_in_repdistiller():
  student, teacher = _features(1, (5, 4, 4, 3), (5, 2, 2, 6))
  pooled = np.stack([_np_pool(s, (2, 2)) for s in student])
  np.testing.assert_allclose(
      _jit_loss(student, teacher, weights=None), _np_nst(pooled, teacher),
      rtol=1e-5)
  # Either side may be the larger one.
  np.testing.assert_allclose(
      _jit_loss(teacher, student, weights=None), _np_nst(teacher, pooled),
      rtol=1e-5)
  assert nst.common_size((5, 4, 4, 3), (5, 4, 4, 6)) is None
  assert nst.common_size((5, 8, 4, 3), (5, 2, 2, 6)) == (2, 2)
  for s, t in (((5, 3, 3, 3), (5, 2, 2, 3)), ((5, 6, 6, 3), (5, 4, 4, 3))):
    with pytest.raises(ValueError, match='whole multiple'):
      nst.common_size(s, t)
  with pytest.raises(ValueError, match='same rank and batch size'):
    nst.common_size((5, 2, 2, 3), (4, 2, 2, 3))


def test_invariants():
  student, teacher = _features(2)
  reference = _jit_loss(student, teacher, weights=None)
  assert reference > 0
  rng = np.random.default_rng(3)
  # Each channel is normalised, and the kernel squares the inner product:
  # scaling channels (by any nonzero factor) or reordering them changes
  # nothing, in either network.
  factors = rng.choice([-3.0, -0.5, 0.2, 4.0], size=4).astype(np.float32)
  for s, t in ((student * factors, teacher),
               (student, teacher[..., rng.permutation(6)])):
    np.testing.assert_allclose(_jit_loss(s, t, weights=None), reference,
                               rtol=1e-5)
  # The same distribution of channels: 0 (an MMD^2, >= 0 up to rounding);
  # here the teacher has each student channel twice, once scaled.
  np.testing.assert_allclose(
      _jit_loss(student, np.concatenate([student, -5 * student], axis=-1),
                weights=None), 0.0, atol=1e-6)


def test_layers_sum_and_errors():
  (s1, t1), (s2, t2) = _features(4), _features(5, (5, 2, 2, 3), (5, 2, 2, 2))
  summed = jax.jit(nst.multi_layer_nst_loss)
  total, aux = summed([(s1, t1), (s2, t2)])
  assert aux == {}
  np.testing.assert_allclose(total, _np_nst(s1, t1) + _np_nst(s2, t2),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='feature_pairs is empty'):
    nst.multi_layer_nst_loss([])
  with pytest.raises(ValueError, match=r'layer 1: .*\(5, 3, 3, 4\).*whole'):
    summed([(s1, t1), (s1, t2)])


def test_gradient_matches_finite_differences_in_float64():
  student, teacher = _features(6)
  assert_gradient_matches_finite_differences(
      lambda s, t, w: nst.nst_loss(s, t, weights=w), student,
      args=(teacher, _MASK), zero_rows=_MASK)


# --- the record, its term and its configs. ------------------------------------


def test_term_pairs_layers_and_the_teacher_gets_no_gradient():
  term = nst.METHOD.loss(methods.default_section(
      'nst', student_layers='a,b', teacher_layers='x,y'))
  (s1, t1), (s2, t2) = _features(7), _features(8, (5, 4, 4, 2), (5, 2, 2, 3))
  (value, aux), (student_grad, teacher_grad) = term_value_and_grads(
      term, {'a': s1, 'b': s2}, {'x': t1, 'y': t2}, term_batch(_MASK))
  keep = _MASK.astype(bool)
  pooled = np.stack([_np_pool(s, (2, 2)) for s in s2])
  np.testing.assert_allclose(
      value, _np_nst(s1, t1, keep) + _np_nst(pooled, t2, keep), rtol=1e-5)
  assert aux == {}
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)
  # Sizes that cannot be pooled: the error names the section and layers.
  s3, t3 = _features(9, (5, 3, 3, 2), (5, 2, 2, 3))
  with pytest.raises(ValueError, match=(
      r"config.distill.nst: student layer 'b' and teacher layer 'y': .*"
      r'\(5, 3, 3, 2\)')):
    term(*term_inputs({'a': s1, 'b': s3}, {'x': t1, 'y': t3},
                      term_batch(_MASK)))


def test_defaults_and_configs():
  assert methods.default_section('nst').weight == 50.0  # RepDistiller's.
  assert methods.reference('nst') == 'Huang & Wang, 2017'
  _, config = quick_configs('nst')
  config.distill.nst.student_layers = 'conv1,conv2'
  assert_rejected(config, '2 student and 1 teacher')
  # On a CIFAR pair, every stage both networks have (RepDistiller's
  # feat[1:-1]).
  cifar_pair_config('nst', 'stage1,stage2,stage3', 'stage1,stage2,stage3')
