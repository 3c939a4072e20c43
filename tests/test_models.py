"""Models: parameter counts, shapes, layers against an independent lax build."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import errors
from kd_jax import models
from kd_jax.methods import fitnets


@pytest.mark.parametrize('name, expected', [
    ('seed_teacher_cnn', 273_802),
    ('seed_student_cnn', 20_490),
    # 784*1200+1200 + 1200*1200+1200 + 1200*10+10
    ('hinton_teacher_mlp', 2_395_210),
    # 784*800+800 + 800*800+800 + 800*10+10
    ('hinton_student_mlp', 1_276_810),
])
def test_parameter_counts_and_logit_shape(name, expected):
  model = models.make_model(name, num_classes=10)
  params = models.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert models.count_params(params) == expected
  logits = model.apply({'params': params}, jnp.zeros((3, 28, 28, 1)))
  assert logits.shape == (3, 10)
  assert logits.dtype == jnp.float32


# CIFAR models with 100 classes on 32x32x3 inputs, as in the KD literature
# (CRD's table: 0.28M, 0.86M, 1.23M, 7.43M, 0.70M, 2.26M; the whole zoo is
# checked against RepDistiller's PyTorch models in test_zoo.py). resnet20
# by hand: stem 3*3*3*16 + 2*16 = 464; stage1 3 blocks * 2 * (3*3*16*16 +
# 32) = 14,016; stage2 (3*3*16*32 + 64) + (3*3*32*32 + 64) + (16*32 + 64) +
# 4 * (9,216 + 64) = 51,648; stage3 likewise 57,728 + 4 * (36,864 + 128) =
# 205,696; head 64*100 + 100 = 6,500; total 278,324.
@pytest.mark.parametrize('name, expected', [
    ('resnet20', 278_324),
    ('resnet56', 861_620),
    ('resnet8x4', 1_233_540),
    ('resnet32x4', 7_433_860),
    ('wrn_16_2', 703_284),
    ('wrn_40_2', 2_255_156),
])
def test_cifar_models_match_the_literature(name, expected):
  model = models.make_model(name, num_classes=100)
  # Shapes only (nothing compiled or computed): the counts and outputs.
  variables = jax.eval_shape(functools.partial(
      models.init_variables, model, image_shape=(32, 32, 3)),
                             jax.random.PRNGKey(0))
  assert models.count_params(variables['params']) == expected
  assert 'batch_stats' in variables
  logits, state = jax.eval_shape(functools.partial(
      model.apply, mutable=['intermediates']), variables,
                                 jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 100)
  assert set(state['intermediates']) == {
      'stem', 'stage1', 'stage2', 'stage3', 'stage1_preact', 'stage2_preact',
      'stage3_preact', 'embedding'}


def test_batch_norm_uses_batch_statistics_only_in_training():
  model = models.make_model('bn_cnn')
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
  # Inference: each example's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(model.apply(variables, x)[:2],
                             model.apply(variables, x[:2]),
                             rtol=1e-5, atol=1e-5)
  _, updates = model.apply(variables, x, train=True,
                           rngs={'dropout': jax.random.PRNGKey(2)},
                           mutable=['batch_stats'])
  before = jax.tree_util.tree_leaves(variables['batch_stats'])
  after = jax.tree_util.tree_leaves(updates['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_num_classes_sets_the_head():
  model = models.make_model('seed_student_cnn', num_classes=7)
  params = models.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert params['head']['kernel'].shape == (7 * 7 * 32, 7)


def _reference_seed_cnn(params, x):
  """The tutorial's layers written directly with lax (NHWC, HWIO kernels)."""
  dims = ('NHWC', 'HWIO', 'NHWC')
  x = jax.lax.conv_general_dilated(x, params['conv1']['kernel'], (2, 2), 'SAME',
                                   dimension_numbers=dims)
  x = x + params['conv1']['bias']
  x = jnp.where(x > 0, x, 0.2 * x)
  # Keras MaxPooling2D(2, strides=1, padding='same') pads one row/column of
  # -inf after the image, none before.
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-jnp.inf)
  x = jnp.maximum(jnp.maximum(x[:, :-1, :-1], x[:, 1:, :-1]),
                  jnp.maximum(x[:, :-1, 1:], x[:, 1:, 1:]))
  x = jax.lax.conv_general_dilated(x, params['conv2']['kernel'], (2, 2), 'SAME',
                                   dimension_numbers=dims)
  x = x + params['conv2']['bias']
  x = x.reshape((x.shape[0], -1))
  return x @ params['head']['kernel'] + params['head']['bias']


