"""Tests for `kd_jax.methods.ft` (factor transfer, Kim et al., NeurIPS 2018,
as RepDistiller runs it): the factor and its losses, the paraphraser and the
translator, the two terms and the record."""

import jax
import ml_collections
import numpy as np
import pytest

from kd_jax import objective
from kd_jax.methods import ft
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
_jit_factor = jax.jit(ft.factor)
_jit_loss = jax.jit(ft.factor_transfer_loss)
_jit_reconstruction = jax.jit(ft.reconstruction_loss)


# --- float64 NumPy references, written from RepDistiller's code. -------------


def _np_factor(maps):
  """`F.normalize(f.pow(2).mean(1).view(B, -1))` of `[B, H, W, C]` maps:
  the channel mean of the squares, divided by max(its L2 norm, 1e-12)."""
  q = (np.float64(maps)**2).mean(axis=-1).reshape(len(maps), -1)
  norm = np.sqrt((q**2).sum(axis=1, keepdims=True))
  return q / np.maximum(norm, 1e-12)


def _np_pool(maps, size):
  """Average pooling of `[B, H, W, C]` to `size`, cell by cell."""
  h, w = size
  fh, fw = maps.shape[1] // h, maps.shape[2] // w
  return np.array([[[m[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(
      axis=(0, 1)) for j in range(w)] for i in range(h)] for m in maps])


def _np_ft(student, teacher, keep=None):
  """RepDistiller's `FactorTransfer` (p1 = 2, p2 = 1): the larger map pooled
  to the smaller's size, then the mean over the (kept) examples and the
  positions of |factor(s) - factor(t)|."""
  student, teacher = np.float64(student), np.float64(teacher)
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  size = (min(student.shape[1], teacher.shape[1]),
          min(student.shape[2], teacher.shape[2]))
  if student.shape[1:3] != size:
    student = _np_pool(student, size)
  if teacher.shape[1:3] != size:
    teacher = _np_pool(teacher, size)
  return np.abs(_np_factor(student) - _np_factor(teacher)).mean()


def _np_mse(reconstruction, target, keep=None):
  """`nn.MSELoss()` over the (kept) examples: the mean of all squares."""
  reconstruction, target = np.float64(reconstruction), np.float64(target)
  if keep is not None:
    reconstruction, target = reconstruction[keep], target[keep]
  return ((reconstruction - target)**2).mean()


def _np_leaky(x):
  return np.where(x > 0, x, 0.1 * x)


def _np_paraphraser(params, x):
  """RepDistiller's `Paraphraser(use_bn=False)`: `(factor, reconstruction)`."""
  for i in range(3):
    x = _np_leaky(np_conv(x, params[f'encoder{i}'], 1, 1))
  code = x
  for i in range(3):
    x = _np_leaky(np_transposed_conv(x, params[f'decoder{i}'], 1, 1))
  return code, x


def _np_translator(params, x):
  """RepDistiller's `Translator`: (conv3x3, batch norm, LeakyReLU) x 3."""
  for i in range(3):
    x = _np_leaky(np_batch_norm(np_conv(x, params[f'conv{i}'], 1, 1),
                                 params[f'bn{i}']))
  return x


@pytest.fixture(scope='module')
def paraphraser_params():
  """`Paraphraser(6, 0.5)`'s initial parameters (compiled once)."""
  module = ft.Paraphraser(6, 0.5)
  teacher = np.zeros((1, 2, 2, 6), np.float32)
  return jax.jit(module.init)(jax.random.PRNGKey(0), [], [teacher])['params']


def _section(**overrides):
  return objective.default_section(
      ft.METHOD, **{'student_layers': 's', 'teacher_layers': 't',
                    **overrides})


# --- the factor. --------------------------------------------------------------


def test_factor_is_normalised_channel_mean_of_squares():
  # (Eagerly too, in test_factor_transfer_loss_reference_values[False].)
  maps, = standard_normal(0, (4, 2, 3, 3))
  factor = np.asarray(_jit_factor(maps))
  assert factor.shape == (4, 6) and factor.dtype == np.float32
  np.testing.assert_allclose(factor, _np_factor(maps), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(factor, axis=1), 1.0, rtol=1e-6)
  # Position (0, 1) is entry 1 (row-major, PyTorch's view of [B, H, W]).
  squares = (np.float64(maps)**2).mean(axis=-1)
  np.testing.assert_allclose(
      factor[:, 1] * np.linalg.norm(squares.reshape(4, -1), axis=1),
      squares[:, 0, 1], rtol=1e-6)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    ft.factor(maps[0])


def test_factor_extreme_inputs():
  maps, = standard_normal(1, (4, 2, 3, 3))
  # Huge maps, whose squares (and the squares' squares) overflow float32:
  # the same factor.
  np.testing.assert_allclose(_jit_factor(maps * np.float32(1e30)),
                             _np_factor(maps), rtol=1e-5)
  # F.normalize's q / 1e-12 of q ~ 1e-60: ~1e-48, 0 in float32.
  np.testing.assert_array_equal(_jit_factor(maps * np.float32(1e-30)), 0.0)
  # Below F.normalize's eps the factor is q / 1e-12, not a unit vector.
  small = maps * np.float32(1e-8)  # q ~ 1e-16, |q| < 1e-12.
  np.testing.assert_allclose(_jit_factor(small), _np_factor(small),
                             rtol=1e-5)
  assert np.all(np.linalg.norm(_np_factor(small), axis=1) < 1e-2)
  # A zero map: factor 0, gradient finite (and 0).
  zeros = np.zeros((4, 2, 3, 3), np.float32)
  np.testing.assert_array_equal(_jit_factor(zeros), 0.0)
  grad = jax.jit(jax.grad(lambda m: ft.factor(m).sum()))(zeros)
  np.testing.assert_array_equal(grad, 0.0)


# --- the losses. --------------------------------------------------------------

# One compiled value and gradients (student's, teacher's) of each loss, for
# (5, 2, 2, 3) maps and [5] weights (ones for none).
_ONES = np.ones(5, np.float32)
_jit_ft_grads = jax.jit(jax.value_and_grad(
    lambda s, t, w: ft.factor_transfer_loss(s, t, weights=w), argnums=(0, 1)))
_jit_reconstruction_grads = jax.jit(jax.value_and_grad(
    lambda r, t, w: ft.reconstruction_loss(r, t, weights=w), argnums=(0, 1)))


@pytest.mark.parametrize('jit', [False, True])
def test_factor_transfer_loss_reference_values(jit):
  student, teacher = standard_normal(2, (5, 2, 2, 3), (5, 2, 2, 3))
  if not jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(
        ft.factor_transfer_loss(student, teacher, weights=_MASK),
        _np_ft(student, teacher, _KEEP), rtol=1e-5)
    return
  value, (grad, teacher_grad) = _jit_ft_grads(student, teacher, _MASK)
  np.testing.assert_allclose(value, _np_ft(student, teacher, _KEEP),
                             rtol=1e-5)
  assert_only_the_student_learns(grad, teacher_grad, _MASK)
  np.testing.assert_allclose(_jit_ft_grads(student, teacher, _ONES)[0],
                             _np_ft(student, teacher), rtol=1e-5)
  # Without weights, and a batch of one.
  np.testing.assert_allclose(_jit_loss(student[:1], teacher[:1]),
                             _np_ft(student[:1], teacher[:1]), rtol=1e-5)


def test_factor_transfer_loss_pools_the_larger_map_and_errors():
  # The channel counts may differ too (the factor averages them out).
  small, large = standard_normal(3, (5, 2, 2, 3), (5, 4, 4, 6))
  np.testing.assert_allclose(_jit_loss(small, large, weights=_MASK),
                             _np_ft(small, large, _KEEP), rtol=1e-5)
  np.testing.assert_allclose(_jit_loss(large, small, weights=_MASK),
                             _np_ft(large, small, _KEEP), rtol=1e-5)
  # The same factor up to a scale: 0.
  np.testing.assert_allclose(_jit_ft_grads(small, small * 7, _ONES)[0], 0.0,
                             atol=1e-7)
  with pytest.raises(ValueError, match=r'spatial sizes \(2, 2\) and '
                     r'\(3, 3\)'):
    ft.factor_transfer_loss(small, large[:, :3, :3])
  with pytest.raises(ValueError, match='batch size'):
    ft.factor_transfer_loss(small, large[:4])
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    ft.factor_transfer_loss(small[0], large[0])


def test_factor_transfer_loss_padded_rows_and_extremes():
  student, teacher = standard_normal(4, (5, 2, 2, 3), (5, 2, 2, 3))
  # Padded rows holding anything reach neither value nor gradient.
  padded_student, padded_teacher = student.copy(), teacher.copy()
  padded_student[~_KEEP], padded_teacher[~_KEEP] = np.nan, np.inf
  value, grads = _jit_ft_grads(padded_student, padded_teacher, _MASK)
  np.testing.assert_allclose(value, _np_ft(student, teacher, _KEEP),
                             rtol=1e-5)
  assert_only_the_student_learns(*grads, _MASK)
  # Huge and tiny maps (the tiny one's factor is ~0, below F.normalize's
  # eps).
  np.testing.assert_allclose(
      _jit_ft_grads(student * np.float32(1e25), teacher * np.float32(1e-25),
                    _ONES)[0],
      _np_ft(np.float64(student) * 1e25, np.float64(teacher) * 1e-25),
      rtol=1e-5)
  # A zero student map: factor 0, the loss the teacher factor's mean, and
  # no gradient (nor NaN).
  value, (grad, _) = _jit_ft_grads(np.zeros_like(student), teacher, _ONES)
  np.testing.assert_allclose(value, _np_factor(teacher).mean(), rtol=1e-5)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('jit', [False, True])
def test_reconstruction_loss_is_mse(jit):
  reconstruction, target = standard_normal(6, (5, 2, 2, 3), (5, 2, 2, 3))
  if not jit:
    np.testing.assert_allclose(
        ft.reconstruction_loss(reconstruction, target, weights=_MASK),
        _np_mse(reconstruction, target, _KEEP), rtol=1e-6)
    with pytest.raises(ValueError, match='same shape'):
      ft.reconstruction_loss(reconstruction, target[:, :1])
    return
  np.testing.assert_allclose(
      _jit_reconstruction_grads(reconstruction, target, _ONES)[0],
      _np_mse(reconstruction, target), rtol=1e-6)
  np.testing.assert_allclose(_jit_reconstruction(reconstruction[:1],
                                                 target[:1]),
                             _np_mse(reconstruction[:1], target[:1]),
                             rtol=1e-6)
  # Large but finite.
  np.testing.assert_allclose(
      _jit_reconstruction_grads(reconstruction * 1e18, target, _ONES)[0],
      _np_mse(reconstruction * 1e18, target), rtol=1e-5)
  # Padded rows holding anything are left out; the target is a constant.
  padded, padded_target = reconstruction.copy(), target.copy()
  padded[~_KEEP], padded_target[~_KEEP] = np.nan, -np.inf
  value, grads = _jit_reconstruction_grads(padded, padded_target, _MASK)
  np.testing.assert_allclose(value, _np_mse(reconstruction, target, _KEEP),
                             rtol=1e-6)
  assert_only_the_student_learns(*grads, _MASK)


def test_gradients_match_finite_differences_in_float64():
  # Both losses at once: FT against a larger (pooled) teacher map with other
  # channels, and the reconstruction error.
  student, large, target = standard_normal(7, (5, 2, 2, 3), (5, 4, 4, 2),
                                           (5, 2, 2, 3))
  assert_gradient_matches_finite_differences(
      lambda s, t, w: ft.factor_transfer_loss(s, t[0], weights=w)
      + 0.1 * ft.reconstruction_loss(s, t[1], weights=w), student,
      args=([large, target], _MASK), zero_rows=_MASK, eps=1e-6)


# --- the paraphraser and the translator. --------------------------------------

# Parameter counts of RepDistiller's modules (models/util.py at HEAD of
# HobbitLong/RepDistiller), from `sum(p.numel() for p in m.parameters())` of
# `Paraphraser((1, C, 4, 4), k=rate)` and `Translator((1, Cs, 4, 4), (1, Ct,
# 4, 4), k=rate)`, computed once with PyTorch 2 (CPU).
_TORCH_PARAPHRASER = {(6, 0.5): 1161, (256, 0.5): 2065536, (5, 0.4): 723,
                      (8, 1.0): 3504}
_TORCH_TRANSLATOR = {(4, 6, 0.5): 363, (256, 256, 0.5): 1033728,
                     (960, 256, 0.5): 9551424}


def test_module_parameter_counts_are_repdistillers():
  for (channels, rate), expected in _TORCH_PARAPHRASER.items():
    module = ft.Paraphraser(channels, rate)
    t = jax.ShapeDtypeStruct((2, 4, 4, channels), np.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), [], [t])
    assert param_count(params) == expected, (channels, rate)
  for (cs, ct, rate), expected in _TORCH_TRANSLATOR.items():
    module = ft.METHOD.module(_section(rate=rate), [(4, 4, cs)],
                              [(4, 4, ct)])
    s = jax.ShapeDtypeStruct((2, 4, 4, cs), np.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), [s])
    assert param_count(params) == expected, (cs, ct, rate)


