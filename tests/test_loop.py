"""The loop: fit, evaluation, inference; scan, python and chunked loops agree."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import augment
from kd_jax import data
from kd_jax import loop
from kd_jax import methods
from kd_jax import models
from kd_jax import optimizers
from kd_jax import train
from test_train import IMAGE_SHAPE, KD_CONFIG, _assert_trees_equal, _state, _teacher


def test_evaluate_counts_every_example_once():
  rng = np.random.default_rng(0)
  split = data.Split(
      images=rng.uniform(size=(23, *IMAGE_SHAPE)).astype(np.float32),
      labels=rng.integers(0, 10, size=23).astype(np.int32))
  state = _state()
  summary = loop.evaluate(state, split, batch_size=10)
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
    loop.check_finite({'loss': float('nan'), 'accuracy': 0.5},
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
  state, test = loop.fit(
      state, train.train_step, dataset,
      loop.LoopSettings(epochs=3, batch_size=32, eval_batch_size=100,
                        seed=seed),
      stage='teacher', on_epoch_end=lambda *args: epochs.append(args))
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


@pytest.mark.parametrize('kind', loop.LOOPS)
def test_fit_makes_no_implicit_transfers(kind):
  # Every transfer in fit is explicit: a NumPy array handed to a compiled
  # step or evaluation (an implicit host-to-device copy) fails here. On a
  # CPU the guard lets device-to-host reads through (device memory is host
  # memory), so an int(state.step) would pass this test.
  dataset = _separable_dataset(256, 0)
  state = train.create_train_state(_Linear(), jax.random.PRNGKey(0),
                                   (4, 4, 1), 5e-2)
  settings = loop.LoopSettings(epochs=2, batch_size=32, eval_batch_size=100,
                               loop=kind, steps_per_chunk=3, scan_unroll=True)
  with jax.transfer_guard('disallow'):
    state, test = loop.fit(state, train.train_step, dataset, settings,
                           stage='teacher')
  assert int(state.step) == 2 * 8 and test['count'] == 256


def _image_dataset(num_train: int, num_test: int) -> data.Dataset:
  rng = np.random.default_rng(5)
  split = lambda n: data.Split(
      images=rng.uniform(size=(n, *IMAGE_SHAPE)).astype(np.float32),
      labels=rng.integers(0, 10, size=n).astype(np.int32))
  return data.Dataset(name='random', train=split(num_train),
                      test=split(num_test), num_classes=10, source='memory')


def _fit_students(dataset, *, kind, cached=False, steps_per_chunk=0,
                  scan_unroll=False, epochs=2, augment=None):
  teacher_model, teacher_variables = _teacher()
  step = functools.partial(train.distill_step, distiller=train.Distiller(
      methods.build_objective(KD_CONFIG), teacher_model.apply))
  step_args, extras = (teacher_variables,), {}
  if cached:
    step_args = ()
    extras['teacher_logits'] = loop.predict_logits(
        teacher_model.apply, teacher_variables, dataset.train, 64)
  history = []
  state = _state('hinton_teacher_mlp')
  if augment is not None:
    state = state.replace(augment=augment)
  state, test = loop.fit(
      state, step, dataset,
      loop.LoopSettings(epochs=epochs, batch_size=16, eval_batch_size=64,
                        seed=11, loop=kind, steps_per_chunk=steps_per_chunk,
                        scan_unroll=scan_unroll),
      stage='distill', step_args=step_args, train_extras=extras,
      on_epoch_end=lambda *args: history.append(args[2]))
  return state, test, history


def test_scan_loop_equals_python_loop():
  # Same batches in the same order, dropout and augmentation keyed by step:
  # the same training.
  dataset = _image_dataset(100, 30)
  crop_and_flip = augment.AugmentSettings(crop_padding=4, flip=True)
  scan_state, scan_test, scan_history = _fit_students(
      dataset, kind='scan', augment=crop_and_flip)
  py_state, py_test, py_history = _fit_students(
      dataset, kind='python', augment=crop_and_flip)
  assert int(scan_state.step) == int(py_state.step) == 2 * (100 // 16)
  _assert_trees_equal(scan_state.params, py_state.params)
  plain_state, _, _ = _fit_students(dataset, kind='python')
  assert not np.allclose(plain_state.params['head']['kernel'],
                         py_state.params['head']['kernel'])
  for scan_epoch, py_epoch in zip(scan_history, py_history):
    assert scan_epoch.keys() == py_epoch.keys()
    for key in scan_epoch:
      np.testing.assert_allclose(scan_epoch[key], py_epoch[key], rtol=1e-5)
  np.testing.assert_allclose(scan_test['loss'], py_test['loss'], rtol=1e-5)


@pytest.mark.parametrize('scan_unroll', [False, True])
def test_scan_chunks_equal_one_scan_per_epoch(scan_unroll):
  # 6 steps per epoch in chunks of 4: one full chunk and a shorter one.
  dataset = _image_dataset(100, 30)
  whole, _, whole_history = _fit_students(dataset, kind='scan', epochs=1)
  chunked, _, chunked_history = _fit_students(
      dataset, kind='scan', steps_per_chunk=4, scan_unroll=scan_unroll,
      epochs=1)
  # Bit for bit under XLA:CPU's default emitters; the tests' faster-compiling
  # ones (tests/conftest.py) round a loop body and straight-line code apart
  # (after 6 Adam steps, mostly ~1e-9, and ~2e-7 where a gradient is near
  # 0). A batch out of place would move many parameters by ~1e-3.
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
      whole.params, chunked.params)
  np.testing.assert_allclose(whole_history[0]['loss'],
                             chunked_history[0]['loss'], rtol=1e-6)


@pytest.mark.parametrize('kind', ['scan', 'python'])
def test_cached_teacher_logits_equal_teacher_online(kind):
  dataset = _image_dataset(100, 30)
  # The cache is computed at the evaluation batch size, the online logits
  # at the training batch size, in other XLA programs: on this CPU (AVX-512)
  # they agree to float32 rounding (~1e-6 of a logit), not bit for bit.
  teacher_model, teacher_variables = _teacher()
  cache = loop.predict_logits(teacher_model.apply, teacher_variables,
                              dataset.train, 64)
  forward = jax.jit(functools.partial(teacher_model.apply, train=False))
  for indices in data.epoch_batch_indices(11, 0, 100, 16):
    np.testing.assert_allclose(
        cache[indices], forward(teacher_variables,
                                dataset.train.images[indices]),
        rtol=1e-5, atol=1e-5)
  online, online_test, online_history = _fit_students(dataset, kind=kind)
  cached, cached_test, cached_history = _fit_students(dataset, kind=kind,
                                                      cached=True)
  # So parameters and metrics agree to rounding too (~1e-4 of a parameter
  # after 12 Adam steps), where rows given to the wrong examples would move
  # them by the size of whole updates.
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=0.05, atol=5e-4),
      online.params, cached.params)
  for key in online_test:
    np.testing.assert_allclose(online_test[key], cached_test[key], rtol=1e-3)
  for online_epoch, cached_epoch in zip(online_history, cached_history):
    for key in online_epoch:
      np.testing.assert_allclose(online_epoch[key], cached_epoch[key],
                                 rtol=1e-3)


def test_predict_logits_covers_every_example_in_order():
  teacher_model, teacher_variables = _teacher()
  split = _image_dataset(37, 1).train
  logits = loop.predict_logits(teacher_model.apply, teacher_variables, split,
                               batch_size=16)
  assert logits.shape == (37, 10)
  np.testing.assert_allclose(
      logits, teacher_model.apply(teacher_variables, split.images),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['scan', 'python'])
def test_a_second_run_with_equal_settings_reuses_the_compiled_steps(kind):
  # What a sweep's next seed does: a model, optimizer and train state made
  # again from equal settings. Equal settings give the same module and
  # optimizer objects, so the jitted chunk of the step traces only once.
  def step(state, batch):  # This test's own step: its own jit cache.
    return train.train_step(state, batch)

  dataset = _image_dataset(32, 8)
  settings = loop.LoopSettings(epochs=1, batch_size=16, eval_batch_size=8,
                               loop=kind, steps_per_chunk=1,
                               scan_unroll=True)
  for seed in (0, 1):
    model = models.make_model('seed_student_cnn')
    tx = optimizers.make_optimizer(optimizers.default_section(),
                                   steps_per_epoch=2, epochs=1)
    state = train.create_train_state(model, jax.random.PRNGKey(seed),
                                     IMAGE_SHAPE, tx=tx)
    loop.fit(state, step, dataset, settings, stage='student')
  jitted = (loop.make_scan_steps(step, unroll=True, batch_sharding=None)
            if kind == 'scan' else loop._jitted_one_step(step))  # pylint: disable=protected-access
  assert jitted._cache_size() == 1  # pylint: disable=protected-access
