"""Tests for `kd_jax.methods.ab` (activation boundaries, Heo et al., AAAI
2019, as RepDistiller runs it): the alternative loss, the connectors, the
initialisation's term and the record."""

import jax
import ml_collections
import numpy as np
import pytest

from kd_jax import objective
from kd_jax.methods import ab
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_trains
from method_checks import module_term_gradients
from method_checks import np_batch_norm
from method_checks import np_conv
from method_checks import np_transposed_conv
from method_checks import param_count
from method_checks import random_params
from method_checks import standard_normal
from method_checks import term_batch

_MASK = np.array([1, 1, 0, 1, 0], np.float32)
_KEEP = _MASK.astype(bool)
_jit_loss = jax.jit(ab.ab_loss)
_jit_levels = jax.jit(ab.multi_level_ab_loss, static_argnames='margin')


# --- float64 NumPy references, written from the paper and RepDistiller. ------


def _np_ab(source, target, margin, keep=None):
  """Mean over the (kept) examples of the sum over elements of `(s + m)^2`
  where `s > -m` and `t <= 0`, plus `(s - m)^2` where `s <= m` and `t > 0`
  (RepDistiller's `criterion_alternative_l2`, element by element)."""
  source, target = np.float64(source), np.float64(target)
  if keep is not None:
    source, target = source[keep], target[keep]
  per_example = []
  for s_row, t_row in zip(source, target):
    total = 0.0
    for s, t in zip(s_row.ravel(), t_row.ravel()):
      if s > -margin and t <= 0:
        total += (s + margin)**2
      if s <= margin and t > 0:
        total += (s - margin)**2
    per_example.append(total)
  return np.mean(per_example)


def _np_levels(sources, targets, margin, keep=None):
  """RepDistiller's `sum(ABLoss(L, margin)(g_s, g_t))`: level i weighted
  2^(i - L + 1), each `/ bsz / 1000 * 3`."""
  count = len(sources)
  return sum(2.0**(i - count + 1) * _np_ab(s, t, margin, keep) / 1000 * 3
             for i, (s, t) in enumerate(zip(sources, targets)))


def _section(student_layers='a', teacher_layers='x', **overrides):
  return objective.default_section(
      ab.METHOD, student_layers=student_layers, teacher_layers=teacher_layers,
      **overrides)


# --- the loss. ----------------------------------------------------------------

# One compiled value and gradients (student's, teacher's) of the loss at
# margin 1, for (5, 2, 2, 3) maps and [5] weights (ones for none).
_ONES = np.ones(5, np.float32)
_jit_grads = jax.jit(jax.value_and_grad(
    lambda s, t, w: ab.ab_loss(s, t, 1.0, weights=w), argnums=(0, 1)))


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  source, target = standard_normal(0, (5, 2, 2, 3), (5, 2, 2, 3))
  if not jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(ab.ab_loss(source, target, 1.0, weights=_MASK),
                               _np_ab(source, target, 1.0, _KEEP), rtol=1e-5)
    return
  value, grads = _jit_grads(source, target, _MASK)
  np.testing.assert_allclose(value, _np_ab(source, target, 1.0, _KEEP),
                             rtol=1e-5)
  assert_only_the_student_learns(*grads, _MASK)
  np.testing.assert_allclose(_jit_grads(source, target, _ONES)[0],
                             _np_ab(source, target, 1.0), rtol=1e-5)
  # Another margin, without weights; a batch of one.
  np.testing.assert_allclose(_jit_loss(source, target, 0.5),
                             _np_ab(source, target, 0.5), rtol=1e-5)
  np.testing.assert_allclose(_jit_loss(source[:1], target[:1], 1.0),
                             _np_ab(source[:1], target[:1], 1.0), rtol=1e-5)


