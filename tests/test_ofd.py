"""Tests for `kd_jax.methods.ofd` (overhaul of feature distillation, Heo et
al., ICCV 2019), the teacher-constants mechanism it uses and the models'
maps to the batch norm before a ReLU."""

import functools
import math

import flax
import jax
import numpy as np
import pytest

from experiments import ofd as ofd_experiment
from kd_jax import errors
from kd_jax import distil_setup
from kd_jax import methods
from kd_jax import models
from kd_jax import objective
from kd_jax import zoo
from kd_jax.methods import ofd
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_only_the_student_learns
from method_checks import assert_rejected
from method_checks import assert_trains
from method_checks import cifar_pair_config
from method_checks import quick_configs
from method_checks import term_batch

_MASK = np.array([1, 1, 0, 1, 0], np.float32)
_KEEP = _MASK.astype(bool)
_jit_loss = jax.jit(ofd.ofd_loss)
_jit_margin = jax.jit(ofd.margin_from_batch_norm)


# --- float64 NumPy references, written from the paper and the authors' code. -


def _np_margin(scale, bias):
  """The authors' `get_margin_from_BN`, channel by channel, in float64
  (`norm.cdf` from `math.erf`)."""
  margins = []
  for s, m in zip(np.float64(scale), np.float64(bias)):
    s = abs(s)
    if s == 0:  # Theirs divides by zero; here the point mass at beta.
      margins.append(min(m, 0.0))
      continue
    below = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
    if below > 0.001:
      margins.append(-s * math.exp(-(m / s)**2 / 2) / math.sqrt(2 * math.pi)
                     / below + m)
    else:
      margins.append(-3 * s)
  return np.array(margins)


def _np_partial_l2(student, teacher, margin, keep=None):
  """Mean over the kept examples of the sum of `(s - t')^2` where `s > t'`
  or `t' > 0`, `t' = max(t, margin)` (the authors' `distillation_loss`)."""
  student, teacher = np.float64(student), np.float64(teacher)
  if keep is not None:
    student, teacher = student[keep], teacher[keep]
  target = np.maximum(teacher, np.float64(margin))
  counted = (student > target) | (target > 0)
  squares = np.where(counted, (student - target)**2, 0.0)
  return squares.reshape(len(squares), -1).sum(axis=1).mean()


