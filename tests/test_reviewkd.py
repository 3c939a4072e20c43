"""Tests for `kd_jax.methods.reviewkd` (knowledge review, Chen et al., CVPR
2021)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import reviewkd as reviewkd_experiment
from kd_jax import methods
from kd_jax import objective
from kd_jax import zoo
from kd_jax.methods import reviewkd
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_rejected
from method_checks import assert_trains
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import standard_normal
from method_checks import term_batch
from method_checks import term_inputs
from method_checks import term_value_and_grads

_MASK = np.array([1, 1, 0, 1, 0], np.float32)
_jit_loss = jax.jit(reviewkd.hcl_loss)
# Levels of several kinds: pools to 4, 2, 1; overlapping 7 -> 4 and 7 -> 2
# windows; pools to 2 and 1 only; a [B, C] vector (a 1x1 map).
_SHAPES = ((8, 8, 3), (7, 7, 2), (3, 3, 4), (6,))


# --- float64 NumPy references, written from the authors' equations. ---------


def _np_adaptive_pool(maps, size):
  """PyTorch's adaptive_avg_pool2d: cell i of n -> m averages rows
  floor(i n / m) .. ceil((i + 1) n / m) - 1."""
  (height, width), (h, w) = maps.shape[1:3], size
  out = np.zeros((maps.shape[0], h, w, maps.shape[3]))
  for i in range(h):
    for j in range(w):
      rows = slice(math.floor(i * height / h), math.ceil((i + 1) * height / h))
      cols = slice(math.floor(j * width / w), math.ceil((j + 1) * width / w))
      out[:, i, j] = maps[:, rows, cols].mean(axis=(1, 2))
  return out


def _np_hcl(students, teachers, keep=None):
  """The authors' `hcl`: per level, (MSE + sum of cnt * MSE of the pools to
  l x l for l in 4, 2, 1 below H, cnt halving from 1/2) / (1 + sum cnt),
  each MSE over every element of the kept examples; summed over levels."""
  total = 0.0
  for s, t in zip(students, teachers):
    # A [B, C] vector is a 1x1 map.
    s, t = [np.float64(a)[:, None, None] if np.ndim(a) == 2 else np.float64(a)
            for a in (s, t)]
    if keep is not None:
      s, t = s[keep], t[keep]
    loss, cnt, tot = np.mean((s - t)**2), 1.0, 1.0
    for l in (4, 2, 1):
      if l >= s.shape[1]:
        continue
      cnt /= 2
      loss += cnt * np.mean((_np_adaptive_pool(s, (l, l))
                             - _np_adaptive_pool(t, (l, l)))**2)
      tot += cnt
    total += loss / tot
  return total


def _np_nearest(maps, size):
  """PyTorch's nearest interpolation: output i reads input floor(i n / m)."""
  (height, width), (h, w) = maps.shape[1:3], size
  return np.array([[[m[math.floor(i * height / h), math.floor(j * width / w)]
                     for j in range(w)] for i in range(h)] for m in maps])


def _np_conv(x, kernel, bias=None):
  """A stride-1 convolution, padded by (k - 1) / 2 zeros on every side."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros(x.shape[:3] + kernel.shape[-1:])
  for di in range(k):
    for dj in range(k):
      out += padded[:, di:di + x.shape[1], dj:dj + x.shape[2]] @ kernel[di, dj]
  return out if bias is None else out + bias


def _np_batch_norm(x, scale, bias):
  """Training-mode batch norm: the batch's mean and biased variance per
  channel, over examples and positions, eps 1e-5."""
  mean = x.mean(axis=(0, 1, 2))
  variance = ((x - mean)**2).mean(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(variance + 1e-5) * scale + bias


def _np_review(params, features, sizes):
  """The authors' ReviewKD.forward: ABFs from the deepest level up."""
  p = jax.tree.map(np.float64, params)
  outputs, residual = [None] * len(features), None
  for i in reversed(range(len(features))):
    x = np.float64(features[i])
    x = x[:, None, None] if x.ndim == 2 else x
    x = _np_batch_norm(_np_conv(x, p[f'level{i}_conv1']['kernel']),
                       **p[f'level{i}_bn1'])
    if residual is not None:
      y = _np_nearest(residual, x.shape[1:3])
      z = _np_conv(np.concatenate([x, y], -1),
                   p[f'level{i}_attention']['kernel'],
                   p[f'level{i}_attention']['bias'])
      z = 1 / (1 + np.exp(-z))
      x = x * z[..., :1] + y * z[..., 1:]
    if x.shape[1:3] != sizes[i]:
      x = _np_nearest(x, sizes[i])
    residual = x
    outputs[i] = _np_batch_norm(_np_conv(x, p[f'level{i}_conv2']['kernel']),
                                **p[f'level{i}_bn2'])
  return outputs