def test_paraphraser_is_repdistillers(paraphraser_params):
  teacher, = standard_normal(8, (3, 4, 4, 6))
  module = ft.PARAPHRASER_TERM.module(_section(), [], [(4, 4, 6)])
  assert (module.channels, module.rate) == (6, 0.5)
  params = paraphraser_params
  assert sorted(params) == [f'{part}{i}' for part in ('decoder', 'encoder')
                            for i in range(3)]
  assert params['encoder1']['kernel'].shape == (3, 3, 6, 3)
  # Transposed kernels: (k, k, out, in), PyTorch's (in, out, k, k).
  assert params['decoder1']['kernel'].shape == (3, 3, 6, 3)
  # PyTorch's default init: U(-1 / sqrt(fan_in), ...), fan_in 54 for the
  # first convolution and 9 * out = 54 for the last transposed one.
  for name in ('encoder0', 'decoder2'):
    assert np.max(np.abs(params[name]['kernel'])) <= 1 / np.sqrt(54)
    assert np.max(np.abs(params[name]['bias'])) <= 1 / np.sqrt(54)
  # Both outputs, and the factor alone (RepDistiller's is_factor=True).
  (code, reconstruction), factor_only = jax.jit(lambda p, t: (
      module.apply(p, [], [t]),
      module.apply(p, t, method=ft.Paraphraser.encode)))({'params': params},
                                                        teacher)
  assert code.shape == (3, 4, 4, 3) and reconstruction.shape == teacher.shape
  np_code, np_reconstruction = _np_paraphraser(params, teacher)
  np.testing.assert_allclose(code, np_code, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(reconstruction, np_reconstruction, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(factor_only, np_code, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='one teacher map and no student'):
    module.apply({'params': params}, [teacher], [teacher])


def test_translator_is_repdistillers_with_batch_statistics():
  student, = standard_normal(9, (5, 4, 4, 3))
  module = ft.METHOD.module(_section(), [(4, 4, 3)], [(2, 2, 8)])
  assert module.channels_out == 4  # int(8 * 0.5).
  params = random_params(module, 1, [student])
  assert params['conv0']['kernel'].shape == (3, 3, 3, 3)
  assert params['conv2']['kernel'].shape == (3, 3, 4, 4)
  out = jax.jit(module.apply)({'params': params}, [student])
  assert out.shape == (5, 4, 4, 4)
  np.testing.assert_allclose(out, _np_translator(params, student), rtol=1e-4,
                             atol=1e-5)


def test_module_builders_refuse_what_they_cannot_map():
  with pytest.raises(ValueError, match=r"student layer 's' \(3, 3, 4\) and "
                     r"teacher layer 't' \(2, 2, 8\)"):
    ft.METHOD.module(_section(), [(3, 3, 4)], [(2, 2, 8)])
  with pytest.raises(ValueError, match=r"student layer 's' \(8,\)"):
    ft.METHOD.module(_section(), [(8,)], [(2, 2, 8)])
  with pytest.raises(ValueError, match=r"teacher layer 't' \(2, 2, 1\): rate "
                     '0.5 leaves'):
    ft.PARAPHRASER_TERM.module(_section(), [], [(2, 2, 1)])
  with pytest.raises(ValueError, match=r"teacher layer 't' \(16,\)"):
    ft.PARAPHRASER_TERM.module(_section(), [], [(16,)])


# --- the terms. ---------------------------------------------------------------


def test_paraphraser_term_trains_the_paraphraser_only(paraphraser_params):
  section = _section(weight=1.0)
  assert ft.PARAPHRASER_TERM.teacher_layers(section) == ('t',)
  assert ft.PARAPHRASER_TERM.student_layers(section) == ()
  module = ft.PARAPHRASER_TERM.module(section, [], [(2, 2, 6)])
  teacher = {'t': standard_normal(10, (5, 2, 2, 6))[0]}
  params = paraphraser_params
  term = ft.PARAPHRASER_TERM.loss(section)
  logits = np.zeros((5, 10), np.float32)
  batch = term_batch(_MASK)

  def evaluate(params, teacher_features):
    out = module.apply({'params': params}, [], [teacher_features['t']])
    return term(objective.Outputs(logits, {}, {'ft_paraphraser': out}),
                objective.Outputs(logits, teacher_features), batch)[0]

  value, (param_grad, teacher_grad) = jax.jit(jax.value_and_grad(
      evaluate, argnums=(0, 1)))(params, teacher)
  _, reconstruction = _np_paraphraser(params, teacher['t'])
  np.testing.assert_allclose(value, _np_mse(reconstruction, teacher['t'],
                                            _KEEP), rtol=1e-5)
  assert_trains(param_grad)
  np.testing.assert_array_equal(teacher_grad['t'], 0.0)


def test_ft_term_trains_the_translator_and_the_teacher_gets_no_gradient(
    paraphraser_params):
  section = _section()
  student = {'s': standard_normal(11, (5, 4, 4, 3))[0]}
  teacher = {'t': standard_normal(12, (5, 2, 2, 6))[0]}
  # The paraphraser's parameters as the preparation stage leaves them: the
  # `params` of `Paraphraser(6, 0.5).init`.
  term = ft.METHOD.loss(section, paraphraser_params)
  translator = ft.METHOD.module(section, [(4, 4, 3)], [(2, 2, 6)])
  params = random_params(translator, 4, [student['s']])
  value, (param_grad, student_grad, teacher_grad), (
      output_grad, output_teacher_grad) = module_term_gradients(
          translator, term, 'ft', params, student, teacher,
          term_batch(_MASK), ['s'])
  # The student's factor maps (4x4) pooled to the teacher's (2x2).
  student_factor = _np_translator(params, student['s'])
  teacher_factor, _ = _np_paraphraser(paraphraser_params, teacher['t'])
  np.testing.assert_allclose(
      value, _np_ft(student_factor, teacher_factor, _KEEP), rtol=1e-4)
  assert_trains(param_grad)  # Convolutions, scales and biases.
  assert_trains(student_grad)
  np.testing.assert_array_equal(teacher_grad['t'], 0.0)
  # The term itself, on the translator's output: padded rows get nothing.
  # (Through the translator they do, by the batch statistics, as through
  # the student's own batch norms: training batches are never padded.)
  assert_only_the_student_learns(output_grad, output_teacher_grad, _MASK)


# --- the record. --------------------------------------------------------------


def test_record():
  section = objective.default_section(ft.METHOD)
  # RepDistiller's -b 200, k = 0.5 and init_epochs 30; the seed layers.
  assert (section.weight, section.rate, section.paraphraser_epochs,
          section.student_layers, section.teacher_layers) == (
              200.0, 0.5, 30, 'conv2', 'block2')
  assert ft.METHOD.terms == ('ce', 'ft')
  assert ft.METHOD.prepared_by == ft.PARAPHRASER_TERM.name == 'ft_paraphraser'
  preparation = ft.METHOD.preparation
  assert preparation.term is ft.PARAPHRASER_TERM
  assert preparation.trains == 'modules' and preparation.trains in (
      objective.TRAINS)
  config = ml_collections.ConfigDict(
      {'distill': {'ft': {'paraphraser_epochs': 4}}})
  assert preparation.epochs(config) == 4
  assert ft.PARAPHRASER_TERM.module_reads_teacher
  assert ft.PARAPHRASER_TERM.reads_teacher
  assert not ft.METHOD.module_reads_teacher
  # Exactly one layer of each network; the rate in (0, 1].
  assert ft.METHOD.check(section, {}) == []
  problems = ft.METHOD.check(_section(student_layers='a,b'), {})
  assert len(problems) == 1 and 'config.distill.ft.student_layers' in (
      problems[0])
  rate = ft.METHOD.settings['rate'].field
  assert [rate.problem('rate', v) is None for v in (0.0, 0.25, 1.0, 1.5)] == [
      False, True, True, False]
  # On a CIFAR pair, each network's last stage (RepDistiller's feat[-2]).
  assert ft.METHOD.zoo_settings(
      ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'embedding'),
      ('stem', 'stage1', 'stage2', 'stage3', 'embedding')) == {
          'student_layers': 'stage3', 'teacher_layers': 'stage4'}
