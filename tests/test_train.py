"""Steps: gradients, frozen teacher, invariants, masks, objective modules."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import losses
from kd_jax import methods
from kd_jax import models
from kd_jax import objective
from kd_jax import precision
from kd_jax import train
from kd_jax.methods import fitnets

IMAGE_SHAPE = (28, 28, 1)
ALPHA, TEMPERATURE = 0.3, 4.0


def _distill_config(*terms: str, **sections) -> ml_collections.ConfigDict:
  """A `config.distill` with `terms`, each section at its defaults updated
  by `sections[name]`."""
  return ml_collections.ConfigDict({
      'terms': ','.join(terms),
      **{name: methods.default_section(name, **sections.get(name, {}))
         for name in terms}})


KD_CONFIG = _distill_config('ce', 'kd', ce={'weight': ALPHA},
                            kd={'weight': 1 - ALPHA,
                                'temperature': TEMPERATURE})


def _kd(teacher_apply_fn=None, distill=KD_CONFIG, **kwargs) -> train.Distiller:
  """The Distiller of `distill`'s objective (Hinton's KD by default)."""
  return train.Distiller(
      objective=methods.build_objective(distill),
      teacher_apply_fn=teacher_apply_fn,
      student_layers=methods.student_layers(distill),
      teacher_layers=methods.teacher_layers(distill), **kwargs)


def _kd_loss(logits, teacher_logits, labels):
  return losses.kd_loss(logits, teacher_logits, labels, alpha=ALPHA,
                        temperature=TEMPERATURE)[0]


def _batch(seed: int = 0, size: int = 8) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {
      'image': rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
      'label': rng.integers(0, 10, size=size).astype(np.int32),
  }


def _state(name: str = 'seed_student_cnn', seed: int = 1,
           tx: optax.GradientTransformation | None = None,
           modules=None) -> train.TrainState:
  model = models.make_model(name)
  state = train.create_train_state(model, jax.random.PRNGKey(seed),
                                   IMAGE_SHAPE, 1e-3, modules=modules)
  return state if tx is None else state.replace(
      tx=tx, opt_state=tx.init(state.trainable))


def _teacher():
  model = models.make_model('seed_teacher_cnn')
  params = models.init_params(model, jax.random.PRNGKey(7), IMAGE_SHAPE)
  return model, {'params': params}


def _copy(state):
  return jax.tree_util.tree_map(jnp.array, state)


def _assert_trees_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# Steps and gradients run jitted: eagerly, JAX runs (and compiles) every
# operation on its own, which made this file take minutes. The plain steps
# are compared with the jitted ones in `test_jit_equals_no_jit`.
def _distill_step(state, batch, teacher_variables=None, *, distiller):
  return jax.jit(functools.partial(train.distill_step, distiller=distiller))(
      state, batch, teacher_variables)


_train_step = jax.jit(train.train_step)
_eval_step = jax.jit(train.eval_step)


def _grad(fn):
  return jax.jit(jax.grad(fn))


def test_teacher_gets_no_gradient_through_distill_step():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()

  def loss_of_teacher(variables):
    _, metrics = _distill_step(state, batch, variables,
                                    distiller=_kd(teacher_model.apply))
    return metrics['loss']

  grads = _grad(loss_of_teacher)(teacher_variables)
  for leaf in jax.tree_util.tree_leaves(grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_distill_step_student_gradient_matches_finite_differences():
  # With SGD at learning rate 1 the update is exactly -gradient.
  teacher_model, teacher_variables = _teacher()
  state = _state(tx=optax.sgd(1.0))
  batch = _batch(size=16)
  new_state, _ = _distill_step(_copy(state), batch, teacher_variables,
                                    distiller=_kd(teacher_model.apply))
  grad = jax.tree_util.tree_map(jnp.subtract, state.params, new_state.params)

  teacher_logits = teacher_model.apply(teacher_variables, batch['image'])

  def loss(params):
    logits = state.apply_fn({'params': params}, batch['image'])
    return _kd_loss(logits, teacher_logits, batch['label'])

  # Central differences along a random unit direction in parameter space.
  leaves, treedef = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  direction = [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(d**2) for d in direction))
  direction = [d / norm for d in direction]
  eps = 1e-2
  shifted = lambda s: jax.tree_util.tree_unflatten(
      treedef, [p + s * eps * d for p, d in zip(leaves, direction)])
  numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(
      jax.tree_util.tree_leaves(grad), direction))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_distill_step_with_the_label_term_alone_is_train_step():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()
  distilled, _ = _distill_step(
      _copy(state), batch, teacher_variables,
      distiller=_kd(teacher_model.apply, _distill_config('ce')))
  supervised, _ = _train_step(_copy(state), batch)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
      distilled.params, supervised.params)


def test_precomputed_teacher_logits_equal_teacher_in_step():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()
  online, online_metrics = _distill_step(
      _copy(state), batch, teacher_variables,
      distiller=_kd(teacher_model.apply))
  cached_batch = dict(batch, teacher_logits=teacher_model.apply(
      teacher_variables, batch['image']))
  cached, cached_metrics = _distill_step(_copy(state), cached_batch,
                                              distiller=_kd())
  _assert_trees_equal(online.params, cached.params)
  for key in online_metrics:
    np.testing.assert_array_equal(online_metrics[key], cached_metrics[key])


def test_several_teachers_in_the_step_equal_their_cached_logits():
  # Ensemble distillation under augmentation runs each teacher in the step:
  # the same (B, M, K) logits as the cache, the same update, and no
  # gradient reaches any teacher.
  teacher_model, first = _teacher()
  second = {'params': models.init_params(teacher_model, jax.random.PRNGKey(8),
                                         IMAGE_SHAPE)}
  distill = _distill_config('ce', 'multi_teacher')
  state, batch = _state(), _batch()
  teachers = [first, second]
  online, online_metrics = _distill_step(
      _copy(state), batch, teachers,
      distiller=_kd(teacher_model.apply, distill))
  stacked = np.stack([teacher_model.apply(v, batch['image'])
                      for v in teachers], axis=1)
  assert stacked.shape == (8, 2, 10)
  cached, cached_metrics = _distill_step(
      _copy(state), dict(batch, teacher_logits=stacked),
      distiller=_kd(None, distill))
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
      online.params, cached.params)
  for key in online_metrics:
    np.testing.assert_allclose(online_metrics[key], cached_metrics[key],
                               rtol=1e-6)
  teacher_grads = _grad(lambda v: _distill_step(
      _copy(state), batch, v, distiller=_kd(teacher_model.apply, distill)
  )[1]['loss'])(teachers)
  for leaf in jax.tree_util.tree_leaves(teacher_grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_distill_step_needs_a_teacher():
  with pytest.raises(ValueError, match='teacher_logits'):
    train.distill_step(_state(), _batch(), distiller=_kd())


@pytest.mark.parametrize('kind', ['train', 'distill'])
def test_jit_equals_no_jit(kind):
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()
  if kind == 'train':
    step, jitted = train.train_step, train.make_train_step()
  else:
    step = functools.partial(
        train.distill_step, teacher_variables=teacher_variables,
        distiller=_kd(teacher_model.apply))
    jitted = functools.partial(
        train.make_distill_step(_kd(teacher_model.apply)),
        teacher_variables=teacher_variables)
  plain_state, plain_metrics = step(_copy(state), batch)
  jit_state, jit_metrics = jitted(_copy(state), batch)
  # Op by op and compiled, the gradient's sums round differently; Adam's
  # first step (lr 1e-3) carries that into the parameters as ~1e-6.
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=3e-6),
      (plain_state.params, plain_metrics), (jit_state.params, jit_metrics))
  assert int(jit_state.step) == 1


def test_distill_metrics_are_consistent():
  teacher_model, teacher_variables = _teacher()
  batch = _batch(size=32)
  _, m = _distill_step(_state(), batch, teacher_variables,
                            distiller=_kd(teacher_model.apply))
  np.testing.assert_allclose(
      m['loss'], ALPHA * m['ce_loss'] + (1 - ALPHA) * m['kd_loss'],
      rtol=1e-6)
  teacher_logits = teacher_model.apply(teacher_variables, batch['image'])
  np.testing.assert_allclose(
      m['teacher_accuracy'],
      np.mean(np.argmax(teacher_logits, -1) == batch['label']))
  assert float(m['count']) == 32
  for key in ('accuracy', 'teacher_accuracy', 'agreement'):
    assert 0.0 <= float(m[key]) <= 1.0


def test_dropout_rng_depends_on_step_only():
  state, batch = _state('hinton_teacher_mlp'), _batch()
  a, _ = _train_step(_copy(state), batch)
  b, _ = _train_step(_copy(state), batch)
  _assert_trees_equal(a.params, b.params)
  c, _ = _train_step(_copy(state).replace(step=5), batch)
  assert not np.allclose(a.params['hidden0']['kernel'],
                         c.params['hidden0']['kernel'])


def test_eval_step_ignores_padding():
  state, batch = _state(), _batch(size=8)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  padded = dict(batch, mask=mask)
  padded['image'][5:] = 0.0
  real = {k: v[:5] for k, v in batch.items()}
  m_padded = _eval_step(state, padded)
  m_real = _eval_step(state, real)
  np.testing.assert_allclose(m_padded['loss'], m_real['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_padded['accuracy'], m_real['accuracy'])
  assert float(m_padded['count']) == 5


def test_batch_norm_statistics_update_in_training_and_teacher_stays_frozen():
  student = _state('bn_cnn')
  teacher_model = models.make_model('bn_cnn')
  teacher_variables = models.init_variables(teacher_model,
                                            jax.random.PRNGKey(3), IMAGE_SHAPE)
  frozen = jax.tree_util.tree_map(np.asarray, teacher_variables)
  batch = _batch(size=16)
  new, metrics = _distill_step(_copy(student), batch, teacher_variables,
                                    distiller=_kd(teacher_model.apply))
  assert np.isfinite(float(metrics['loss']))
  changed = [not np.allclose(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(student.batch_stats),
      jax.tree_util.tree_leaves(new.batch_stats))]
  assert any(changed)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen,
                         teacher_variables)
  # Evaluation uses the running statistics: padding cannot change results.
  padded = dict(batch, mask=np.r_[np.ones(10), np.zeros(6)].astype(np.float32))
  real = {k: v[:10] for k, v in batch.items()}
  np.testing.assert_allclose(_eval_step(new, padded)['loss'],
                             _eval_step(new, real)['loss'], rtol=1e-5)


def test_checkpoint_round_trip_keeps_batch_stats(tmp_path):
  from kd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  state, _ = _train_step(_state('bn_cnn'), _batch(size=16))
  store = checkpoints.StageCheckpoints(str(tmp_path / 'ckpt'), keep=1)
  totals = {'loss': jnp.float32(3.0), 'count': jnp.float32(16)}
  store.save(state, totals)
  restored, restored_totals = store.restore(_state('bn_cnn'))
  store.close()
  _assert_trees_equal((state.params, state.batch_stats, state.opt_state),
                      (restored.params, restored.batch_stats,
                       restored.opt_state))
  assert int(restored.step) == 1
  assert float(restored_totals['loss']) == 3.0


def test_distill_step_runs_any_logit_objective():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(tx=optax.sgd(1.0)), _batch(size=16)
  distill = _distill_config('ce', 'dkd', dkd={'warmup_epochs': 4})
  distiller = _kd(teacher_model.apply, distill, steps_per_epoch=2)
  # Step 3 is in epoch 2: the DKD term is warmed up to 2 / 4.
  state = state.replace(step=3)
  new, metrics = _distill_step(_copy(state), batch, teacher_variables,
                                    distiller=distiller)
  teacher_logits = teacher_model.apply(teacher_variables, batch['image'])

  def loss(params):
    logits = state.apply_fn({'params': params}, batch['image'])
    ce = losses.hard_label_loss(logits, batch['label'])
    dkd, aux = methods.dkd.dkd_loss(logits, teacher_logits, batch['label'])
    return ce + 0.5 * dkd, {'ce_loss': ce, 'dkd_loss': 0.5 * dkd,
                            'dkd/tckd': aux['tckd'], 'dkd/nckd': aux['nckd']}

  expected_loss, expected_aux = loss(state.params)
  np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-6)
  for key, value in expected_aux.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6)
  expected_grad = _grad(lambda p: loss(p)[0])(state.params)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      jax.tree_util.tree_map(jnp.subtract, state.params, new.params),
      expected_grad)


def _feature_step_with_frozen_teacher(state, batch, teacher_variables,
                                      distiller):
  """One distill step; asserts the teacher gets no gradient."""
  def run(variables):
    return _distill_step(_copy(state), batch, variables,
                              distiller=distiller)

  teacher_grads = _grad(lambda v: run(v)[1]['loss'])(teacher_variables)
  for leaf in jax.tree_util.tree_leaves(teacher_grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  return run(teacher_variables)


@pytest.mark.parametrize('method', ['at', 'rkd', 'pkt'])
def test_feature_methods_gradient_and_frozen_teacher(method):
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(tx=optax.sgd(1.0)), _batch(size=8)
  distill = _distill_config('ce', 'kd', method, ce={'weight': 0.5},
                            kd={'weight': 0.5, 'temperature': 4.0},
                            **{method: {'weight': 3.0}})
  new, metrics = _feature_step_with_frozen_teacher(
      state, batch, teacher_variables, _kd(teacher_model.apply, distill))

  capture = lambda mdl, name: name == '__call__' and mdl.name == 'conv2'
  term = methods.TERMS[method].loss(distill[method])

  def loss(params):
    logits, s = state.apply_fn({'params': params}, batch['image'],
                               capture_intermediates=capture,
                               mutable=['intermediates'])
    t_logits, t = teacher_model.apply(teacher_variables, batch['image'],
                                      capture_intermediates=capture,
                                      mutable=['intermediates'])
    kd, _ = losses.kd_loss(logits, t_logits, batch['label'], alpha=0.5,
                           temperature=4.0)
    feature, _ = term(
        objective.Outputs(logits, {
            'conv2': s['intermediates']['conv2']['__call__'][0]}),
        objective.Outputs(t_logits, {
            'conv2': t['intermediates']['conv2']['__call__'][0]}), batch)
    return kd + 3.0 * feature

  np.testing.assert_allclose(metrics['loss'], loss(state.params), rtol=1e-5)
  # Two float32 programs compiled apart: rounding differs by ~1e-6.
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=3e-6),
      jax.tree_util.tree_map(jnp.subtract, state.params, new.params),
      _grad(loss)(state.params))


def test_sown_features_are_found_by_name():
  model = models.make_model('resnet20', num_classes=10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), IMAGE_SHAPE)
  _, features, _ = jax.jit(lambda v, x: train.forward_with_features(
      model.apply, v, x, ('stage3', 'embedding', 'BasicBlock_0'),
      train=False))(variables, jnp.zeros((2, *IMAGE_SHAPE)))
  assert [f.shape for f in features] == [(2, 7, 7, 64), (2, 64),
                                         (2, 28, 28, 16)]
  with pytest.raises(ValueError, match="no intermediate feature 'stage9'"):
    train.forward_with_features(model.apply, variables,
                                jnp.zeros((1, *IMAGE_SHAPE)), ('stage9',),
                                train=False)


def test_fitnets_step_trains_the_regressor_with_the_student():
  teacher_model, teacher_variables = _teacher()
  regressor = fitnets.HintRegressor(((7, 7, 256),))
  state = _state(tx=optax.sgd(1.0), modules={
      'fitnets': regressor.init(jax.random.PRNGKey(3),
                                [jnp.zeros((1, 7, 7, 32))])['params']})
  batch = _batch(size=8)
  distill = _distill_config('ce', 'fitnets', fitnets={'weight': 2.0})
  new, metrics = _feature_step_with_frozen_teacher(
      state, batch, teacher_variables,
      _kd(teacher_model.apply, distill,
          modules={'fitnets': (regressor, ('conv2',), ())}))

  # Independently: the regressor is a 1x1 convolution, i.e. a matmul over
  # channels; the hint is the mean squared error to the teacher's conv2.
  capture = lambda mdl, name: name == '__call__' and mdl.name == 'conv2'
  _, t = teacher_model.apply(teacher_variables, batch['image'],
                             capture_intermediates=capture,
                             mutable=['intermediates'])
  hint_target = t['intermediates']['conv2']['__call__'][0]

  def loss(trained):
    logits, s = state.apply_fn(
        {'params': trained['model']}, batch['image'],
        capture_intermediates=capture, mutable=['intermediates'])
    reg = trained['modules']['fitnets']['regressor0']
    mapped = (jnp.einsum('bhwc,cd->bhwd',
                         s['intermediates']['conv2']['__call__'][0],
                         reg['kernel'][0, 0]) + reg['bias'])
    hint = jnp.mean(jnp.square(mapped - hint_target))
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    return ce + 2.0 * hint

  np.testing.assert_allclose(metrics['loss'], loss(state.trainable),
                             rtol=1e-5)
  expected_grad = _grad(loss)(state.trainable)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      jax.tree_util.tree_map(jnp.subtract, state.trainable, new.trainable),
      expected_grad)
  # Evaluation sees the student alone.
  assert set(train.model_variables(new)['params']) == {'conv1', 'conv2',
                                                       'head'}
  _eval_step(new, batch)


@pytest.mark.parametrize('name', ['seed_student_cnn', 'bn_cnn'])
def test_bfloat16_compute_keeps_float32_parameters_and_losses(name):
  model = models.make_model(name)
  state = train.create_train_state(model, jax.random.PRNGKey(0), IMAGE_SHAPE,
                                   1e-3, precision='bfloat16')
  reference = train.create_train_state(model, jax.random.PRNGKey(0),
                                       IMAGE_SHAPE, 1e-3)
  teacher_model, teacher_variables = _teacher()
  step = train.make_distill_step(
      _kd(precision.compute_in(teacher_model.apply, 'bfloat16')))
  batch = _batch(size=16)
  new, metrics = step(state, batch, teacher_variables)
  for key in ('loss', 'ce_loss', 'kd_loss', 'grad_norm'):
    assert metrics[key].dtype == jnp.float32, key
  for leaf in jax.tree_util.tree_leaves((new.params, new.opt_state,
                                         new.batch_stats)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  # The forward pass really is in bfloat16: logits differ from float32 by
  # bfloat16 rounding, not more.
  logits = jax.jit(state.apply_fn)(train.model_variables(state),
                                   batch['image'])
  exact = jax.jit(reference.apply_fn)(train.model_variables(reference),
                                      batch['image'])
  assert logits.dtype == jnp.float32
  assert 0 < float(jnp.max(jnp.abs(logits - exact))) < 0.1 * float(
      jnp.max(jnp.abs(exact))) + 0.05
  # And it trains: the loss on a fixed batch goes down.
  losses_seen = []
  for _ in range(15):
    new, metrics = step(new, batch, teacher_variables)
    losses_seen.append(float(metrics['loss']))
  assert losses_seen[-1] < losses_seen[0]
