"""Tests for `kd_jax.methods.vid` (variational information distillation, Ahn
et al., CVPR 2019)."""

import jax
import numpy as np
import pytest

from kd_jax import methods
from kd_jax import objective
from kd_jax.methods import vid
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_rejected
from method_checks import assert_trains
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import term_batch

_MASK = np.array([1, 1, 0, 1, 0], np.float32)
_jit_loss = jax.jit(vid.vid_loss)


# --- float64 NumPy references, written from the paper's equations. ----------


def _np_vid(mean, target, variance, keep=None):
  """Mean over examples, positions and channels of the Gaussian negative
  log-likelihood `-log N(t; mu, sigma^2) - log(2 pi) / 2`."""
  if keep is not None:
    mean, target = mean[keep], target[keep]
  mean, target = np.float64(mean), np.float64(target)
  variance = np.float64(variance)
  return np.mean(0.5 * np.log(variance)
                 + (target - mean)**2 / (2 * variance))


def _np_pool(maps, size):
  """Average pooling of `[B, H, W, C]` to `size`, cell by cell."""
  h, w = size
  fh, fw = maps.shape[1] // h, maps.shape[2] // w
  return np.array([[[m[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(
      axis=(0, 1)) for j in range(w)] for i in range(h)] for m in maps])


def _np_regressor(params, pair, x):
  """RepDistiller's mu: conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1."""
  x = np.float64(x)
  for j in range(3):
    if j:
      x = np.maximum(x, 0.0)
    kernel = np.float64(params[f'pair{pair}_conv{j}']['kernel'])[0, 0]
    x = x @ kernel  # A 1x1 convolution: a matrix per position.
  return x


def _arrays(seed=0, shape=(5, 3, 3, 4)):
  rng = np.random.default_rng(seed)
  mean, target = rng.standard_normal((2,) + shape).astype(np.float32)
  variance = rng.uniform(0.3, 3.0, shape[-1:]).astype(np.float32)
  return mean, target, variance


# --- the loss. ----------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  mean, target, variance = _arrays()
  loss = _jit_loss if jit else vid.vid_loss
  np.testing.assert_allclose(
      loss(mean, target, variance, weights=_MASK),
      _np_vid(mean, target, variance, _MASK.astype(bool)), rtol=1e-5)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(loss(mean, target, variance),
                               _np_vid(mean, target, variance), rtol=1e-5)


def test_invariants():
  mean, target, variance = _arrays(1)
  # A perfect prediction leaves the variance term alone, which may be
  # negative.
  np.testing.assert_allclose(_jit_loss(target, target, variance),
                             0.5 * np.mean(np.log(variance)), rtol=1e-5)
  # For a given prediction, the best variance of a channel is its mean
  # squared error (the gradient with respect to the variance vanishes).
  best = np.mean((target - mean)**2, axis=(0, 1, 2))
  grad = jax.jit(jax.grad(vid.vid_loss, argnums=2))(mean, target, best)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  # Positions and examples may be reordered alike.
  reference = _jit_loss(mean, target, variance)
  np.testing.assert_allclose(
      _jit_loss(mean[::-1, :, ::-1], target[::-1, :, ::-1], variance),
      reference, rtol=1e-6)


def test_layers_sum_pool_the_larger_teacher_and_errors():
  (m1, t1, v1), (m2, _, v2) = _arrays(2), _arrays(3, (5, 2, 2, 3))
  t2 = np.random.default_rng(4).standard_normal((5, 4, 4, 3)).astype(
      np.float32)
  summed = jax.jit(vid.multi_layer_vid_loss)
  total, aux = summed([(m1, v1), (m2, v2)], [t1, t2])
  assert aux == {}
  np.testing.assert_allclose(
      total, _np_vid(m1, t1, v1) + _np_vid(m2, _np_pool(t2, (2, 2)), v2),
      rtol=1e-5)
  with pytest.raises(ValueError, match='at least one'):
    vid.multi_layer_vid_loss([], [])
  with pytest.raises(ValueError, match=r'layer 1: spatial sizes \(2, 2\) '
                     r'and \(3, 3\)'):
    summed([(m1, v1), (m2, v2)], [t1, t1[..., :3]])
  with pytest.raises(ValueError, match='variance'):
    vid.vid_loss(m1, t1, v2)


def test_gradient_matches_finite_differences_in_float64():
  mean, target, variance = _arrays(5)
  # The mean's masked rows get no gradient; the variance has no rows.
  assert_gradient_matches_finite_differences(
      lambda mv, t, w: vid.vid_loss(mv[0], t, mv[1], weights=w),
      (mean, variance), args=(target, _MASK), zero_rows=(_MASK, None),
      eps=1e-6)


# --- the module, the record's term and its configs. ---------------------------


def _section(**overrides):
  return methods.default_section('vid', student_layers='a,b',
                                 teacher_layers='x,y', **overrides)


def test_module_is_repdistillers_regressor_and_variance():
  # Pair 0: the student's 4x4 map is pooled to the teacher's 2x2; pair 1:
  # equal sizes.
  module = vid.METHOD.module(_section(), [(4, 4, 3), (2, 2, 5)],
                             [(2, 2, 6), (2, 2, 4)])
  rng = np.random.default_rng(6)
  features = [rng.standard_normal((5, 4, 4, 3)).astype(np.float32),
              rng.standard_normal((5, 2, 2, 5)).astype(np.float32)]
  params = module.init(jax.random.PRNGKey(0), features)['params']
  # Middle width: the teacher's channels (RepDistiller's VIDLoss(s, t, t)).
  assert params['pair0_conv0']['kernel'].shape == (1, 1, 3, 6)
  assert params['pair0_conv1']['kernel'].shape == (1, 1, 6, 6)
  assert params['pair1_conv2']['kernel'].shape == (1, 1, 4, 4)
  assert set(params['pair0_conv0']) == {'kernel'}  # No biases.
  outputs = jax.jit(module.apply)({'params': params}, features)
  (mean0, var0), (mean1, var1) = outputs
  np.testing.assert_allclose(
      mean0, _np_regressor(params, 0, _np_pool(features[0], (2, 2))),
      rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(mean1, _np_regressor(params, 1, features[1]),
                             rtol=1e-4, atol=1e-6)
  # Every variance starts at init_pred_var.
  np.testing.assert_allclose(var0, np.full(6, 5.0), rtol=1e-6)
  np.testing.assert_allclose(var1, np.full(4, 5.0), rtol=1e-6)
  # Sizes that cannot be pooled, or vectors: an error naming both layers.
  with pytest.raises(ValueError, match=r"student layer 'b' \(3, 3, 5\) and "
                     r"teacher layer 'y' \(2, 2, 4\)"):
    vid.METHOD.module(_section(), [(4, 4, 3), (3, 3, 5)],
                      [(2, 2, 6), (2, 2, 4)])
  with pytest.raises(ValueError, match=r"student layer 'a' \(8,\)"):
    vid.METHOD.module(_section(), [(8,), (2, 2, 5)], [(2, 2, 6), (2, 2, 4)])


def test_term_trains_the_module_and_the_teacher_gets_no_gradient():
  module = vid.METHOD.module(_section(init_pred_var=2.0), [(2, 2, 3)] * 2,
                             [(4, 4, 6), (2, 2, 4)])
  rng = np.random.default_rng(7)
  features = {'a': rng.standard_normal((5, 2, 2, 3)).astype(np.float32),
              'b': rng.standard_normal((5, 2, 2, 3)).astype(np.float32)}
  teacher = {'x': rng.standard_normal((5, 4, 4, 6)).astype(np.float32),
             'y': rng.standard_normal((5, 2, 2, 4)).astype(np.float32)}
  params = module.init(jax.random.PRNGKey(1),
                       [features['a'], features['b']])['params']
  term = vid.METHOD.loss(_section(init_pred_var=2.0))
  logits = np.zeros((5, 10), np.float32)
  batch = term_batch(_MASK)

  def evaluate(params, student_features, teacher_features):
    out = module.apply({'params': params},
                       [student_features['a'], student_features['b']])
    return term(objective.Outputs(logits, student_features, {'vid': out}),
                objective.Outputs(logits, teacher_features), batch)[0]

  value, (param_grad, student_grad, teacher_grad) = jax.jit(
      jax.value_and_grad(evaluate, argnums=(0, 1, 2)))(params, features,
                                                       teacher)
  (m0, v0), (m1, v1) = module.apply({'params': params},
                                    [features['a'], features['b']])
  keep = _MASK.astype(bool)
  np.testing.assert_allclose(
      value, _np_vid(m0, _np_pool(teacher['x'], (2, 2)), v0, keep)
      + _np_vid(m1, teacher['y'], v1, keep), rtol=1e-5)
  assert_trains(param_grad)  # Regressors and variances.
  assert_only_the_student_learns(student_grad, teacher_grad, _MASK)


def test_defaults_and_configs():
  section = methods.default_section('vid')
  # RepDistiller's -b 1, init_pred_var 5.0 and eps 1e-5.
  assert (section.weight, section.init_pred_var, section.eps) == (1.0, 5.0,
                                                                  1e-5)
  assert methods.reference('vid') == 'Ahn et al., CVPR 2019'
  config, = quick_configs('vid', ('quick',))
  assert methods.teacher_layers(config.distill) == ('conv2',)
  config.distill.vid.init_pred_var = 1e-6
  assert_rejected(config, 'larger than')
  config.distill.vid.init_pred_var = 5.0
  config.distill.vid.student_layers = 'conv1,conv2'
  assert_rejected(config, '2 student and 1 teacher')
  # On a CIFAR pair, every stage both networks have (RepDistiller's
  # feat[1:-1]).
  cifar_pair_config('vid', 'stage1,stage2,stage3', 'stage1,stage2,stage3')
