"""The CIFAR model zoo: RepDistiller's architectures, counts and features.

Shapes and counts come from `jax.eval_shape` (traced, nothing compiled);
one small model runs for real.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import errors
from kd_jax import models
from kd_jax import train
from kd_jax import zoo
from kd_jax.zoo import layers

# sum(p.numel() for p in model.parameters()) of RepDistiller's PyTorch models
# (github.com/HobbitLong/RepDistiller, models/, `model_dict[name](
# num_classes=100)`; resnet50 is `ResNet50`, mobilenetv2 `MobileNetV2`, i.e.
# `mobile_half`, shufflenetv1/v2 `ShuffleV1`/`ShuffleV2`), counted with
# torch 2.13 (CPU). Parameters only, not BN running statistics.
REPDISTILLER_PARAMS = {
    'resnet8': 83_892,
    'resnet14': 181_108,
    'resnet20': 278_324,
    'resnet32': 472_756,
    'resnet44': 667_188,
    'resnet56': 861_620,
    'resnet110': 1_736_564,
    'resnet8x4': 1_233_540,
    'resnet32x4': 7_433_860,
    'resnet50': 23_705_252,
    'wrn_16_1': 180_916,
    'wrn_16_2': 703_284,
    'wrn_40_1': 569_780,
    'wrn_40_2': 2_255_156,
    'vgg8': 3_965_028,
    'vgg11': 9_277_284,
    'vgg13': 9_462_180,
    'vgg16': 14_774_436,
    'vgg19': 20_086_692,
    'mobilenetv2': 812_836,
    'shufflenetv1': 949_258,
    'shufflenetv2': 1_355_528,
}

# RepDistiller's feature lists `[f0, f1, .., fK, pooled]` for a 32x32 batch of
# 2, printed by its PyTorch models (NCHW there, NHWC here); the preact lists
# have the same shapes.
FEATURE_SHAPES = {
    'resnet8x4': [(2, 32, 32, 32), (2, 32, 32, 64), (2, 16, 16, 128),
                  (2, 8, 8, 256), (2, 256)],
    'resnet50': [(2, 32, 32, 64), (2, 32, 32, 256), (2, 16, 16, 512),
                 (2, 8, 8, 1024), (2, 4, 4, 2048), (2, 2048)],
    'wrn_40_2': [(2, 32, 32, 16), (2, 32, 32, 32), (2, 16, 16, 64),
                 (2, 8, 8, 128), (2, 128)],
    'vgg13': [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256),
              (2, 4, 4, 512), (2, 4, 4, 512), (2, 512)],
    'mobilenetv2': [(2, 16, 16, 16), (2, 16, 16, 12), (2, 8, 8, 16),
                    (2, 4, 4, 48), (2, 2, 2, 160), (2, 1280)],
    'shufflenetv1': [(2, 32, 32, 24), (2, 16, 16, 240), (2, 8, 8, 480),
                     (2, 4, 4, 960), (2, 960)],
    'shufflenetv2': [(2, 32, 32, 24), (2, 16, 16, 116), (2, 8, 8, 232),
                     (2, 4, 4, 464), (2, 1024)],
}


@functools.cache
def _traced(name: str):
  """(logits, variables with 'intermediates') of `name` as shapes only."""
  model = models.make_model(name, num_classes=100)
  init = functools.partial(model.init_with_output, mutable=True)
  return jax.eval_shape(init, jax.random.key(0),
                        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))


def test_the_zoo_is_repdistillers_model_list_and_in_make_model():
  assert set(zoo.MODELS) == set(REPDISTILLER_PARAMS)
  assert set(zoo.MODELS) <= set(models.MODELS)


@pytest.mark.parametrize('name', sorted(REPDISTILLER_PARAMS))
def test_parameter_count_logits_and_feature_names(name):
  logits, variables = _traced(name)
  assert models.count_params(variables['params']) == REPDISTILLER_PARAMS[name]
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  assert 'batch_stats' in variables
  sown = set(variables['intermediates'])
  assert sown == (set(zoo.feature_names(name))
                  | set(zoo.feature_names(name, preact=True)))


@pytest.mark.parametrize('name', sorted(FEATURE_SHAPES))
def test_feature_shapes_match_repdistiller(name):
  _, variables = _traced(name)
  for preact in (False, True):
    names = zoo.feature_names(name, preact=preact)
    shapes = [variables['intermediates'][n][0].shape for n in names]
    assert shapes == FEATURE_SHAPES[name], (preact, names)


def test_feature_names_and_shapes_helpers():
  assert zoo.feature_names('resnet20') == (
      'stem', 'stage1', 'stage2', 'stage3', 'embedding')
  assert zoo.feature_names('vgg8', preact=True) == (
      'stem', 'stage1_preact', 'stage2_preact', 'stage3_preact',
      'stage4_preact', 'embedding')
  shapes = zoo.feature_shapes('resnet8', (16, 16, 3), batch_size=3)
  assert shapes == {
      'stem': (3, 16, 16, 16), 'stage1': (3, 16, 16, 16),
      'stage2': (3, 8, 8, 32), 'stage3': (3, 4, 4, 64),
      'stage1_preact': (3, 16, 16, 16), 'stage2_preact': (3, 8, 8, 32),
      'stage3_preact': (3, 4, 4, 64), 'embedding': (3, 64)}
  # Any sowing model; VGG pools after block 3 only for 64x64 images.
  assert zoo.feature_shapes(models.make_model('vgg8'), (64, 64, 3))[
      'stage4'] == (1, 4, 4, 512)
  assert zoo.feature_shapes(models.make_model('bn_cnn'), (28, 28, 1)) == {
      'block1': (1, 14, 14, 16), 'block2': (1, 7, 7, 32),
      'block1_preact': (1, 14, 14, 16), 'block2_preact': (1, 7, 7, 32),
      'embedding': (1, 256)}


def test_num_classes_sets_the_head():
  logits, variables = jax.eval_shape(
      models.make_model('shufflenetv2', num_classes=10).init_with_output,
      jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert logits.shape == (1, 10)
  assert variables['params']['head']['kernel'].shape == (1024, 10)


def test_a_forward_pass_trains_batch_norm_and_sows_features():
  model = models.make_model('resnet8', num_classes=100)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = models.init_variables(model, jax.random.PRNGKey(0), (16, 16, 3))
  logits, features, batch_stats = jax.jit(functools.partial(
      train.forward_with_features, model.apply,
      layers=('stem', 'stage3_preact', 'stage3'), train=True))(variables, x)
  assert logits.shape == (2, 100)
  stem, preact, stage3 = features
  assert stem.shape == (2, 16, 16, 16) and stage3.shape == (2, 4, 4, 64)
  np.testing.assert_array_equal(stage3, jnp.maximum(preact, 0))
  assert (preact < 0).any()
  before = jax.tree_util.tree_leaves(variables['batch_stats'])
  after = jax.tree_util.tree_leaves(batch_stats)
  assert all(a.shape == b.shape for a, b in zip(before, after))
  assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_unknown_model_names_the_zoo_too():
  with pytest.raises(errors.UserInputError, match='resnet8x4.*wrn_40_2'):
    models.make_model('resnet9000')


@pytest.mark.parametrize('train', [False, True])
def test_the_zoo_batch_norm_is_flax_batch_norm_exactly(train):
  # Its inference mode is written out as arithmetic (for ONNX export).
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 7)) * 3 + 1
  settings = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  variables = nn.BatchNorm(**settings).init(jax.random.PRNGKey(1), x)
  variables = jax.tree_util.tree_map(
      lambda v: v + jax.random.uniform(jax.random.PRNGKey(2), v.shape),
      variables)
  assert (jax.tree_util.tree_structure(
      layers.BatchNorm(**settings).init(jax.random.PRNGKey(1), x))
          == jax.tree_util.tree_structure(variables))
  for apply in (lambda m: m.apply(variables, x, mutable=['batch_stats']),
                lambda m: jax.jit(functools.partial(
                    m.apply, mutable=['batch_stats']))(variables, x)):
    expected = jax.tree_util.tree_leaves(apply(nn.BatchNorm(**settings)))
    found = jax.tree_util.tree_leaves(apply(layers.BatchNorm(**settings)))
    assert len(found) == len(expected) == 3  # Output, mean, var.
    for a, b in zip(found, expected):
      np.testing.assert_array_equal(a, b)


def _resnet8_loss_and_grads(monkeypatch, backend):
  """resnet8's training loss and gradients, with `layers.residual_sum` as it
  builds itself for `backend` (jitted on this CPU either way), and the
  compiled program's text."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  model = models.make_model('resnet8', num_classes=10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(jnp.square(logits))

  grad = jax.jit(jax.value_and_grad(loss))
  text = grad.lower(variables['params']).compile().as_text()
  return grad(variables['params']), text