def test_what_is_counted_and_extreme_inputs():
  # Per element, margin 1: (source, target) -> (value, its gradient).
  cases = [((0.5, -1.0), (2.25, 3.0)),    # t off, s > -1: (s + 1)^2.
           ((-1.5, -1.0), (0.0, 0.0)),    # t off, s at least m below.
           ((-1.0, 0.0), (0.0, 0.0)),     # t = 0 is off; s = -m not > -m.
           ((0.5, 2.0), (0.25, -1.0)),    # t on, s <= 1: (s - 1)^2.
           ((1.5, 2.0), (0.0, 0.0)),      # t on, s at least m above.
           ((1.0, 1e-30), (0.0, 0.0)),    # s = m: (s - m)^2 = 0.
           # Far on the right side: left out, no NaN in the gradient.
           ((-np.inf, -1.0), (0.0, 0.0)),
           ((np.inf, 1.0), (0.0, 0.0)),
           ((-np.inf, 1.0), (np.inf, -np.inf)),  # Far on the wrong side.
           ((1e18, -np.inf), (1e36, 2e18))]  # Large but finite.
  (source, target), (expected, expected_grad) = (
      np.array(pair, np.float32).T.reshape(2, -1, 1, 1, 1)
      for pair in zip(*cases))
  per_example, grad = jax.jit(lambda s, t: (
      ab.ab_loss_per_example(s, t, 1.0),
      jax.grad(lambda s: ab.ab_loss_per_example(s, t, 1.0).sum())(s)))(
          source, target)
  np.testing.assert_allclose(per_example, expected.ravel(), rtol=1e-5)
  np.testing.assert_allclose(grad.ravel(), expected_grad.ravel(), rtol=1e-5)
  # Padded rows holding anything reach neither value nor gradient; the
  # teacher gets no gradient.
  source, target = standard_normal(1, (5, 2, 2, 3), (5, 2, 2, 3))
  padded_source, padded_target = source.copy(), target.copy()
  padded_source[~_KEEP], padded_target[~_KEEP] = np.nan, np.inf
  value, grads = _jit_grads(padded_source, padded_target, _MASK)
  np.testing.assert_allclose(value, _np_ab(source, target, 1.0, _KEEP),
                             rtol=1e-5)
  assert_only_the_student_learns(*grads, _MASK)
  with pytest.raises(ValueError, match='margin must be > 0'):
    ab.ab_loss(source, target, 0.0)
  with pytest.raises(ValueError, match='same shape'):
    ab.ab_loss(source, target[..., :2], 1.0)
  assert ab.ab_loss_per_example(source, target, 1.0).shape == (5,)


def test_levels_are_weighted_and_scaled_and_errors():
  s1, t1, s2, t2, s3, t3 = standard_normal(
      2, (5, 4, 4, 2), (5, 4, 4, 2), (5, 2, 2, 3), (5, 2, 2, 3),
      (5, 1, 1, 4), (5, 1, 1, 4))
  total, aux = _jit_levels([s1, s2, s3], [t1, t2, t3], margin=1.0,
                           weights=_MASK)
  assert aux == {}
  # 3 / 1000 * (1/4, 1/2, 1), the deepest level last.
  np.testing.assert_allclose(
      total, 0.003 * (_np_ab(s1, t1, 1.0, _KEEP) / 4
                      + _np_ab(s2, t2, 1.0, _KEEP) / 2
                      + _np_ab(s3, t3, 1.0, _KEEP)), rtol=1e-5)
  np.testing.assert_allclose(
      _jit_levels([s2], [t2], margin=2.0)[0], _np_levels([s2], [t2], 2.0),
      rtol=1e-5)
  with pytest.raises(ValueError, match='at least one'):
    ab.multi_level_ab_loss([], [], margin=1.0)
  with pytest.raises(ValueError, match='2 student and 1 teacher'):
    ab.multi_level_ab_loss([s1, s2], [t1], margin=1.0)
  with pytest.raises(ValueError, match='level 1: .*same shape'):
    ab.multi_level_ab_loss([s1, s2], [t1, t3], margin=1.0)


def test_gradient_matches_finite_differences_in_float64():
  # Two levels (each through `ab_loss`). The loss is continuously
  # differentiable: each square vanishes where its indicator switches on.
  source, target, deep_source, deep_target = standard_normal(
      3, (5, 3, 3, 4), (5, 3, 3, 4), (5, 1, 2, 6), (5, 1, 2, 6))
  assert_gradient_matches_finite_differences(
      lambda s, t, w: ab.multi_level_ab_loss(s, t, margin=1.0, weights=w)[0],
      [source, deep_source], args=([target, deep_target], _MASK),
      zero_rows=_MASK, eps=1e-6)


# --- the connectors. ----------------------------------------------------------

