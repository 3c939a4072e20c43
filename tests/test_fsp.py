"""Tests for `kd_jax.methods.fsp` (flow of solution procedure, Yim et al.,
CVPR 2017)."""

import jax
import numpy as np
import pytest

from experiments import fsp as fsp_experiment
from kd_jax import methods
from kd_jax.methods import fsp
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
_jit_loss = jax.jit(fsp.fsp_loss)


# --- float64 NumPy references, written from the paper's equations. ----------


def _np_pool(example, size):
  """Average pooling of `[H, W, C]` to `size`, cell by cell."""
  h, w = size
  fh, fw = example.shape[0] // h, example.shape[1] // w
  return np.array([[example[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(
      axis=(0, 1)) for j in range(w)] for i in range(h)])


def _np_fsp_matrix(first, second):
  """The paper's Eq. 1 for one example, by loops: `G[i, j] = sum_{s, t}
  F1[s, t, i] F2[s, t, j] / (h w)`, the larger map pooled first."""
  size = tuple(min(a, b) for a, b in zip(first.shape[:2], second.shape[:2]))
  f1, f2 = (_np_pool(np.float64(f), size) for f in (first, second))
  h, w = size
  return np.array([[sum(f1[s, t, i] * f2[s, t, j] for s in range(h)
                        for t in range(w)) / (h * w)
                    for j in range(f2.shape[-1])]
                   for i in range(f1.shape[-1])])


def _np_fsp(student_maps, teacher_maps, keep=None):
  """RepDistiller's normalisation: per matrix, the mean over the batch and
  the entries of the squared difference; summed over the matrices."""
  examples = range(len(student_maps[0]))
  if keep is not None:
    examples = [b for b in examples if keep[b]]
  total = 0.0
  for k in range(len(student_maps) - 1):
    total += np.mean([np.mean((
        _np_fsp_matrix(student_maps[k][b], student_maps[k + 1][b])
        - _np_fsp_matrix(teacher_maps[k][b], teacher_maps[k + 1][b]))**2)
                      for b in examples])
  return total


def _maps(seed, shapes):
  return standard_normal(seed, *shapes)


# Three student maps (two matrices, 3x4 and 4x2); the teacher's have the
# same channels at other spatial sizes.
_STUDENT = ((5, 4, 4, 3), (5, 2, 2, 4), (5, 2, 2, 2))
_TEACHER = ((5, 2, 2, 3), (5, 2, 2, 4), (5, 1, 1, 2))


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  student, teacher = _maps(0, _STUDENT), _maps(1, _TEACHER)
  loss = _jit_loss if jit else fsp.fsp_loss
  value, aux = loss(student, teacher, weights=_MASK)
  assert aux == {}
  np.testing.assert_allclose(value, _np_fsp(student, teacher, _MASK),
                             rtol=1e-5)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(loss(student, teacher)[0],
                               _np_fsp(student, teacher), rtol=1e-5)


def test_matrix_and_the_papers_normalisation():
  first, second = _maps(2, ((5, 4, 4, 3), (5, 2, 2, 4)))
  matrices = jax.jit(fsp.fsp_matrix)(first, second)
  assert matrices.shape == (5, 3, 4)
  for b in range(5):
    np.testing.assert_allclose(matrices[b], _np_fsp_matrix(first[b],
                                                           second[b]),
                               rtol=1e-5, atol=1e-6)
  # The paper's L2 loss sums the squared entries: RepDistiller's mean times
  # the 3 x 4 entries.
  teacher = _maps(3, ((5, 4, 4, 3), (5, 2, 2, 4)))
  paper = np.mean([np.sum((_np_fsp_matrix(first[b], second[b])
                           - _np_fsp_matrix(teacher[0][b], teacher[1][b]))**2)
                   for b in range(5)])
  np.testing.assert_allclose(
      12 * _jit_loss([first, second], teacher)[0], paper, rtol=1e-5)


def test_invariants():
  student, teacher = _maps(4, _STUDENT), _maps(5, _TEACHER)
  reference = _jit_loss(student, teacher)[0]
  assert reference > 0
  # Reordering the examples (alike in both networks) changes nothing; nor
  # does reordering the positions alike in all maps of one size.
  order = [3, 0, 4, 1, 2]
  np.testing.assert_allclose(
      _jit_loss([m[order] for m in student], [m[order] for m in teacher])[0],
      reference, rtol=1e-5)
  flipped = [m[:, ::-1, ::-1] for m in teacher]  # 2x2 and 1x1 pools too.
  np.testing.assert_allclose(_jit_loss(student, flipped)[0], reference,
                             rtol=1e-5)
  # Only the flow matters, not the spatial size: a teacher whose maps are
  # the student's upsampled 2x (nearest neighbour) has the same matrices.
  upsampled = [m.repeat(2, axis=1).repeat(2, axis=2) for m in student]
  np.testing.assert_allclose(_jit_loss(student, upsampled)[0], 0.0,
                             atol=1e-6)


def test_errors():
  student, teacher = _maps(6, _STUDENT), _maps(7, _TEACHER)
  with pytest.raises(ValueError, match='at least 2'):
    fsp.fsp_loss(student[:1], teacher[:1])
  with pytest.raises(ValueError, match='3 student and 2 teacher'):
    fsp.fsp_loss(student, teacher[:2])
  # Matrix 1 is 4x2 in the student, 4x5 in the teacher.
  other = _maps(8, ((5, 2, 2, 3), (5, 2, 2, 4), (5, 1, 1, 5)))
  with pytest.raises(ValueError, match=r'FSP matrix 1: student \(4, 2\) and '
                     r'teacher \(4, 5\).*equal channel counts'):
    _jit_loss(student, other)
  with pytest.raises(ValueError, match=r'FSP matrix 0: spatial sizes'):
    _jit_loss(_maps(9, ((5, 3, 3, 3), (5, 2, 2, 4))), teacher[:2])


def test_gradient_matches_finite_differences_in_float64():
  assert_gradient_matches_finite_differences(
      lambda s, t, w: fsp.fsp_loss(s, t, weights=w)[0], _maps(10, _STUDENT),
      args=(_maps(11, _TEACHER), _MASK), zero_rows=_MASK)


# --- the record, its term and its configs. ------------------------------------


def test_term_and_the_teacher_gets_no_gradient():
  term = fsp.METHOD.loss(methods.default_section(
      'fsp', student_layers='a,b,c', teacher_layers='x,y,z'))
  student, teacher = _maps(12, _STUDENT), _maps(13, _TEACHER)
  (value, _), (student_grad, teacher_grad) = term_value_and_grads(
      term, dict(zip('abc', student)), dict(zip('xyz', teacher)),
      term_batch(_MASK))
  np.testing.assert_allclose(value, _np_fsp(student, teacher, _MASK),
                             rtol=1e-5)
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)
  # Channel counts that differ (the seed teacher's conv1, conv2 against
  # the seed student's): the error names the section, layers and channels.
  term = fsp.METHOD.loss(methods.default_section(
      'fsp', student_layers='conv1,conv2', teacher_layers='conv1,conv2'))
  s_maps = dict(zip(('conv1', 'conv2'),
                    _maps(14, ((5, 4, 4, 16), (5, 2, 2, 32)))))
  t_maps = dict(zip(('conv1', 'conv2'),
                    _maps(15, ((5, 4, 4, 64), (5, 2, 2, 256)))))
  with pytest.raises(ValueError, match=(
      r'config.distill.fsp: FSP matrix 0: student \(16, 32\) and teacher '
      r'\(64, 256\).*Student layers \(channels\): conv1 16, conv2 32; '
      r'teacher layers: conv1 64, conv2 256')):
    term(*term_inputs(s_maps, t_maps, term_batch(_MASK)))