def _np_pool(maps, size):
  """Average pooling of `[B, H, W, C]` to `size`, cell by cell."""
  h, w = size
  fh, fw = maps.shape[1] // h, maps.shape[2] // w
  return np.array([[[m[i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(
      axis=(0, 1)) for j in range(w)] for i in range(h)] for m in maps])


def _np_connector(params, level, x):
  """The authors' connector: conv1x1 without bias, then BatchNorm2d in train
  mode (the batch's mean and biased variance, eps 1e-5)."""
  kernel = np.float64(params[f'connector{level}_conv']['kernel'])[0, 0]
  y = np.float64(x) @ kernel  # A 1x1 convolution: a matrix per position.
  bn = params[f'connector{level}_bn']
  mean = y.mean(axis=(0, 1, 2))
  variance = ((y - mean)**2).mean(axis=(0, 1, 2))
  return ((y - mean) / np.sqrt(variance + 1e-5) * np.float64(bn['scale'])
          + np.float64(bn['bias']))


def _maps(seed=0, shape=(5, 3, 3, 4)):
  rng = np.random.default_rng(seed)
  student, teacher = rng.standard_normal((2,) + shape).astype(np.float32)
  margin = -rng.uniform(0.05, 1.5, shape[-1:]).astype(np.float32)
  return student, teacher, margin


# --- the margin. --------------------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_margin_is_the_authors_closed_form(jit):
  scale = np.array([1.0, 0.5, -2.0, 0.3, 1.0, 2.0, 0.7, 1.0, 0.0, 0.0,
                    1.0], np.float32)
  # Beta / |gamma|: 0, 1, -0.5 (gamma < 0: |gamma| is used), -10 (almost
  # always negative: the margin is beta), 3.0 (Phi(-3) = 0.00135 > 0.001:
  # the closed form), 3.2 (0.00069: the fallback -3 |gamma|), 20 and 100
  # (the fallback; far in the tail), gamma = 0, and 3.09 (just above).
  bias = np.array([0.0, 0.5, 1.0, -3.0, 3.0, 6.4, 14.0, 100.0, 0.5, -0.25,
                   3.08], np.float32)
  margin = np.asarray(
      (_jit_margin if jit else ofd.margin_from_batch_norm)(scale, bias))
  assert margin.dtype == np.float32
  np.testing.assert_allclose(margin, _np_margin(scale, bias), rtol=1e-5,
                             atol=1e-6)
  assert np.all(np.asarray(margin) <= 0)
  np.testing.assert_allclose(margin[0], -math.sqrt(2 / math.pi), rtol=1e-6)
  np.testing.assert_allclose(margin[[5, 6, 7]], [-6.0, -2.1, -3.0])
  np.testing.assert_allclose(margin[[8, 9]], [0.0, -0.25])
  assert ofd.INITIAL_MARGIN == pytest.approx(float(margin[0]))


def test_margin_is_the_mean_of_the_negative_responses():
  # Monte Carlo: the mean of the negative samples of N(beta, gamma^2).
  scale = np.array([1.0, 0.5, 2.0, 1.5], np.float32)
  bias = np.array([0.0, 0.4, -1.0, 2.0], np.float32)
  margin = _jit_margin(scale, bias)
  x = bias + scale * np.random.default_rng(0).standard_normal((400_000, 4))
  estimate = [x[:, c][x[:, c] < 0].mean() for c in range(4)]
  np.testing.assert_allclose(margin, estimate, rtol=0.02)


# --- the partial L2 loss. -----------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
def test_reference_values(jit):
  student, teacher, margin = _maps()
  loss = _jit_loss if jit else ofd.ofd_loss
  np.testing.assert_allclose(
      loss(student, teacher, margin, weights=_MASK),
      _np_partial_l2(student, teacher, margin, _KEEP), rtol=1e-5)
  if jit:  # Eager mode once only: it is slow.
    np.testing.assert_allclose(loss(student, teacher, margin),
                               _np_partial_l2(student, teacher, margin),
                               rtol=1e-5)
    # A batch of one, and a scalar margin.
    np.testing.assert_allclose(
        loss(student[:1], teacher[:1], -0.5),
        _np_partial_l2(student[:1], teacher[:1], -0.5), rtol=1e-5)


def test_what_is_counted_and_extreme_inputs():
  margin = np.array([-0.5], np.float32)
  # Per element: (student, teacher) -> counted square.
  cases = [((1.0, 2.0), 1.0),     # t' > 0: always counted.
           ((3.0, 2.0), 1.0),
           ((-2.0, -1.0), 0.0),   # s below t' <= 0: the ReLU hides it.
           ((0.5, -1.0), 1.0),    # s above t' = max(-1, -0.5) = -0.5.
           ((-0.4, -0.2), 0.0),   # s below t' = -0.2.
           ((-1e30, -np.inf), 0.0),  # t' = margin; s far below.
           ((-np.inf, 1e3), np.inf),  # t' > 0: counted, infinite.
           ((1e18, -1e30), 1e36)]  # Large but finite.
  for (s, t), expected in cases:
    student = np.full((1, 1, 1, 1), s, np.float32)
    teacher = np.full((1, 1, 1, 1), t, np.float32)
    value = _jit_loss(student, teacher, margin)
    np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=(s, t))
  # Left-out elements pass no NaN to the gradient, even at -inf.
  student = np.array([-np.inf, -1e30, -2.0, 1.0], np.float32).reshape(
      1, 1, 1, 4)
  teacher = np.array([-1.0, -np.inf, -1.0, 0.5], np.float32).reshape(
      1, 1, 1, 4)
  grad = jax.jit(jax.grad(ofd.ofd_loss))(student, teacher, -0.5)
  np.testing.assert_array_equal(grad.ravel(), [0.0, 0.0, 0.0, 1.0])
  # Padded rows holding anything reach neither value nor gradient.
  student, teacher, margin = _maps(1)
  student[~_KEEP], teacher[~_KEEP] = np.nan, np.inf
  value, grad = jax.jit(jax.value_and_grad(
      lambda s: ofd.ofd_loss(s, teacher, margin, weights=_MASK)))(student)
  np.testing.assert_allclose(
      value, _np_partial_l2(student, teacher, margin, _KEEP), rtol=1e-5)
  np.testing.assert_array_equal(grad[~_KEEP], 0.0)
  assert np.all(np.isfinite(grad))