@pytest.mark.parametrize('name', ['seed_teacher_cnn', 'seed_student_cnn'])
def test_seed_cnn_matches_independent_layers(name):
  model = models.make_model(name)
  params = models.init_params(model, jax.random.PRNGKey(1), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(2), (4, 28, 28, 1))
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             _reference_seed_cnn(params, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 14, 14, 3), (1, 5, 4, 2), (3, 1, 1, 1)])
def test_fast_max_pool_equals_flax_max_pool(shape):
  # Continuous random inputs have no ties, so the gradients agree too, up to
  # the order in which an element that wins several windows sums their
  # cotangents (a few ulps).
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  flax_pool = lambda x: nn.max_pool(x, (2, 2), strides=(1, 1), padding='SAME')
  np.testing.assert_array_equal(models.max_pool_2x2_stride1_same(x),
                                flax_pool(x))
  cotangent = jax.random.normal(jax.random.PRNGKey(1), shape)
  grad = lambda pool: jax.grad(lambda x: jnp.vdot(pool(x), cotangent))(x)
  fast, reference = grad(models.max_pool_2x2_stride1_same), grad(flax_pool)
  np.testing.assert_array_equal(fast == 0, reference == 0)  # Same routing.
  np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      jax.jit(models.max_pool_2x2_stride1_same)(x), flax_pool(x))


def test_teacher_mlp_dropout_only_in_training():
  model = models.make_model('hinton_teacher_mlp')
  params = models.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1))
  variables = {'params': params}
  eval_a = model.apply(variables, x, train=False)
  eval_b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.apply(variables, x, train=True,
                        rngs={'dropout': jax.random.PRNGKey(3)})
  train_b = model.apply(variables, x, train=True,
                        rngs={'dropout': jax.random.PRNGKey(4)})
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)


def test_student_mlp_has_no_dropout():
  model = models.make_model('hinton_student_mlp')
  params = models.init_params(model, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1))
  np.testing.assert_array_equal(
      model.apply({'params': params}, x, train=True,
                  rngs={'dropout': jax.random.PRNGKey(3)}),
      model.apply({'params': params}, x, train=False))


def test_unknown_model_names_the_known_ones():
  with pytest.raises(errors.UserInputError, match='seed_teacher_cnn'):
    models.make_model('resnet9000')


@pytest.mark.parametrize('student, teacher, kernel', [
    ((7, 7, 32), (7, 7, 256), (1, 1, 32, 256)),
    ((14, 14, 16), (7, 7, 64), (8, 8, 16, 64)),
    ((32,), (256,), (32, 256)),
])
def test_hint_regressor_maps_student_to_teacher_shape(student, teacher,
                                                      kernel):
  assert fitnets.regressor_problem(student, teacher) is None
  regressor = fitnets.HintRegressor((teacher,))
  features = [jnp.ones((3, *student))]
  params = regressor.init(jax.random.PRNGKey(0), features)['params']
  assert params['regressor0']['kernel'].shape == kernel
  (mapped,) = regressor.apply({'params': params}, features)
  assert mapped.shape == (3, *teacher)


def test_regressor_problems_are_explained():
  assert 'smaller than the teacher' in fitnets.regressor_problem(
      (7, 7, 32), (14, 14, 64))
  assert 'expected both (H, W, C) or both (D,)' in fitnets.regressor_problem(
      (7, 7, 32), (256,))


def test_bn_cnn_pool_and_sown_features():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 3))
  np.testing.assert_array_equal(models.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  model = models.make_model('bn_cnn')
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert models.count_params(variables['params']) == 420_954
  _, state = model.apply(variables, jnp.zeros((2, 28, 28, 1)),
                         mutable=['intermediates'])
  shapes = {k: v[0].shape for k, v in state['intermediates'].items()}
  assert shapes == {'block1': (2, 14, 14, 16), 'block2': (2, 7, 7, 32),
                    'block1_preact': (2, 14, 14, 16),
                    'block2_preact': (2, 7, 7, 32), 'embedding': (2, 256)}
