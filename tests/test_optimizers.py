"""Tests for `kd_jax.optimizers`.

Trajectories are checked against float64 NumPy re-implementations of the
algorithms as PyTorch documents them (`torch.optim.SGD`, `Adam`, `AdamW`),
written without optax, and learning rates against the epoch-based definition
of the step decay (RepDistiller's `adjust_learning_rate`). Each trajectory
runs as one `lax.scan` program, so that a test compiles once.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import optimizers

_STEPS_PER_EPOCH = 2
_EPOCHS = 4
_STEPS = _STEPS_PER_EPOCH * _EPOCHS


# --- float64 NumPy references, written from PyTorch's documented algorithms.


def _np_step_lr(step, base, rate, decay_epochs, steps_per_epoch):
  """RepDistiller: `lr = base * rate ** sum(epoch > decay_epochs)` with the
  1-based epoch `step // steps_per_epoch + 1`."""
  epoch = step // steps_per_epoch + 1
  return base * rate**sum(epoch > d for d in decay_epochs)


def _np_sgd(params, grads, lrs, *, momentum, weight_decay, nesterov):
  """`torch.optim.SGD` (dampening 0) on a dict of arrays: the parameters
  after each step, `[step][name]`."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf, trajectory = {}, []
  for t, lr in enumerate(lrs):
    for k in p:
      g = grads[k][t] + weight_decay * p[k]
      if momentum:
        buf[k] = g if t == 0 else momentum * buf[k] + g
        update = g + momentum * buf[k] if nesterov else buf[k]
      else:
        update = g
      p[k] = p[k] - lr * update
    trajectory.append(dict(p))
  return trajectory