def test_levels_are_weighted_and_pooled_and_errors():
  (s1, t1, m1), (s2, t2, m2) = _maps(2), _maps(3, (5, 2, 2, 3))
  t2_large = np.random.default_rng(4).standard_normal((5, 4, 4, 3)).astype(
      np.float32)
  total, aux = jax.jit(ofd.multi_level_ofd_loss)(
      [s1, s2], [t1, t2_large], [m1, m2], weights=_MASK)
  assert aux == {}
  # The authors' `/ 2 ** (feat_num - i - 1)`: 1/2 for the first of two
  # levels, 1 for the last; the larger teacher map pooled to the student's.
  np.testing.assert_allclose(
      total, _np_partial_l2(s1, t1, m1, _KEEP) / 2
      + _np_partial_l2(s2, _np_pool(t2_large, (2, 2)), m2, _KEEP), rtol=1e-5)
  # Without margins: those of a batch norm at its initialisation.
  np.testing.assert_allclose(
      ofd.multi_level_ofd_loss([s1], [t1])[0],
      _np_partial_l2(s1, t1, -math.sqrt(2 / math.pi)), rtol=1e-5)
  with pytest.raises(ValueError, match='at least one'):
    ofd.multi_level_ofd_loss([], [])
  with pytest.raises(ValueError, match='1 margins for 2 levels'):
    ofd.multi_level_ofd_loss([s1, s2], [t1, t2], [m1])
  with pytest.raises(ValueError, match=r'level 1: spatial sizes \(2, 2\) '
                     r'and \(3, 3\)'):
    ofd.multi_level_ofd_loss([s1, s2], [t1, t1[..., :3]])
  with pytest.raises(ValueError, match=r'margin \(3,\) must be \[C\]'):
    ofd.ofd_loss(s1, t1, m2)
  with pytest.raises(ValueError, match='same shape'):
    ofd.ofd_loss(s1, t2, m1)


def test_gradient_matches_finite_differences_in_float64():
  student, teacher, margin = _maps(5, (5, 3, 3, 6))
  assert_gradient_matches_finite_differences(
      lambda s, t, w: ofd.ofd_loss(s, t, margin.astype(np.float64),
                                   weights=w),
      student, args=(teacher, _MASK), zero_rows=_MASK, eps=1e-6)
  # Two levels, the teacher's second map pooled.
  t2 = np.random.default_rng(6).standard_normal((5, 6, 6, 6))
  assert_gradient_matches_finite_differences(
      lambda s, t, w: ofd.multi_level_ofd_loss(
          s, t, [margin.astype(np.float64)] * 2, weights=w)[0],
      [student, student[..., ::-1] * 2], args=([teacher, t2], _MASK),
      zero_rows=_MASK, eps=1e-6)


# --- the connector, the record's term and the teacher's constants. ----------


def _section(**overrides):
  return methods.default_section('ofd', student_layers='a,b',
                                 teacher_layers='x,y', **overrides)