def _levels(seed, batch=5, shapes=_SHAPES):
  student = standard_normal(seed, *[(batch,) + s for s in shapes])
  teacher = standard_normal(seed + 100, *[(batch,) + s for s in shapes])
  return student, teacher


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  # Eager mode (slow: an op at a time) on two levels only.
  student, teacher = _levels(0, shapes=_SHAPES if jit else _SHAPES[1::2])
  loss = _jit_loss if jit else reviewkd.hcl_loss
  value, aux = loss(student, teacher, weights=_MASK)
  assert aux == {}
  np.testing.assert_allclose(
      value, _np_hcl(student, teacher, _MASK.astype(bool)), rtol=1e-5)
  if jit:
    np.testing.assert_allclose(loss(student, teacher)[0],
                               _np_hcl(student, teacher), rtol=1e-5)


def test_a_batch_of_one_and_the_level_weights():
  student, teacher = _levels(1, batch=1, shapes=((4, 4, 3), (2, 2, 5)))
  np.testing.assert_allclose(_jit_loss(student, teacher)[0],
                             _np_hcl(student, teacher), rtol=1e-5)
  # A checkerboard difference of +-1 has zero-mean pools wherever the pools
  # are even, so only the map's MSE (1) remains, over the weights' sum:
  # 1 + 1/2 + 1/4 + 1/8 at 8x8, 1 + 1/2 + 1/4 at 4x4 (no 4x4 pool), 1 + 1/2
  # at 2x2 (only 1x1), 1 at 1x1 (none).
  for size, weight_sum in ((8, 1.875), (4, 1.75), (2, 1.5), (1, 1.0)):
    board = (-1.0)**np.add.outer(np.arange(size), np.arange(size))
    board = np.float32(board)[None, :, :, None]
    board = board if size > 1 else np.ones_like(board)
    np.testing.assert_allclose(
        _jit_loss([board], [np.zeros_like(board)])[0], 1 / weight_sum,
        rtol=1e-6)
  # A constant offset c shows in every pool alike: c^2 per level.
  np.testing.assert_allclose(
      _jit_loss([teacher[0] + 0.5, teacher[1] - 2.0], teacher)[0],
      0.25 + 4.0, rtol=1e-5)
  np.testing.assert_allclose(_jit_loss(teacher, teacher)[0], 0.0)


def test_errors():
  student, teacher = _levels(2)
  with pytest.raises(ValueError, match='at least one'):
    reviewkd.hcl_loss([], [])
  with pytest.raises(ValueError, match='1 student and 2 teacher'):
    reviewkd.hcl_loss(student[:1], teacher[:2])
  with pytest.raises(ValueError, match=r'level 1: student \(5, 7, 7, 2\) and '
                     r'teacher \(5, 7, 7, 3\)'):
    reviewkd.hcl_loss(student[:2], [teacher[0], np.zeros((5, 7, 7, 3))])
  with pytest.raises(ValueError, match=r'level 0: .*\(5, 7, 7\)'):
    reviewkd.hcl_loss([student[1][..., 0]], [teacher[1][..., 0]])


def test_gradient_matches_finite_differences_in_float64():
  student, teacher = _levels(3)
  # Every level's masked rows get no gradient.
  assert_gradient_matches_finite_differences(
      lambda s, t, w: reviewkd.hcl_loss(s, t, weights=w)[0], student,
      args=(teacher, _MASK), zero_rows=_MASK, eps=1e-6)


def test_padded_rows_holding_nan_reach_no_gradient():
  student, teacher = _levels(4, shapes=((4, 4, 2), (3,)))
  student[0][2], teacher[1][4] = np.nan, np.inf
  value, grad = jax.jit(jax.value_and_grad(
      lambda s: reviewkd.hcl_loss(s, teacher, weights=_MASK)[0]))(student)
  keep = _MASK.astype(bool)
  np.testing.assert_allclose(
      value, _np_hcl([s[keep] for s in student], [t[keep] for t in teacher]),
      rtol=1e-5)
  for g in grad:
    assert np.all(np.isfinite(g)) and np.all(g[~keep] == 0)


# --- the review module. -------------------------------------------------------


def _section(**overrides):
  return methods.default_section('reviewkd', student_layers='a,b,c',
                                 teacher_layers='x,y,z', **overrides)