def _np_adam(params, grads, lrs, *, weight_decay, decoupled, b1=0.9,
             b2=0.999, eps=1e-8):
  """`torch.optim.AdamW` (`decoupled`) or `torch.optim.Adam` (L2 decay added
  to the gradient): the parameters after each step, `[step][name]`."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(v) for k, v in p.items()}
  trajectory = []
  for t, lr in enumerate(lrs, start=1):
    for k in p:
      g = grads[k][t - 1]
      if decoupled:
        p[k] = p[k] * (1 - lr * weight_decay)
      else:
        g = g + weight_decay * p[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    trajectory.append(dict(p))
  return trajectory


# --- helpers. -----------------------------------------------------------------


def _problem(seed=0):
  """Float32 parameters (a model and a module, as `TrainState.trainable`)
  and `_STEPS` gradients of each."""
  rng = np.random.default_rng(seed)
  shapes = {'w': (3, 4), 'b': (4,), 'regressor': (2,)}
  params = {k: rng.standard_normal(s).astype(np.float32)
            for k, s in shapes.items()}
  grads = {k: rng.standard_normal((_STEPS,) + s).astype(np.float32)
           for k, s in shapes.items()}
  return params, grads


def _nest(flat):
  """`{'w', 'b', 'regressor'}` -> the `trainable` tree."""
  return {'model': {'w': flat['w'], 'b': flat['b']},
          'modules': {'fitnets': {'regressor': flat['regressor']}}}


def _flat(tree):
  return {'w': tree['model']['w'], 'b': tree['model']['b'],
          'regressor': tree['modules']['fitnets']['regressor']}


def _run(tx, params, grads):
  """The parameters after each of `_STEPS` updates, `{name: [T, ...]}`."""
  @jax.jit
  def run(params, grads):
    def step(carry, grad):
      params, state = carry
      updates, state = tx.update(grad, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params
    _, trajectory = jax.lax.scan(step, (params, tx.init(params)), grads)
    return trajectory
  return _flat(run(_nest(params), _nest(grads)))


def _assert_trajectory(got, expected, atol=2e-6):
  for k in expected[0]:
    np.testing.assert_allclose(got[k], np.stack([e[k] for e in expected]),
                               rtol=0, atol=atol, err_msg=k)


def _section(**overrides):
  return optimizers.default_section(**overrides)


def _lrs(section):
  return [float(optimizers.learning_rate_at(
      section, t, steps_per_epoch=_STEPS_PER_EPOCH, epochs=_EPOCHS))
          for t in range(_STEPS)]


# --- updates. -----------------------------------------------------------------


class TorchAlgorithmTest(parameterized.TestCase):
  """Trajectories against PyTorch's algorithms, with a step decay mid-way."""

  # Decays at epochs 1 and 3: the rate changes at steps 2 and 6 of 8.
  _STEP = dict(schedule='step', decay_epochs='1,3', decay_rate=0.1,
               learning_rate=0.5)

  @parameterized.named_parameters(
      dict(testcase_name='plain', momentum=0.0, nesterov=False, wd=0.0),
      dict(testcase_name='momentum', momentum=0.9, nesterov=False, wd=0.0),
      dict(testcase_name='momentum_decay', momentum=0.9, nesterov=False,
           wd=0.05),
      dict(testcase_name='nesterov_decay', momentum=0.9, nesterov=True,
           wd=0.05),
  )
  def test_sgd(self, momentum, nesterov, wd):
    section = _section(name='sgd', momentum=momentum, nesterov=nesterov,
                       weight_decay=wd, **self._STEP)
    params, grads = _problem()
    lrs = [_np_step_lr(t, 0.5, 0.1, (1, 3), _STEPS_PER_EPOCH)
           for t in range(_STEPS)]
    got = _run(optimizers.make_optimizer(
        section, steps_per_epoch=_STEPS_PER_EPOCH, epochs=_EPOCHS),
               params, grads)
    _assert_trajectory(got, _np_sgd(params, grads, lrs, momentum=momentum,
                                    weight_decay=wd, nesterov=nesterov))

  def test_sgd_with_warmup_and_cosine(self):
    section = _section(name='sgd', learning_rate=0.1, schedule='cosine',
                       warmup_epochs=1.5, weight_decay=5e-4, nesterov=True)
    params, grads = _problem(1)
    total, warmup = _STEPS, 3  # 1.5 epochs of 2 steps.
    lrs = [0.1 * min(1, t / warmup) * 0.5 * (1 + np.cos(np.pi * t / total))
           for t in range(_STEPS)]
    got = _run(optimizers.make_optimizer(
        section, steps_per_epoch=_STEPS_PER_EPOCH, epochs=_EPOCHS),
               params, grads)
    _assert_trajectory(got, _np_sgd(params, grads, lrs, momentum=0.9,
                                    weight_decay=5e-4, nesterov=True))

  @parameterized.named_parameters(
      dict(testcase_name='adamw', name='adamw', decoupled=True, scale=1.0),
      dict(testcase_name='adam_l2', name='adam', decoupled=False, scale=1.0),
      # Gradients of the size of eps: where eps sits in the update matters.
      dict(testcase_name='adamw_eps', name='adamw', decoupled=True,
           scale=1e-6),
  )
  def test_adam(self, name, decoupled, scale):
    section = _section(name=name, weight_decay=0.1, b1=0.8, b2=0.99,
                       eps=1e-6, **self._STEP)
    params, grads = _problem(2)
    grads = {k: (scale * g).astype(np.float32) for k, g in grads.items()}
    lrs = [_np_step_lr(t, 0.5, 0.1, (1, 3), _STEPS_PER_EPOCH)
           for t in range(_STEPS)]
    got = _run(optimizers.make_optimizer(
        section, steps_per_epoch=_STEPS_PER_EPOCH, epochs=_EPOCHS),
               params, grads)
    _assert_trajectory(got, _np_adam(
        params, grads, lrs, weight_decay=0.1, decoupled=decoupled, b1=0.8,
        b2=0.99, eps=1e-6))


class SeedProtocolTest(parameterized.TestCase):
  """The default section is the optimiser the seed protocol always used."""

  @parameterized.parameters('constant', 'cosine')
  def test_default_is_optax_adam(self, schedule):
    section = _section(schedule=schedule)
    tx = optimizers.make_optimizer(section, steps_per_epoch=_STEPS_PER_EPOCH,
                                   epochs=_EPOCHS)
    before = optax.adam(1e-3 if schedule == 'constant' else
                        optax.cosine_decay_schedule(1e-3, _STEPS))
    params, grads = _problem(3)
    self.assertEqual(jax.tree.structure(tx.init(_nest(params))),
                     jax.tree.structure(before.init(_nest(params))))
    got, expected = _run(tx, params, grads), _run(before, params, grads)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k], err_msg=k)

  def test_defaults_are_valid(self):
    section = _section()
    for name, setting in optimizers.SETTINGS.items():
      self.assertIsNone(setting.field.problem(name, section[name]), name)
    self.assertEqual(optimizers.problems(section, 'teacher.optimizer',
                                         epochs=1), [])