def test_connector_is_the_authors_conv1x1_and_batch_norm():
  # Level 0: the student's 4x4 map is pooled to the teacher's 2x2; level 1:
  # equal sizes.
  module = ofd.METHOD.module(_section(), [(4, 4, 3), (2, 2, 64)],
                            [(2, 2, 6), (2, 2, 256)])
  rng = np.random.default_rng(7)
  features = [rng.standard_normal((5, 4, 4, 3)).astype(np.float32),
              rng.standard_normal((5, 2, 2, 64)).astype(np.float32)]
  params = jax.jit(module.init)(jax.random.PRNGKey(0), features)['params']
  assert set(params['connector0_conv']) == {'kernel'}  # No bias.
  assert params['connector0_conv']['kernel'].shape == (1, 1, 3, 6)
  # He-normal fan_out, the authors' N(0, sqrt(2 / out_channels)).
  kernel = params['connector1_conv']['kernel']
  assert kernel.shape == (1, 1, 64, 256)
  assert np.std(kernel) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
  np.testing.assert_array_equal(params['connector1_bn']['scale'], 1.0)
  np.testing.assert_array_equal(params['connector1_bn']['bias'], 0.0)
  # Some scale and bias, to see them used.
  params = flax.core.unfreeze(params)
  params['connector0_bn']['scale'] = rng.uniform(0.5, 2, 6).astype(
      np.float32)
  params['connector0_bn']['bias'] = rng.standard_normal(6).astype(np.float32)
  out0, out1 = jax.jit(module.apply)({'params': params}, features)
  np.testing.assert_allclose(
      out0, _np_connector(params, 0, _np_pool(features[0], (2, 2))),
      rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out1, _np_connector(params, 1, features[1]),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"student layer 'b' \(3, 3, 5\) and "
                     r"teacher layer 'y' \(2, 2, 4\)"):
    ofd.METHOD.module(_section(), [(4, 4, 3), (3, 3, 5)],
                      [(2, 2, 6), (2, 2, 4)])


def test_term_trains_the_connectors_and_the_teacher_gets_no_gradient():
  module = ofd.METHOD.module(_section(), [(2, 2, 3)] * 2,
                            [(4, 4, 6), (2, 2, 4)])
  rng = np.random.default_rng(8)
  features = {'a': rng.standard_normal((5, 2, 2, 3)).astype(np.float32),
              'b': rng.standard_normal((5, 2, 2, 3)).astype(np.float32)}
  teacher = {'x': rng.standard_normal((5, 4, 4, 6)).astype(np.float32),
             'y': rng.standard_normal((5, 2, 2, 4)).astype(np.float32)}
  margins = [-rng.uniform(0.1, 1, 6).astype(np.float32),
             -rng.uniform(0.1, 1, 4).astype(np.float32)]
  params = jax.jit(module.init)(jax.random.PRNGKey(1),
                                [features['a'], features['b']])['params']
  term = ofd.METHOD.loss(_section(), margins)
  logits = np.zeros((5, 10), np.float32)
  batch = term_batch(_MASK)

  def evaluate(params, student_features, teacher_features):
    out = module.apply({'params': params},
                       [student_features['a'], student_features['b']])
    return term(objective.Outputs(logits, student_features, {'ofd': out}),
                objective.Outputs(logits, teacher_features), batch)[0]

  value, (param_grad, student_grad, teacher_grad) = jax.jit(
      jax.value_and_grad(evaluate, argnums=(0, 1, 2)))(params, features,
                                                       teacher)
  out0, out1 = jax.jit(module.apply)({'params': params},
                                     [features['a'], features['b']])
  np.testing.assert_allclose(
      value, _np_partial_l2(out0, _np_pool(teacher['x'], (2, 2)), margins[0],
                            _KEEP) / 2
      + _np_partial_l2(out1, teacher['y'], margins[1], _KEEP), rtol=1e-5)
  assert_trains(param_grad)  # Convolutions, scales and biases.
  assert_trains(student_grad)
  for grad in jax.tree.leaves(teacher_grad):
    np.testing.assert_array_equal(grad, 0.0)
  # The term itself, on the connectors' outputs: padded rows get nothing.
  # (Through the connectors they do, by the batch statistics, as through
  # the student's own batch norms: training batches are never padded.)

  def on_outputs(outputs, teacher_features):
    return term(objective.Outputs(logits, {}, {'ofd': outputs}),
                objective.Outputs(logits, teacher_features), batch)[0]

  output_grad, teacher_grad = jax.jit(jax.grad(on_outputs, argnums=(0, 1)))(
      [out0, out1], teacher)
  assert_only_the_student_learns(output_grad, teacher_grad, _MASK)