def test_defaults_and_configs():
  section = methods.default_section('fsp')
  assert (section.weight, section.student_layers,
          section.teacher_layers) == (1.0, 'conv1,conv2', 'block1,block2')
  assert methods.reference('fsp') == 'Yim et al., CVPR 2017'
  for config in quick_configs('fsp'):
    assert config.name == 'fsp_quick'
    # The seed teacher's channels (64, 256) do not fit the student's (16,
    # 32); bn_cnn's block1, block2 do.
    assert config.teacher.model == 'bn_cnn'
    assert methods.teacher_layers(config.distill) == ('block1', 'block2')
  with pytest.raises(ValueError, match='mlp'):
    fsp_experiment.get_config('quick,mlp')
  config.distill.fsp.student_layers = 'conv2'
  config.distill.fsp.teacher_layers = 'block2'
  assert_rejected(config, 'at least 2')
  config.distill.fsp.student_layers = 'conv1,conv2'
  assert_rejected(config, '2 student and 1 teacher')
  # On a CIFAR pair, stem and every stage (RepDistiller's feat[:-1]).
  cifar_pair_config('fsp', 'stem,stage1,stage2,stage3',
                    'stem,stage1,stage2,stage3')
  assert fsp.METHOD.zoo_settings(
      ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'embedding'),
      ('stem', 'stage1', 'stage2', 'stage3', 'embedding')) == {
          'student_layers': 'stem,stage1,stage2,stage3',
          'teacher_layers': 'stem,stage1,stage2,stage3'}