# Parameter counts of RepDistiller's `Connector(s_shapes, t_shapes)`
# (models/util.py at HEAD of HobbitLong/RepDistiller; NCHW shapes), from
# `[sum(p.numel() for p in c.parameters()) for c in
# connector.connectors]`, computed once with PyTorch 2 (CPU). Each case:
# (student (H, W, C), teacher (H, W, C)) -> that level's count.
_TORCH_CONNECTOR = {
    ((8, 8, 4), (4, 4, 6)): 234,     # conv3x3 stride 2 + BN.
    ((4, 4, 4), (8, 8, 6)): 402,     # transposed conv4x4 stride 2 + BN.
    ((6, 6, 4), (4, 4, 6)): 234,     # VALID conv3x3 + BN.
    ((4, 4, 4), (4, 4, 4)): 0,       # The identity.
    ((4, 4, 4), (4, 4, 6)): 42,      # conv1x1 + BN (channels only).
    ((14, 14, 16), (14, 14, 16)): 0,  # The seed pair: identities.
    ((7, 7, 32), (7, 7, 32)): 0,
    # Levels of CIFAR pairs (the zoo's stageK_preact shapes, teacher ->
    # student): resnet32x4 -> shufflenetv1, wrn_40_2 -> wrn_40_1 and
    # resnet50 -> vgg8.
    ((16, 16, 240), (32, 32, 64)): 245952,
    ((4, 4, 960), (8, 8, 256)): 3932928,
    ((32, 32, 16), (32, 32, 32)): 608,
    ((4, 4, 512), (4, 4, 2048)): 1054720,
}


def _connectors_for(pairs):
  names = ','.join(f'l{i}' for i in range(len(pairs)))
  section = _section(student_layers=names, teacher_layers=names)
  return ab.INIT_TERM.module(section, [s for s, _ in pairs],
                             [t for _, t in pairs])


def test_connector_parameter_counts_are_repdistillers():
  for (s_shape, t_shape), expected in _TORCH_CONNECTOR.items():
    module = _connectors_for([(s_shape, t_shape)])
    x = jax.ShapeDtypeStruct((2, *s_shape), np.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), [x])
    assert param_count(params) == expected, (s_shape, t_shape)


def test_connectors_are_repdistillers_conv_reg_without_relu():
  pairs = [((8, 8, 4), (4, 4, 6)), ((4, 4, 4), (8, 8, 6)),
           ((6, 6, 4), (4, 4, 6)), ((4, 4, 4), (4, 4, 4))]
  module = _connectors_for(pairs)
  assert module.kinds == ('down', 'up', 'valid', 'identity')
  assert module.kernels[:3] == ((3, 3), (4, 4), (3, 3))
  features = standard_normal(4, *[(3, *s) for s, _ in pairs])
  # Initialised and applied in one compiled call.
  outputs, variables = jax.jit(module.init_with_output)(
      jax.random.PRNGKey(1), features)
  params = variables['params']
  assert sorted(params) == [f'connector{i}_{part}' for i in range(3)
                            for part in ('bn', 'conv')]
  # PyTorch's default init: U(-1 / sqrt(fan_in), ...); the transposed
  # conv's fan_in is Ct * 16 = 96 as PyTorch counts it, its kernel PyTorch's
  # (Cs, Ct, 4, 4) transposed.
  assert params['connector1_conv']['kernel'].shape == (4, 4, 6, 4)
  for name, fan_in in (('connector0_conv', 36), ('connector1_conv', 96),
                       ('connector2_conv', 36)):
    for leaf in params[name].values():
      assert np.max(np.abs(leaf)) <= 1 / np.sqrt(fan_in), name
  np.testing.assert_array_equal(params['connector0_bn']['scale'], 1.0)
  for out, (_, t_shape) in zip(outputs, pairs):
    assert out.shape == (3, *t_shape)
  expected = [
      np_batch_norm(np_conv(features[0], params['connector0_conv'], 2, 1),
                     params['connector0_bn']),
      np_batch_norm(np_transposed_conv(features[1], params['connector1_conv'],
                                    2, 1), params['connector1_bn']),
      np_batch_norm(np_conv(features[2], params['connector2_conv'], 1, 0),
                     params['connector2_bn']),
      features[3]]
  for out, reference in zip(outputs, expected):
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


def test_connector_kinds_and_refusals():
  assert ab.connector_kind((4, 4, 8), (4, 4, 2)) == 'valid'  # A 1x1 conv.
  assert ab.connector_kind((5, 5, 8), (3, 3, 8)) == 'valid'
  assert ab.connector_kind((7, 7, 8), (4, 4, 8)) == 'valid'  # Not 2x.
  assert ab.connector_kind((8, 6, 8), (4, 3, 8)) == 'down'
  assert ab.connector_kind((4, 3, 8), (8, 6, 8)) == 'up'
  for s_shape, t_shape in (((2, 2, 4), (3, 3, 4)),   # Smaller, not half.
                           ((4, 4, 4), (4, 5, 4)),   # Narrower.
                           ((8, 8, 4), (4, 5, 4)),   # 2x high, not wide.
                           ((4, 4, 4), (8, 7, 4))):
    with pytest.raises(ValueError, match='no connector'):
      ab.connector_kind(s_shape, t_shape)
  with pytest.raises(ValueError, match=r"student layer 'b' \(2, 2, 4\) and "
                     r"teacher layer 'y' \(3, 3, 4\)"):
    ab.INIT_TERM.module(_section('a,b', 'x,y'), [(4, 4, 4), (2, 2, 4)],
                        [(4, 4, 4), (3, 3, 4)])
  with pytest.raises(ValueError, match=r"student layer 'a' \(8,\)"):
    ab.INIT_TERM.module(_section(), [(8,)], [(4, 4, 4)])


