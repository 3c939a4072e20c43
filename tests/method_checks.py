"""Checks that the tests of the distillation methods (`test_cc.py`,
`test_dist.py`, `test_fsp.py`, ...) share: a loss's float64 gradient against
central differences, a term's gradients (the teacher gets none) and a
method's example configs.

A plain helper module, not a test file: import what a test needs, as in
`from method_checks import assert_gradient_matches_finite_differences`.
"""

import importlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import pytest

from kd_jax import errors
from kd_jax import objective
from kd_jax import validation

# The CIFAR-100 teacher-student pair (ResNet-56 to ResNet-20) whose config
# for each method the method tests validate.
CIFAR_PAIR = 'experiments.cifar100.resnet56_resnet20'


# --- inputs. ------------------------------------------------------------------


def standard_normal(seed: int, *shapes: Sequence[int]) -> list[np.ndarray]:
  """One float32 standard normal array per shape, in order, from
  `np.random.default_rng(seed)`."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


# --- float64 references of layers, and module parameters. -------------------


def np_conv(x, params, stride, padding):
  """`nn.Conv2d(C, D, k, stride, padding)` of `[B, H, W, C]` (kernel `(kh,
  kw, C, D)`), plus the bias."""
  x = np.float64(x)
  kernel, bias = np.float64(params['kernel']), np.float64(params['bias'])
  kh, kw = kernel.shape[:2]
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = sum(x[:, a:a + (out_h - 1) * stride + 1:stride,
              b:b + (out_w - 1) * stride + 1:stride] @ kernel[a, b]
            for a in range(kh) for b in range(kw))
  return out + bias


def np_transposed_conv(x, params, stride, padding):
  """`nn.ConvTranspose2d(C, D, k, stride, padding)` as PyTorch defines it:
  input position `y` adds `x[y] @ W[:, :, a, b]` to output position `y *
  stride - padding + a` (PyTorch's weight `(C, D, k, k)` is Flax's
  transposed kernel `(k, k, D, C)`)."""
  x = np.float64(x)
  kernel, bias = np.float64(params['kernel']), np.float64(params['bias'])
  k = kernel.shape[0]
  b, h, w, _ = x.shape
  full = np.zeros((b, (h - 1) * stride + k, (w - 1) * stride + k,
                   kernel.shape[2]))
  for a in range(k):
    for c in range(k):
      full[:, a:a + (h - 1) * stride + 1:stride,
           c:c + (w - 1) * stride + 1:stride] += x @ kernel[a, c].T
  out_h = (h - 1) * stride - 2 * padding + k
  out_w = (w - 1) * stride - 2 * padding + k
  return full[:, padding:padding + out_h, padding:padding + out_w] + bias


def np_batch_norm(x, params):
  """BatchNorm2d in training mode: the batch's mean and biased variance."""
  mean = x.mean(axis=(0, 1, 2))
  variance = ((x - mean)**2).mean(axis=(0, 1, 2))
  return ((x - mean) / np.sqrt(variance + 1e-5) * np.float64(params['scale'])
          + np.float64(params['bias']))


