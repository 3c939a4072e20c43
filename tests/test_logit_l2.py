"""Tests for `kd_jax.methods.logit_l2`: the template a new method's tests
follow (README, "Adding a method")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import seed
from kd_jax import methods
from kd_jax import objective
from kd_jax import validation
from kd_jax.methods import logit_l2


def _np_loss(student, teacher, weights):
  """The paper's equation in float64 NumPy."""
  student, teacher = np.float64(student), np.float64(teacher)
  per_example = 0.5 * ((student - teacher)**2).sum(axis=-1)
  return (weights * per_example).sum() / weights.sum()


@pytest.mark.parametrize('jit', [False, True])
def test_value_gradient_and_frozen_teacher(jit):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 6, 10)).astype(np.float32)
  weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
  loss = lambda s, t: logit_l2.logit_l2_loss(s, t, weights=weights)[0]
  if jit:
    loss = jax.jit(loss)
  np.testing.assert_allclose(loss(student, teacher),
                             _np_loss(student, teacher, weights), rtol=1e-6)
  grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student,
                                                               teacher)
  # d/ds of the mean of 1/2 ||s - t||^2 is (s - t) / (number of examples).
  np.testing.assert_allclose(
      grad_student, (student - teacher) * weights[:, None] / 4, rtol=1e-6)
  np.testing.assert_array_equal(grad_teacher, 0.0)  # The teacher is frozen.


def test_padded_rows_holding_nan_reach_no_gradient():
  student = jnp.ones((3, 4)).at[2].set(jnp.nan)
  teacher = jnp.zeros((3, 4)).at[2].set(jnp.inf)
  weights = jnp.array([1.0, 1.0, 0.0])
  grad = jax.grad(lambda s: logit_l2.logit_l2_loss(
      s, teacher, weights=weights)[0])(student)
  assert np.all(np.isfinite(grad)) and np.all(grad[2] == 0)


def test_the_term_in_an_objective_and_its_config():
  config = seed.with_method(seed.get_config('quick'), 'logit_l2',
                            ce={'weight': 1.0})
  validation.validate(config)
  assert methods.reference('logit_l2') == 'Ba & Caruana, NeurIPS 2014'
  logits = jnp.arange(20.0).reshape(2, 10)
  batch = {'label': jnp.array([0, 1])}
  loss, aux = methods.build_objective(config.distill)(
      objective.Outputs(logits), objective.Outputs(logits + 1.0), batch)
  np.testing.assert_allclose(aux['logit_l2_loss'], 5.0)  # 1/2 * 10 * 1^2.
  np.testing.assert_allclose(loss, aux['ce_loss'] + aux['logit_l2_loss'])