# Level 0 as large as the teacher's; level 1 upsampled 2x to the teacher's
# 8x8 (the authors' `out_shapes`); level 2 the embeddings, 1x1.
_STUDENT_SHAPES = [(8, 8, 3), (4, 4, 5), (6,)]
_TEACHER_SHAPES = [(8, 8, 4), (8, 8, 2), (7,)]


def test_module_is_the_authors_abf_cascade_and_the_term_trains_it():
  module = reviewkd.METHOD.module(_section(mid_channels=4), _STUDENT_SHAPES,
                                  _TEACHER_SHAPES)
  features = standard_normal(0, *[(3,) + s for s in _STUDENT_SHAPES])
  # XLA:CPU compiles an initialisation slowly, with the rbg generator least.
  params = jax.jit(module.init)(jax.random.key(0, impl='rbg'),
                                features)['params']
  # mid = min(mid_channels, the deepest student layer's 6 channels).
  assert params['level0_conv1']['kernel'].shape == (1, 1, 3, 4)
  assert params['level2_conv1']['kernel'].shape == (1, 1, 6, 4)
  assert params['level1_attention']['kernel'].shape == (1, 1, 8, 2)
  assert params['level1_conv2']['kernel'].shape == (3, 3, 4, 2)
  assert 'level2_attention' not in params  # The deepest level fuses nothing.
  assert set(params['level0_conv1']) == {'kernel'}  # No biases.
  assert set(params['level0_conv2']) == {'kernel'}
  # kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in)); the attention's PyTorch
  # default bias U(+-1 / sqrt(fan_in)); batch norms start at 1 and 0.
  assert np.abs(params['level1_conv2']['kernel']).max() <= math.sqrt(3 / 36)
  assert np.abs(params['level0_conv1']['kernel']).max() <= 1.0
  assert np.abs(params['level0_attention']['bias']).max() <= math.sqrt(1 / 8)
  np.testing.assert_array_equal(params['level1_bn2']['scale'], 1.0)
  np.testing.assert_array_equal(params['level1_bn2']['bias'], 0.0)
  # Default mid_channels: 512 capped at the deepest student layer's 6.
  assert reviewkd.METHOD.module(_section(), _STUDENT_SHAPES,
                                _TEACHER_SHAPES).mid_channels == 6

  # The forward pass, every parameter random (batch norms included), and
  # the term's gradient reaching every parameter.
  leaves, treedef = jax.tree.flatten(params)
  params = treedef.unflatten(standard_normal(1, *[l.shape for l in leaves]))
  teacher = dict(zip('xyz', standard_normal(2, *[(3,) + s for s in
                                               _TEACHER_SHAPES])))
  term = reviewkd.METHOD.loss(_section(warmup_epochs=0))
  logits = np.zeros((3, 10), np.float32)

  def evaluate(params):
    out = module.apply({'params': params}, features)
    return term(objective.Outputs(logits, {}, {'reviewkd': out}),
                objective.Outputs(logits, teacher),
                term_batch(np.ones(3, np.float32)))[0], out

  (value, outputs), grad = jax.jit(jax.value_and_grad(
      evaluate, has_aux=True))(params)
  expected = _np_review(params, features, [(8, 8), (8, 8), (1, 1)])
  assert [o.shape for o in outputs] == [(3, 8, 8, 4), (3, 8, 8, 2),
                                        (3, 1, 1, 7)]
  for out, ref in zip(outputs, expected):
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(value, _np_hcl(expected, list(teacher.values())),
                             rtol=1e-4)
  assert_trains(grad)  # Every level's convolutions and batch norms.


def test_module_rejects_sizes_it_cannot_match():
  for student, teacher in (((3, 3, 5), (8, 8, 2)), ((8, 8, 5), (4, 4, 2))):
    with pytest.raises(ValueError, match=(
        rf"student layer 'b' \({student[0]}, {student[0]}, 5\) and teacher "
        rf"layer 'y' \({teacher[0]}, {teacher[0]}, 2\): .*whole multiple")):
      reviewkd.METHOD.module(_section(), [(8, 8, 3), student, (6,)],
                             [(8, 8, 4), teacher, (7,)])
  with pytest.raises(ValueError, match=r"student layer 'a' \(8, 8\)"):
    reviewkd.METHOD.module(_section(), [(8, 8), (4, 4, 5), (6,)],
                           _TEACHER_SHAPES)


# --- the record's term and its configs. ---------------------------------------


def _fused_term(section):
  """The record's term, reading the student's fused maps from its features
  a, b, c (as the module would hand them over)."""
  term = reviewkd.METHOD.loss(section)

  def fused(student, teacher, batch):
    maps = [student.features[layer] for layer in 'abc']
    return term(objective.Outputs(student.logits, {}, {'reviewkd': maps}),
                teacher, batch)
  return fused