def test_residual_sums_fence_fusion_on_cpu_and_change_nothing(monkeypatch):
  # On XLA:CPU a training step passes every residual sum through a
  # conditional (a fusion boundary); elsewhere it is the plain sum. Loss
  # and gradients agree to float32 rounding: the fusions around the
  # boundary round differently.
  fenced, cpu_text = _resnet8_loss_and_grads(monkeypatch, 'cpu')
  plain, gpu_text = _resnet8_loss_and_grads(monkeypatch, 'gpu')
  # One per block, and one per block in the gradient.
  assert cpu_text.count('conditional(') == 6
  assert 'conditional(' not in gpu_text
  for a, b in zip(jax.tree_util.tree_leaves(fenced),
                  jax.tree_util.tree_leaves(plain)):
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


@pytest.mark.parametrize('train', [False, True])
def test_residual_sum_is_the_sum(train):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4))
  total = functools.partial(layers.residual_sum, train=train)
  for call in (total, jax.jit(total)):
    np.testing.assert_array_equal(call(x, y), x + y)
  gx, gy = jax.grad(lambda x, y: jnp.sum(jnp.sin(total(x, y))),
                    argnums=(0, 1))(x, y)
  np.testing.assert_array_equal(gx, jnp.cos(x + y))
  np.testing.assert_array_equal(gy, jnp.cos(x + y))