def param_count(params):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def random_params(module, seed, *inputs):
  """Parameters of `module` for `inputs`, uniform in [-0.5, 0.5), from their
  shapes alone (no initialiser is compiled: the tests stay fast)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: rng.uniform(-0.5, 0.5, leaf.shape).astype(np.float32),
      shapes['params'])


# --- the loss's gradient. -----------------------------------------------------


def assert_gradient_matches_finite_differences(
    loss_fn: Callable[..., Any], x: Any, *, args: Sequence[Any] = (),
    zero_rows: Any = None, seed: int = 0, eps: float = 1e-5,
    rtol: float = 1e-6, atol: float = 1e-10, directions: int = 3) -> Any:
  """Checks the gradient of `loss_fn` with respect to `x` in float64.

  Under `jax.enable_x64(True)`, one jitted `jax.value_and_grad` of
  `loss_fn(x, *args)` with respect to `x` gives the gradient at `x`; every
  leaf of it must be float64, and, along `directions` random (standard
  normal, from `np.random.default_rng(seed)`) directions `d`, `<grad, d>`
  must match the central difference `(loss(x + eps d) - loss(x - eps d)) /
  (2 eps)` to `rtol` and `atol`.

  Args:
    loss_fn: `(x, *args)` -> scalar loss. Anything it closes over besides
      should be float64 too (settings such as a temperature may stay Python
      numbers).
    x: an array, or a pytree of arrays (a list of maps, a tuple of
      arguments); converted to float64.
    args: constants that follow `x` (the teacher, the weights): arrays or
      pytrees of them, converted to float64 like `x`.
    zero_rows: a `[B]` mask: wherever it is 0, every leaf of the gradient
      must be exactly 0 in that row (a masked example reaches no gradient).
      Or a sequence with one such mask (or None: no check) per leaf of `x`.
      None (the default): no check.
    seed: the seed of the directions.
    eps: the step of the central differences.
    rtol: relative tolerance of `<grad, d>` against the difference.
    atol: absolute tolerance of the same.
    directions: how many directions.

  Returns:
    The gradient at `x` (a pytree like `x`), for further checks.
  """
  x, args = jax.tree.map(lambda a: np.asarray(a, np.float64), (x, args))
  leaves, treedef = jax.tree.flatten(x)
  if zero_rows is None:
    masks = [None] * len(leaves)
  elif isinstance(zero_rows, (list, tuple)):
    masks = list(zero_rows)
    assert len(masks) == len(leaves), (len(masks), len(leaves))
  else:
    masks = [zero_rows] * len(leaves)
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    value_and_grad = jax.jit(
        lambda point: jax.value_and_grad(loss_fn)(point, *args))
    _, grad = value_and_grad(x)
    grads = jax.tree.leaves(grad)
    for g, mask in zip(grads, masks):
      assert g.dtype == np.float64, g.dtype
      if mask is not None:
        np.testing.assert_array_equal(g[np.asarray(mask) == 0], 0.0)
    for _ in range(directions):
      steps = [rng.standard_normal(leaf.shape) for leaf in leaves]
      plus = treedef.unflatten([a + eps * d for a, d in zip(leaves, steps)])
      minus = treedef.unflatten([a - eps * d for a, d in zip(leaves, steps)])
      difference = value_and_grad(plus)[0] - value_and_grad(minus)[0]
      np.testing.assert_allclose(
          sum(np.vdot(g, d) for g, d in zip(grads, steps)),
          difference / (2 * eps), rtol=rtol, atol=atol)
  return grad


# --- the record's term. -------------------------------------------------------


def term_batch(mask: np.ndarray, labels: Optional[np.ndarray] = None,
               **extra: Any) -> dict[str, Any]:
  """A batch for a term: `label` (default zeros, int32), `mask` and any
  `extra` entries (e.g. `epoch`)."""
  if labels is None:
    labels = np.zeros(len(mask), np.int32)
  return {'label': labels, 'mask': mask, **extra}


def term_inputs(student: Any, teacher: Any, batch: Mapping[str, Any],
                num_classes: int = 10) -> tuple[Any, Any, Any]:
  """`(student outputs, teacher outputs, batch)`, a term's arguments.

  A side given as a dict is its features (layer name -> array), beside zero
  logits `[B, num_classes]`; given as an array, it is the logits.
  """

  def outputs(side):
    if isinstance(side, Mapping):
      logits = np.zeros((len(batch['mask']), num_classes), np.float32)
      return objective.Outputs(logits, side)
    return objective.Outputs(side)

  return outputs(student), outputs(teacher), batch


def term_value_and_grads(term: objective.TermFn, student: Any, teacher: Any,
                         batch: Mapping[str, Any]) -> tuple[Any, Any]:
  """`((value, aux), (student_grad, teacher_grad))` of `term` on the inputs
  `term_inputs` makes of `student`, `teacher` and `batch`, from one jitted
  `value_and_grad`."""

  def evaluate(s, t):
    return term(*term_inputs(s, t, batch))

  return jax.jit(jax.value_and_grad(evaluate, argnums=(0, 1), has_aux=True))(
      student, teacher)


def module_term_gradients(module: Any, term: objective.TermFn, name: str,
                          params: Any, student: Mapping[str, Any],
                          teacher: Mapping[str, Any], batch: Mapping[str, Any],
                          layers: Sequence[str], num_classes: int = 10
                          ) -> tuple[Any, Any, Any]:
  """A term `name` on the output of its trainable `module` (with `params`)
  applied to the student features `layers`, from one jitted program.

  Returns:
    `(value, (grads of params, of the student features, of the teacher
    features), (grads of the module's output, of the teacher features),
    taking the output as the input))`.
  """
  logits = np.zeros((len(batch['mask']), num_classes), np.float32)

  def on_outputs(outputs, teacher_features):
    return term(objective.Outputs(logits, {}, {name: outputs}),
                objective.Outputs(logits, teacher_features), batch)[0]

  def evaluate(params, student_features, teacher_features):
    outputs = module.apply({'params': params},
                           [student_features[layer] for layer in layers])
    return on_outputs(outputs, teacher_features), outputs

  @jax.jit
  def gradients(params, student_features, teacher_features):
    (value, outputs), grads = jax.value_and_grad(
        evaluate, argnums=(0, 1, 2), has_aux=True)(params, student_features,
                                                   teacher_features)
    return value, grads, jax.grad(on_outputs, argnums=(0, 1))(
        outputs, teacher_features)

  return gradients(params, student, teacher)


def assert_trains(grads: Any) -> None:
  """Every leaf of `grads` is finite and not all zero."""
  for grad in jax.tree.leaves(grads):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def assert_only_the_student_learns(student_grad: Any, teacher_grad: Any,
                                   mask: np.ndarray) -> None:
  """The teacher's gradient is exactly 0 in every leaf; every leaf of the
  student's is finite, not all zero, and exactly 0 in the rows where `mask`
  is 0."""
  for grad in jax.tree.leaves(teacher_grad):
    np.testing.assert_array_equal(grad, 0.0)
  assert_trains(student_grad)
  for grad in jax.tree.leaves(student_grad):
    np.testing.assert_array_equal(grad[mask == 0], 0.0)


# --- the configs. -------------------------------------------------------------


def quick_configs(name: str, variants: Sequence[str] = ('quick',
                                                        'quick,strong')):
  """`experiments/<name>.py`'s configs for `variants`, in order: each one
  validates and distils with the terms `ce,<name>`."""
  experiment = importlib.import_module(f'experiments.{name}')
  configs = []
  for variant in variants:
    config = experiment.get_config(variant)
    validation.validate(config)
    assert config.distill.terms == f'ce,{name}', config.distill.terms
    configs.append(config)
  return configs


def cifar_pair_config(name: str, student_layers: Optional[str] = None,
                      teacher_layers: Optional[str] = None):
  """`experiments/cifar100/resnet56_resnet20.py:<name>`, which validates;
  its section's `student_layers` and `teacher_layers` are checked where
  given."""
  config = importlib.import_module(CIFAR_PAIR).get_config(name)
  validation.validate(config)
  section = getattr(config.distill, name)
  if student_layers is not None:
    assert section.student_layers == student_layers, section.student_layers
  if teacher_layers is not None:
    assert section.teacher_layers == teacher_layers, section.teacher_layers
  return config


def assert_rejected(config: Any, match: str) -> None:
  """`validation.validate(config)` raises a `UserInputError` matching
  `match`."""
  with pytest.raises(errors.UserInputError, match=match):
    validation.validate(config)
