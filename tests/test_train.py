"""Steps and loops: gradients, frozen teacher, invariants, masks, determinism."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import data
from kd_jax import losses
from kd_jax import models
from kd_jax import train

IMAGE_SHAPE = (28, 28, 1)
DISTILL = dict(alpha=0.3, temperature=4.0, t2_scaling=True, form='kl')


def _batch(seed: int = 0, size: int = 8) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {
      'image': rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
      'label': rng.integers(0, 10, size=size).astype(np.int32),
  }


def _state(name: str = 'seed_student_cnn', seed: int = 1,
           tx: optax.GradientTransformation | None = None) -> train.TrainState:
  model = models.make_model(name)
  state = train.create_train_state(model, jax.random.PRNGKey(seed),
                                   IMAGE_SHAPE, 1e-3)
  return state if tx is None else train.TrainState.create(
      apply_fn=state.apply_fn, params=state.params, tx=tx, rng=state.rng)


def _teacher():
  model = models.make_model('seed_teacher_cnn')
  params = models.init_params(model, jax.random.PRNGKey(7), IMAGE_SHAPE)
  return model, {'params': params}


def _copy(state):
  return jax.tree_util.tree_map(jnp.array, state)


def _assert_trees_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_teacher_gets_no_gradient_through_distill_step():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()

  def loss_of_teacher(variables):
    _, metrics = train.distill_step(state, batch, variables,
                                    teacher_apply_fn=teacher_model.apply,
                                    **DISTILL)
    return metrics['loss']

  grads = jax.grad(loss_of_teacher)(teacher_variables)
  for leaf in jax.tree_util.tree_leaves(grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_distill_step_student_gradient_matches_finite_differences():
  # With SGD at learning rate 1 the update is exactly -gradient.
  teacher_model, teacher_variables = _teacher()
  state = _state(tx=optax.sgd(1.0))
  batch = _batch(size=16)
  new_state, _ = train.distill_step(_copy(state), batch, teacher_variables,
                                    teacher_apply_fn=teacher_model.apply,
                                    **DISTILL)
  grad = jax.tree_util.tree_map(jnp.subtract, state.params, new_state.params)

  teacher_logits = teacher_model.apply(teacher_variables, batch['image'])

  def loss(params):
    logits = state.apply_fn({'params': params}, batch['image'])
    return losses.kd_loss(logits, teacher_logits, batch['label'],
                          **DISTILL)[0]

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


def test_distill_step_with_alpha_one_is_train_step():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()
  distilled, _ = train.distill_step(
      _copy(state), batch, teacher_variables,
      teacher_apply_fn=teacher_model.apply,
      **{**DISTILL, 'alpha': 1.0})
  supervised, _ = train.train_step(_copy(state), batch)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
      distilled.params, supervised.params)


def test_precomputed_teacher_logits_equal_teacher_in_step():
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()
  online, online_metrics = train.distill_step(
      _copy(state), batch, teacher_variables,
      teacher_apply_fn=teacher_model.apply, **DISTILL)
  cached_batch = dict(batch, teacher_logits=teacher_model.apply(
      teacher_variables, batch['image']))
  cached, cached_metrics = train.distill_step(_copy(state), cached_batch,
                                              **DISTILL)
  _assert_trees_equal(online.params, cached.params)
  for key in online_metrics:
    np.testing.assert_array_equal(online_metrics[key], cached_metrics[key])


def test_distill_step_needs_a_teacher():
  with pytest.raises(ValueError, match='teacher_logits'):
    train.distill_step(_state(), _batch(), **DISTILL)


@pytest.mark.parametrize('kind', ['train', 'distill'])
def test_jit_equals_no_jit(kind):
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(), _batch()
  if kind == 'train':
    step, jitted = train.train_step, train.make_train_step()
  else:
    step = functools.partial(
        train.distill_step, teacher_variables=teacher_variables,
        teacher_apply_fn=teacher_model.apply, **DISTILL)
    jitted = functools.partial(
        train.make_distill_step(teacher_model.apply, **DISTILL),
        teacher_variables=teacher_variables)
  plain_state, plain_metrics = step(_copy(state), batch)
  jit_state, jit_metrics = jitted(_copy(state), batch)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      (plain_state.params, plain_metrics), (jit_state.params, jit_metrics))
  assert int(jit_state.step) == 1


def test_distill_metrics_are_consistent():
  teacher_model, teacher_variables = _teacher()
  batch = _batch(size=32)
  _, m = train.distill_step(_state(), batch, teacher_variables,
                            teacher_apply_fn=teacher_model.apply, **DISTILL)
  np.testing.assert_allclose(
      m['loss'], DISTILL['alpha'] * m['student_loss']
      + (1 - DISTILL['alpha']) * m['distillation_loss'], rtol=1e-6)
  teacher_logits = teacher_model.apply(teacher_variables, batch['image'])
  np.testing.assert_allclose(
      m['teacher_accuracy'],
      np.mean(np.argmax(teacher_logits, -1) == batch['label']))
  assert float(m['count']) == 32
  for key in ('accuracy', 'teacher_accuracy', 'agreement'):
    assert 0.0 <= float(m[key]) <= 1.0


def test_dropout_rng_depends_on_step_only():
  state, batch = _state('hinton_teacher_mlp'), _batch()
  a, _ = train.train_step(_copy(state), batch)
  b, _ = train.train_step(_copy(state), batch)
  _assert_trees_equal(a.params, b.params)
  c, _ = train.train_step(_copy(state).replace(step=5), batch)
  assert not np.allclose(a.params['hidden0']['kernel'],
                         c.params['hidden0']['kernel'])


def test_eval_step_ignores_padding():
  state, batch = _state(), _batch(size=8)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  padded = dict(batch, mask=mask)
  padded['image'][5:] = 0.0
  real = {k: v[:5] for k, v in batch.items()}
  m_padded = train.eval_step(state, padded)
  m_real = train.eval_step(state, real)
  np.testing.assert_allclose(m_padded['loss'], m_real['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_padded['accuracy'], m_real['accuracy'])
  assert float(m_padded['count']) == 5


def test_evaluate_counts_every_example_once():
  rng = np.random.default_rng(0)
  split = data.Split(
      images=rng.uniform(size=(23, *IMAGE_SHAPE)).astype(np.float32),
      labels=rng.integers(0, 10, size=23).astype(np.int32))
  state = _state()
  summary = train.evaluate(state, split, batch_size=10)
  logits = state.apply_fn({'params': state.params}, split.images)
  expected_loss = np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, split.labels))
  assert summary['count'] == 23
  np.testing.assert_allclose(summary['loss'], expected_loss, rtol=1e-5)
  np.testing.assert_allclose(
      summary['accuracy'], np.mean(np.argmax(logits, -1) == split.labels))


def test_accumulate_weights_by_count():
  totals = None
  for value, count in ((1.0, 2.0), (4.0, 6.0)):
    totals = train.accumulate(totals, {'loss': jnp.float32(value),
                                       'count': jnp.float32(count)})
  summary = train.summarize(totals)
  assert summary == {'loss': pytest.approx((2 + 24) / 8), 'count': 8.0}


def test_check_finite_names_stage_and_epoch():
  with pytest.raises(FloatingPointError, match=r"'distill', epoch 3.*loss"):
    train.check_finite({'loss': float('nan'), 'accuracy': 0.5},
                       stage='distill', epoch=2)


class _Linear(nn.Module):

  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _separable_dataset(n: int, seed: int) -> data.Dataset:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  images = rng.normal(scale=0.1, size=(n, 4, 4, 1)).astype(np.float32)
  images.reshape(n, 16)[np.arange(n), labels] += 1.0
  split = data.Split(images=images, labels=labels)
  return data.Dataset(name='separable', train=split, test=split,
                      num_classes=10, source='memory')


def _fit(seed: int):
  dataset = _separable_dataset(256, 0)
  state = train.create_train_state(_Linear(), jax.random.PRNGKey(seed),
                                   (4, 4, 1), 5e-2)
  epochs = []
  state, test = train.fit(
      state, train.make_train_step(), dataset, stage='teacher', epochs=3,
      batch_size=32, eval_batch_size=100, seed=seed,
      on_epoch_end=lambda *args: epochs.append(args))
  return state, test, epochs


def test_fit_learns_and_is_deterministic():
  state_a, test_a, epochs = _fit(seed=3)
  state_b, test_b, _ = _fit(seed=3)
  _assert_trees_equal(state_a.params, state_b.params)
  assert test_a == test_b
  assert [e[1] for e in epochs] == [0, 1, 2]
  assert epochs[-1][2]['loss'] < epochs[0][2]['loss']
  assert test_a['accuracy'] > 0.9
  assert int(state_a.step) == 3 * (256 // 32)


def _image_dataset(num_train: int, num_test: int) -> data.Dataset:
  rng = np.random.default_rng(5)
  split = lambda n: data.Split(
      images=rng.uniform(size=(n, *IMAGE_SHAPE)).astype(np.float32),
      labels=rng.integers(0, 10, size=n).astype(np.int32))
  return data.Dataset(name='random', train=split(num_train),
                      test=split(num_test), num_classes=10, source='memory')


def _fit_students(dataset, *, loop, cached=False, steps_per_chunk=0,
                  scan_unroll=False, epochs=2):
  teacher_model, teacher_variables = _teacher()
  step = train.distill_step_with(teacher_model.apply, **DISTILL)
  step_args, extras = (teacher_variables,), {}
  if cached:
    step_args = ()
    extras['teacher_logits'] = train.predict_logits(
        teacher_model.apply, teacher_variables, dataset.train, 64)
  history = []
  state, test = train.fit(
      _state('hinton_teacher_mlp'), step, dataset, stage='distill',
      epochs=epochs, batch_size=16, eval_batch_size=64, seed=11,
      step_args=step_args, train_extras=extras, loop=loop,
      steps_per_chunk=steps_per_chunk, scan_unroll=scan_unroll,
      on_epoch_end=lambda *args: history.append(args[2]))
  return state, test, history


def test_scan_loop_equals_python_loop():
  # Same batches in the same order, dropout keyed by step: same training.
  dataset = _image_dataset(100, 30)
  scan_state, scan_test, scan_history = _fit_students(dataset, loop='scan')
  py_state, py_test, py_history = _fit_students(dataset, loop='python')
  assert int(scan_state.step) == int(py_state.step) == 2 * (100 // 16)
  _assert_trees_equal(scan_state.params, py_state.params)
  for scan_epoch, py_epoch in zip(scan_history, py_history):
    assert scan_epoch.keys() == py_epoch.keys()
    for key in scan_epoch:
      np.testing.assert_allclose(scan_epoch[key], py_epoch[key], rtol=1e-5)
  np.testing.assert_allclose(scan_test['loss'], py_test['loss'], rtol=1e-5)


@pytest.mark.parametrize('scan_unroll', [False, True])
def test_scan_chunks_equal_one_scan_per_epoch(scan_unroll):
  # 6 steps per epoch in chunks of 4: one full chunk and a shorter one.
  dataset = _image_dataset(100, 30)
  whole, _, whole_history = _fit_students(dataset, loop='scan', epochs=1)
  chunked, _, chunked_history = _fit_students(
      dataset, loop='scan', steps_per_chunk=4, scan_unroll=scan_unroll,
      epochs=1)
  _assert_trees_equal(whole.params, chunked.params)
  np.testing.assert_allclose(whole_history[0]['loss'],
                             chunked_history[0]['loss'], rtol=1e-6)


@pytest.mark.parametrize('loop', ['scan', 'python'])
def test_cached_teacher_logits_equal_teacher_online(loop):
  dataset = _image_dataset(100, 30)
  online, online_test, online_history = _fit_students(dataset, loop=loop)
  cached, cached_test, cached_history = _fit_students(dataset, loop=loop,
                                                      cached=True)
  _assert_trees_equal(online.params, cached.params)
  assert online_test == cached_test
  # The metrics are the same sums, fused differently by XLA in the two
  # programs: equal to float32 rounding.
  for online_epoch, cached_epoch in zip(online_history, cached_history):
    for key in online_epoch:
      np.testing.assert_allclose(online_epoch[key], cached_epoch[key],
                                 rtol=1e-6)


def test_predict_logits_covers_every_example_in_order():
  teacher_model, teacher_variables = _teacher()
  split = _image_dataset(37, 1).train
  logits = train.predict_logits(teacher_model.apply, teacher_variables, split,
                                batch_size=16)
  assert logits.shape == (37, 10)
  np.testing.assert_allclose(
      logits, teacher_model.apply(teacher_variables, split.images),
      rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_update_in_training_and_teacher_stays_frozen():
  student = _state('bn_cnn')
  teacher_model = models.make_model('bn_cnn')
  teacher_variables = models.init_variables(teacher_model,
                                            jax.random.PRNGKey(3), IMAGE_SHAPE)
  frozen = jax.tree_util.tree_map(np.asarray, teacher_variables)
  batch = _batch(size=16)
  new, metrics = train.distill_step(_copy(student), batch, teacher_variables,
                                    teacher_apply_fn=teacher_model.apply,
                                    **DISTILL)
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
  np.testing.assert_allclose(train.eval_step(new, padded)['loss'],
                             train.eval_step(new, real)['loss'], rtol=1e-5)


def test_checkpoint_round_trip_keeps_batch_stats(tmp_path):
  from kd_jax import checkpoints  # pylint: disable=g-import-not-at-top
  state, _ = train.train_step(_state('bn_cnn'), _batch(size=16))
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
  from kd_jax import methods  # pylint: disable=g-import-not-at-top
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(tx=optax.sgd(1.0)), _batch(size=16)
  objective = functools.partial(methods.LOGIT_METHODS['dkd'], alpha=1.0,
                                beta=8.0, temperature=4.0)
  new, metrics = train.distill_step(_copy(state), batch, teacher_variables,
                                    teacher_apply_fn=teacher_model.apply,
                                    objective=objective)
  teacher_logits = teacher_model.apply(teacher_variables, batch['image'])

  def loss(params):
    logits = state.apply_fn({'params': params}, batch['image'])
    return objective(logits, teacher_logits, batch['label'])

  expected_loss, expected_aux = loss(state.params)
  np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-6)
  for key in ('student_loss', 'distillation_loss', 'tckd', 'nckd'):
    np.testing.assert_allclose(metrics[key], expected_aux[key], rtol=1e-6)
  expected_grad = jax.grad(lambda p: loss(p)[0])(state.params)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      jax.tree_util.tree_map(jnp.subtract, state.params, new.params),
      expected_grad)


def _feature_step_with_frozen_teacher(state, batch, teacher_model,
                                      teacher_variables, settings):
  """One distill step with `settings`; asserts the teacher gets no gradient."""
  def run(variables):
    return train.distill_step(_copy(state), batch, variables,
                              teacher_apply_fn=teacher_model.apply, **settings)

  teacher_grads = jax.grad(lambda v: run(v)[1]['loss'])(teacher_variables)
  for leaf in jax.tree_util.tree_leaves(teacher_grads):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  return run(teacher_variables)


@pytest.mark.parametrize('method', ['at', 'rkd', 'pkt'])
def test_feature_methods_gradient_and_frozen_teacher(method):
  from kd_jax import methods  # pylint: disable=g-import-not-at-top
  teacher_model, teacher_variables = _teacher()
  state, batch = _state(tx=optax.sgd(1.0)), _batch(size=8)
  settings = dict(
      objective=functools.partial(losses.kd_loss, alpha=0.5, temperature=4.0),
      feature_loss=methods.FEATURE_METHODS[method], student_layers=('conv2',),
      teacher_layers=('conv2',), feature_weight=3.0)

  new, metrics = _feature_step_with_frozen_teacher(
      state, batch, teacher_model, teacher_variables, settings)

  capture = lambda mdl, name: name == '__call__' and mdl.name == 'conv2'

  def loss(params):
    logits, s = state.apply_fn({'params': params}, batch['image'],
                               capture_intermediates=capture,
                               mutable=['intermediates'])
    t_logits, t = teacher_model.apply(teacher_variables, batch['image'],
                                      capture_intermediates=capture,
                                      mutable=['intermediates'])
    kd, _ = settings['objective'](logits, t_logits, batch['label'])
    feature, _ = settings['feature_loss'](
        [s['intermediates']['conv2']['__call__'][0]],
        [t['intermediates']['conv2']['__call__'][0]])
    return kd + 3.0 * feature

  np.testing.assert_allclose(metrics['loss'], loss(state.params), rtol=1e-5)
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      jax.tree_util.tree_map(jnp.subtract, state.params, new.params),
      jax.grad(loss)(state.params))


def test_sown_features_are_found_by_name():
  model = models.make_model('resnet20', num_classes=10)
  variables = models.init_variables(model, jax.random.PRNGKey(0), IMAGE_SHAPE)
  _, features, _ = train.forward_with_features(
      model.apply, variables, jnp.zeros((2, *IMAGE_SHAPE)),
      ('stage3', 'embedding', 'BasicBlock_0'), train=False)
  assert [f.shape for f in features] == [(2, 7, 7, 64), (2, 64),
                                         (2, 28, 28, 16)]
  with pytest.raises(ValueError, match="no intermediate feature 'stage9'"):
    train.forward_with_features(model.apply, variables,
                                jnp.zeros((1, *IMAGE_SHAPE)), ('stage9',),
                                train=False)


def _fitnets_state(student_shape=(7, 7, 32), teacher_shape=(7, 7, 256)):
  regressor = models.HintRegressor((teacher_shape,))
  params = regressor.init(jax.random.PRNGKey(3),
                          [jnp.zeros((1, *student_shape))])['params']
  return train.add_regressor(_state(tx=optax.sgd(1.0)), params), regressor


def test_fitnets_step_trains_the_regressor_with_the_student():
  from kd_jax import methods  # pylint: disable=g-import-not-at-top
  teacher_model, teacher_variables = _teacher()
  state, regressor = _fitnets_state()
  batch = _batch(size=8)
  settings = dict(
      objective=functools.partial(losses.kd_loss, alpha=1.0, temperature=4.0),
      feature_loss=methods.FEATURE_METHODS['fitnets'],
      student_layers=('conv2',), teacher_layers=('conv2',),
      feature_weight=2.0, regressor_apply_fn=regressor.apply)

  new, metrics = _feature_step_with_frozen_teacher(
      state, batch, teacher_model, teacher_variables, settings)

  # Independently: the regressor is a 1x1 convolution, i.e. a matmul over
  # channels; the hint is the mean squared error to the teacher's conv2.
  capture = lambda mdl, name: name == '__call__' and mdl.name == 'conv2'
  _, t = teacher_model.apply(teacher_variables, batch['image'],
                             capture_intermediates=capture,
                             mutable=['intermediates'])
  hint_target = t['intermediates']['conv2']['__call__'][0]

  def loss(params):
    logits, s = state.apply_fn(
        {'params': {k: v for k, v in params.items()
                    if k != models.REGRESSOR_KEY}}, batch['image'],
        capture_intermediates=capture, mutable=['intermediates'])
    reg = params[models.REGRESSOR_KEY]['regressor0']
    mapped = (jnp.einsum('bhwc,cd->bhwd',
                         s['intermediates']['conv2']['__call__'][0],
                         reg['kernel'][0, 0]) + reg['bias'])
    hint = jnp.mean(jnp.square(mapped - hint_target))
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    return ce + 2.0 * hint

  np.testing.assert_allclose(metrics['loss'], loss(state.params), rtol=1e-5)
  expected_grad = jax.grad(loss)(state.params)
  assert models.REGRESSOR_KEY in expected_grad
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      jax.tree_util.tree_map(jnp.subtract, state.params, new.params),
      expected_grad)
  # Evaluation sees the student alone.
  assert set(train.model_variables(new)['params']) == {'conv1', 'conv2',
                                                       'head'}
  train.eval_step(new, batch)


def test_cosine_schedule_decays_to_zero():
  schedule = train.learning_rate_schedule(1e-3, 'cosine', 100)
  np.testing.assert_allclose([schedule(0), schedule(50), schedule(100)],
                             [1e-3, 5e-4, 0.0], atol=1e-9)
  assert train.learning_rate_schedule(1e-3, 'constant', 100) == 1e-3
  with pytest.raises(ValueError, match='schedule must be one of'):
    train.learning_rate_schedule(1e-3, 'linear', 100)


@pytest.mark.parametrize('name', ['seed_student_cnn', 'bn_cnn'])
def test_bfloat16_compute_keeps_float32_parameters_and_losses(name):
  model = models.make_model(name)
  state = train.create_train_state(model, jax.random.PRNGKey(0), IMAGE_SHAPE,
                                   1e-3, precision='bfloat16')
  reference = train.create_train_state(model, jax.random.PRNGKey(0),
                                       IMAGE_SHAPE, 1e-3)
  teacher_model, teacher_variables = _teacher()
  step = jax.jit(train.distill_step_with(
      train.compute_in(teacher_model.apply, 'bfloat16'), **DISTILL))
  batch = _batch(size=16)
  new, metrics = step(state, batch, teacher_variables)
  for key in ('loss', 'student_loss', 'distillation_loss', 'grad_norm'):
    assert metrics[key].dtype == jnp.float32, key
  for leaf in jax.tree_util.tree_leaves((new.params, new.opt_state,
                                         new.batch_stats)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  # The forward pass really is in bfloat16: logits differ from float32 by
  # bfloat16 rounding, not more.
  logits = state.apply_fn({'params': state.params,
                           **({'batch_stats': state.batch_stats}
                              if state.batch_stats else {})}, batch['image'])
  exact = reference.apply_fn(train.model_variables(reference), batch['image'])
  assert logits.dtype == jnp.float32
  assert 0 < float(jnp.max(jnp.abs(logits - exact))) < 0.1 * float(
      jnp.max(jnp.abs(exact))) + 0.05
  # And it trains: the loss on a fixed batch goes down.
  losses_seen = []
  for _ in range(15):
    new, metrics = step(new, batch, teacher_variables)
    losses_seen.append(float(metrics['loss']))
  assert losses_seen[-1] < losses_seen[0]