def _with_batch_norm(variables, path, scale, bias):
  params = flax.core.unfreeze(variables['params'])
  node = params
  for key in path:
    node = node[key]
  node['scale'], node['bias'] = scale, bias
  return {**variables, 'params': params}


def test_margins_come_from_the_teachers_batch_norms():
  config, = quick_configs('ofd', ('quick',))
  # Shapes only but for the two batch norms the margins read.
  variables = jax.eval_shape(functools.partial(
      models.init_variables, models.make_model('bn_cnn'),
      image_shape=(28, 28, 1)), jax.random.PRNGKey(0))
  rng = np.random.default_rng(9)
  norms = {}
  for path, width in ((('bn0_1',), 16), (('bn1_1',), 32)):
    norms[path] = (rng.uniform(0.2, 2, width).astype(np.float32),
                   rng.standard_normal(width).astype(np.float32))
    variables = _with_batch_norm(variables, path, *norms[path])
  constants = methods.teacher_constants(config.distill, 'bn_cnn', variables)
  assert set(constants) == {'ofd'}
  for margin, (scale, bias) in zip(constants['ofd'], norms.values()):
    np.testing.assert_allclose(margin, _np_margin(scale, bias), rtol=1e-5,
                               atol=1e-6)
  # The objective binds them; a term that needs them refuses to go without.
  with pytest.raises(ValueError, match='ofd needs constants'):
    methods.build_objective(config.distill)
  distiller = distil_setup.distiller(config, None, constants=constants)
  rng = np.random.default_rng(10)
  maps = [rng.standard_normal(shape).astype(np.float32)
          for shape in [(5, 14, 14, 16), (5, 7, 7, 32)] * 2]
  student = objective.Outputs(np.zeros((5, 10), np.float32), {},
                              {'ofd': maps[:2]})
  teacher = objective.Outputs(
      np.zeros((5, 10), np.float32),
      {'block1_preact': maps[2], 'block2_preact': maps[3]})
  loss, aux = jax.jit(distiller.objective)(student, teacher,
                                           term_batch(_MASK))
  expected = sum(_np_partial_l2(s, t, m, _KEEP) / 2**(1 - level)
                 for level, (s, t, m) in enumerate(zip(
                     maps[:2], maps[2:], constants['ofd'])))
  np.testing.assert_allclose(aux['ofd_loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, aux['ce_loss'] + 1e-3 * expected,
                             rtol=1e-5)


def test_a_teacher_layer_without_batch_norm_is_refused_before_training():
  config, = quick_configs('ofd', ('quick',))
  config.teacher.model = 'seed_teacher_cnn'
  config.distill.ofd.teacher_layers = 'conv1,conv2'
  with pytest.raises(errors.UserInputError,
                     match="config.distill.ofd: layer 'conv1' of model "
                     "'seed_teacher_cnn' is not the output of a batch norm"):
    distil_setup.student_modules(config, 'seed_student_cnn', 'seed_teacher_cnn',
                               (28, 28, 1))
  # A layer after the ReLU, and families without the map.
  for name, layer in (('bn_cnn', 'block1'), ('bn_cnn', 'block3_preact'),
                      ('resnet8', 'stage1'), ('resnet8', 'stage4_preact'),
                      ('shufflenetv1', 'stage1_preact'),
                      ('shufflenetv2', 'stage3_preact')):
    with pytest.raises(ValueError, match=f"layer '{layer}' of model "
                       f"'{name}'"):
      models.bn_before_relu(name, layer)


# --- the models' maps to the batch norm before a ReLU. ------------------------


@pytest.mark.parametrize('name', ['resnet8', 'resnet50', 'wrn_16_2',
                                  'vgg13', 'mobilenetv2', 'bn_cnn'])
def test_batch_norm_before_each_preact_has_its_channels(name):
  """RepDistiller's `get_bn_before_relu` per family; shapes only."""
  model = models.make_model(name)
  image_shape = (28, 28, 1) if name == 'bn_cnn' else (32, 32, 3)
  variables = jax.eval_shape(functools.partial(
      models.init_variables, model, image_shape=image_shape),
                             jax.random.PRNGKey(0))
  preacts = {layer: shape for layer, shape in
             zoo.feature_shapes(model, image_shape).items()
             if layer.endswith('_preact')}
  assert len(preacts) == (2 if name == 'bn_cnn' else model.num_stages)
  for layer, shape in preacts.items():
    node = variables['params']
    for key in models.bn_before_relu(name, layer):
      node = node[key]
    assert node['scale'].shape == node['bias'].shape == shape[-1:], layer


def test_the_batch_norm_is_the_one_the_preact_comes_from():
  # WRN and bn_cnn: the preact is that BN's output (bn_cnn's max-pooled, and
  # its ReLU is the block's output). One compiled init each, features
  # sown and the BNs' outputs captured.
  for name, shape in (('wrn_16_1', (8, 8, 3)), ('bn_cnn', (8, 8, 1))):
    model = models.make_model(name)
    paths = {layer: '/'.join(models.bn_before_relu(name, layer))
             for layer in zoo.feature_shapes(model, shape)
             if layer.endswith('_preact')}
    images = jax.random.normal(jax.random.PRNGKey(1), (2, *shape))
    _, variables = jax.jit(functools.partial(
        model.init_with_output, capture_intermediates=lambda m, method: (
            '/'.join(m.scope.path) in paths.values())))(
                jax.random.PRNGKey(0), images)
    sown = variables['intermediates']
    assert len(paths) == (2 if name == 'bn_cnn' else 3)
    for layer, path in paths.items():
      node = sown
      for key in path.split('/'):
        node = node[key]
      normed = node['__call__'][0]
      if name == 'bn_cnn':
        normed = models.max_pool_2x2(normed)
        np.testing.assert_array_equal(
            sown[layer.replace('_preact', '')][0],
            np.maximum(sown[layer][0], 0))
      np.testing.assert_allclose(sown[layer][0], normed, rtol=1e-6,
                                 err_msg=layer)


# --- the configs. -------------------------------------------------------------


def test_defaults_and_configs():
  section = methods.default_section('ofd')
  # The authors' / batch_size / 1000 with CE at 1 (mdistiller's 0.001).
  assert (section.weight, section.student_layers, section.teacher_layers) == (
      1e-3, 'conv1,conv2', 'block1_preact,block2_preact')
  assert methods.reference('ofd') == 'Heo et al., ICCV 2019'
  for config in quick_configs('ofd'):
    assert config.name == 'ofd_quick'
    # The seed teacher has no batch norm to take margins from.
    assert config.teacher.model == 'bn_cnn'
    assert methods.teacher_layers(config.distill) == ('block1_preact',
                                                      'block2_preact')
  assert ofd_experiment.get_config('mnist').teacher.model == 'bn_cnn'
  with pytest.raises(ValueError, match='mlp'):
    ofd_experiment.get_config('quick,mlp')
  config.distill.ofd.weight = -1.0
  assert_rejected(config, r'config.distill.ofd.weight = -1.0')
  config.distill.ofd.weight = 1e-3
  config.distill.ofd.teacher_layers = 'block2_preact'
  assert_rejected(config, '2 student and 1 teacher')
  # On a CIFAR pair, every stage's pre-ReLU map.
  names = 'stage1_preact,stage2_preact,stage3_preact'
  config = cifar_pair_config('ofd', names, names)
  assert config.distill.ce.weight == 1.0
  # Different stage counts: the deepest stages (mdistiller's _align_list).
  assert ofd.METHOD.zoo_settings(
      ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'embedding'),
      ('stem', 'stage1', 'stage2', 'stage3', 'embedding')) == {
          'student_layers': names,
          'teacher_layers': 'stage2_preact,stage3_preact,stage4_preact'}