def _term_arrays(seed):
  student = standard_normal(seed, (5, 8, 8, 4), (5, 4, 4, 2), (5, 1, 1, 7))
  teacher = standard_normal(seed + 1, (5, 8, 8, 4), (5, 4, 4, 2), (5, 7))
  return dict(zip('abc', student)), dict(zip('xyz', teacher))


def test_term_and_the_teacher_gets_no_gradient():
  student, teacher = _term_arrays(5)
  # Past the warm-up (epoch 30 of 20): the plain HCL.
  (value, aux), (student_grad, teacher_grad) = term_value_and_grads(
      _fused_term(_section()), student, teacher, term_batch(_MASK, epoch=30))
  assert aux == {}
  np.testing.assert_allclose(
      value, _np_hcl(list(student.values()), list(teacher.values()),
                     _MASK.astype(bool)), rtol=1e-5)
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)


def test_warmup_ramp():
  student, teacher = _term_arrays(6)
  full = _np_hcl(list(student.values()), list(teacher.values()))
  ones = np.ones(5, np.float32)
  term = jax.jit(lambda epoch: _fused_term(_section())(*term_inputs(
      student, teacher, term_batch(ones, epoch=epoch)))[0])
  # min(epoch / 20, 1), epochs from 1.
  for epoch, factor in ((1, 0.05), (5, 0.25), (20, 1.0), (41, 1.0)):
    np.testing.assert_allclose(term(np.int32(epoch)), factor * full,
                               rtol=1e-5)
  # No warm-up: no epoch needed.
  no_warmup = jax.jit(lambda: _fused_term(_section(warmup_epochs=0))(
      *term_inputs(student, teacher, term_batch(ones)))[0])
  np.testing.assert_allclose(no_warmup(), full, rtol=1e-5)


def test_defaults_and_configs():
  section = methods.default_section('reviewkd')
  # mdistiller's REVIEWKD_WEIGHT, WARMUP_EPOCHS and max. mid channels.
  assert (section.weight, section.warmup_epochs, section.mid_channels) == (
      1.0, 20, 512)
  assert methods.reference('reviewkd') == 'Chen et al., CVPR 2021'
  quick, strong = quick_configs('reviewkd')
  assert methods.teacher_layers(quick.distill) == ('conv1', 'conv2')
  assert methods.teacher_layers(strong.distill) == ('block1', 'block2')
  assert quick.distill.reviewkd.warmup_epochs == 0
  quick.distill.reviewkd.mid_channels = 0
  assert_rejected(quick, 'config.distill.reviewkd.mid_channels = 0')
  quick.distill.reviewkd.mid_channels = 512
  quick.distill.reviewkd.student_layers = 'conv2'
  assert_rejected(quick, '1 student and 2 teacher')
  with pytest.raises(ValueError, match='mlp'):
    reviewkd_experiment.get_config('quick,mlp')
  # On a CIFAR pair: every stage and the embedding, the teacher's stages
  # before their last ReLU (the authors' preact=True), all sown by the zoo's
  # models.
  config = cifar_pair_config(
      'reviewkd', 'stage1,stage2,stage3,embedding',
      'stage1_preact,stage2_preact,stage3_preact,embedding')
  assert config.distill.reviewkd.warmup_epochs == 20
  assert set(methods.student_layers(config.distill)) <= set(
      zoo.feature_names('resnet20'))
  assert set(methods.teacher_layers(config.distill)) <= set(
      zoo.feature_names('resnet56', preact=True))


def test_module_on_a_cifar_pair_upsamples_to_the_teacher():
  # resnet32x4 -> shufflenetv1, whose maps are half the teacher's size (the
  # authors' `out_shapes`); shapes as tests/test_zoo.py's, for 32x32 images.
  settings = reviewkd.METHOD.zoo_settings(zoo.feature_names('resnet32x4'),
                                          zoo.feature_names('shufflenetv1'))
  student = [(16, 16, 240), (8, 8, 480), (4, 4, 960), (960,)]
  teacher = [(32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)]
  module = reviewkd.METHOD.module(
      methods.default_section('reviewkd', **settings), student, teacher)
  assert module.mid_channels == 512  # min(512, 960).
  outputs, variables = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.PRNGKey(0), x),
      [jax.ShapeDtypeStruct((2,) + shape, jnp.float32) for shape in student])
  assert [o.shape for o in outputs] == [(2, 32, 32, 64), (2, 16, 16, 128),
                                        (2, 8, 8, 256), (2, 1, 1, 256)]
  assert variables['params']['level0_conv2']['kernel'].shape == (3, 3, 512,
                                                                 64)