# --- the initialisation's term. -----------------------------------------------


def test_init_term_trains_student_and_connectors_not_the_teacher():
  section = _section('a,b', 'x,y', margin=0.5)
  assert ab.INIT_TERM.student_layers(section) == ('a', 'b')
  assert ab.INIT_TERM.teacher_layers(section) == ('x', 'y')
  # Level 0: a connector (student 4x4 -> teacher 2x2); level 1: identity.
  module = ab.INIT_TERM.module(section, [(4, 4, 3), (2, 2, 5)],
                               [(2, 2, 6), (2, 2, 5)])
  a, b, x, y = standard_normal(6, (5, 4, 4, 3), (5, 2, 2, 5), (5, 2, 2, 6),
                               (5, 2, 2, 5))
  student, teacher = {'a': a, 'b': b}, {'x': x, 'y': y}
  params = random_params(module, 2, [a, b])
  term = ab.INIT_TERM.loss(section)
  value, (param_grad, student_grad, teacher_grad), (
      output_grad, output_teacher_grad) = module_term_gradients(
          module, term, 'ab_boundary', params, student, teacher,
          term_batch(_MASK), ['a', 'b'])
  out0 = np_batch_norm(np_conv(a, params['connector0_conv'], 2, 1),
                        params['connector0_bn'])
  np.testing.assert_allclose(
      value, _np_levels([out0, b], [x, y], 0.5, _KEEP), rtol=1e-4)
  assert_trains(param_grad)
  assert_trains(student_grad)
  for grad in jax.tree.leaves(teacher_grad):
    np.testing.assert_array_equal(grad, 0.0)
  # The identity level's padded rows get nothing (through the connector
  # they do, by the batch statistics: training batches are never padded);
  # nor do they from the term itself, on the connectors' outputs.
  np.testing.assert_array_equal(student_grad['b'][~_KEEP], 0.0)
  assert_only_the_student_learns(output_grad, output_teacher_grad, _MASK)


# --- the record. --------------------------------------------------------------


def test_record():
  section = objective.default_section(ab.METHOD)
  assert (section.init_epochs, section.margin, section.student_layers,
          section.teacher_layers) == (30, 1.0, 'conv1,conv2',
                                      'block1_preact,block2_preact')
  assert 'weight' not in section
  # After the initialisation, CE alone (RepDistiller's -a 0, loss_kd = 0).
  assert ab.METHOD.loss is None and ab.METHOD.terms == ('ce',)
  preparation = ab.METHOD.preparation
  assert preparation.term is ab.INIT_TERM
  assert (preparation.name, preparation.trains) == ('ab_init', 'features')
  assert preparation.trains in objective.TRAINS
  config = ml_collections.ConfigDict({'distill': {'ab': {'init_epochs': 3}}})
  assert preparation.epochs(config) == 3
  assert ab.INIT_TERM.name == 'ab_boundary' and ab.INIT_TERM.reads_teacher
  assert not ab.INIT_TERM.module_reads_teacher
  assert ab.METHOD.check(section, {}) == []
  problems = ab.METHOD.check(_section('a,b', 'x'), {})
  assert len(problems) == 1 and '2 student and 1 teacher' in problems[0]
  # On a CIFAR pair, every stage's pre-ReLU map; different stage counts:
  # the deepest ones.
  names = ('stem', 'stage1', 'stage2', 'stage3', 'embedding')
  preacts = 'stage1_preact,stage2_preact,stage3_preact'
  assert ab.METHOD.zoo_settings(names, names) == {
      'student_layers': preacts, 'teacher_layers': preacts}
  assert ab.METHOD.zoo_settings(
      ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'embedding'), names
  ) == {'student_layers': preacts,
        'teacher_layers': 'stage2_preact,stage3_preact,stage4_preact'}