# --- learning rates. ----------------------------------------------------------


class ScheduleTest(parameterized.TestCase):

  def test_step_decay_switches_at_epoch_edges(self):
    section = _section(schedule='step', decay_epochs='2', learning_rate=1.0)
    lrs = [float(optimizers.learning_rate_at(
        section, t, steps_per_epoch=3, epochs=4)) for t in range(12)]
    np.testing.assert_allclose(lrs, [1.0] * 6 + [0.1] * 6, rtol=1e-7)

  def test_step_decay_against_epoch_definition(self):
    section = _section(schedule='step', decay_epochs='1, 2,5', decay_rate=0.5,
                       learning_rate=0.05)
    steps = np.arange(7 * 3)
    got = jax.jit(lambda t: optimizers.learning_rate_at(
        section, t, steps_per_epoch=3, epochs=7))(steps)
    expected = [_np_step_lr(t, 0.05, 0.5, (1, 2, 5), 3) for t in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-7)

  def test_linear_warmup(self):
    section = _section(learning_rate=2.0, warmup_epochs=1.5)
    lrs = _lrs(section)  # warm-up over 3 steps.
    np.testing.assert_allclose(lrs, [0.0, 2 / 3, 4 / 3] + [2.0] * 5,
                               rtol=1e-6)

  def test_warmup_keeps_decays_on_epoch_edges(self):
    section = _section(schedule='step', decay_epochs='2', learning_rate=1.0,
                       warmup_epochs=1.0)
    np.testing.assert_allclose(_lrs(section),
                               [0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1],
                               rtol=1e-6)

  def test_constant_without_warmup_is_a_number(self):
    rate = optimizers.schedule(_section(learning_rate=0.3),
                               steps_per_epoch=2, epochs=3)
    self.assertEqual(rate, 0.3)


# --- config checks. -----------------------------------------------------------


class ProblemsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name='no_decays', changes=dict(schedule='step'),
           field='decay_epochs'),
      dict(testcase_name='not_increasing',
           changes=dict(schedule='step', decay_epochs='150,150'),
           field='decay_epochs'),
      dict(testcase_name='after_training',
           changes=dict(schedule='step', decay_epochs='150,240'),
           field='decay_epochs'),
      dict(testcase_name='nesterov_without_momentum',
           changes=dict(name='sgd', nesterov=True, momentum=0.0),
           field='nesterov'),
      dict(testcase_name='nesterov_with_adam', changes=dict(nesterov=True),
           field='nesterov'),
      dict(testcase_name='warmup_too_long', changes=dict(warmup_epochs=300.0),
           field='warmup_epochs'),
  )
  def test_message_names_the_field(self, changes, field):
    found = optimizers.problems(_section(**changes), 'student.optimizer',
                                epochs=240)
    self.assertLen(found, 1)
    self.assertStartsWith(found[0], f'config.student.optimizer.{field} = ')

  def test_benchmark_recipe_is_valid(self):
    section = _section(name='sgd', learning_rate=0.05, schedule='step',
                       decay_epochs='150,180,210', weight_decay=5e-4)
    self.assertEqual(optimizers.problems(section, 'student.optimizer',
                                         epochs=240), [])

  @parameterized.parameters(
      ('decay_epochs', '150,x'), ('decay_epochs', '0,10'),
      ('momentum', 1.0), ('decay_rate', 0.0), ('b2', -0.1), ('eps', 0.0),
      ('name', 'lamb'), ('schedule', 'linear'), ('nesterov', 1))
  def test_fields_reject(self, name, value):
    problem = optimizers.SETTINGS[name].field.problem(
        f'teacher.optimizer.{name}', value)
    self.assertIsNotNone(problem)
    self.assertStartsWith(problem, f'config.teacher.optimizer.{name} = ')

  def test_default_section_rejects_unknown_settings(self):
    with self.assertRaisesRegex(ValueError, 'lr'):
      optimizers.default_section(lr=0.1)


if __name__ == '__main__':
  absltest.main()
