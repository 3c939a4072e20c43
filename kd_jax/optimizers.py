"""The optimiser of a training stage, from its config section, as optax.

A stage's optimiser section (proposed: `config.teacher.optimizer`,
`config.student.optimizer`; fields and defaults in `SETTINGS`) describes

  * the update: `'adam'`, `'adamw'` or `'sgd'`, with PyTorch's semantics:
      - `sgd` is `torch.optim.SGD(lr, momentum, dampening=0, weight_decay,
        nesterov)`: `g = grad + wd * p; buf = m * buf + g` (buf starts at 0,
        so the first `buf` is `g`, as torch's); the update is `g + m * buf`
        with Nesterov, else `buf`; `p -= lr * update`. This is optax's
        `add_decayed_weights -> trace -> scale_by_learning_rate`; the
        momentum buffer holds unscaled gradients in both, so a change of the
        learning rate acts from the step it happens on, as in torch.
      - `adam` is `torch.optim.Adam`: coupled (L2) weight decay, `g = grad +
        wd * p`, then Adam; with `weight_decay = 0` it is exactly
        `optax.adam(...)` (same state tree, same numbers), so the seed
        protocol's default optimiser is unchanged.
      - `adamw` is `torch.optim.AdamW`: decoupled, `p -= lr * (adam_update +
        wd * p)` (torch multiplies `p` by `1 - lr * wd` first; the Adam
        update does not depend on `p`, so it is the same step).
    Adam's `eps` sits where torch puts it: both compute `m_hat / (sqrt(v_hat)
    + eps)` with bias-corrected moments (optax's `eps_root`, inside the
    root, stays 0); the step differs only in float rounding. (TensorFlow's
    Adam is the one that adds its epsilon to the uncorrected root.) b1, b2,
    eps default to both libraries' 0.9, 0.999, 1e-8.
  * the learning rate, a function of the step count `t` (0-based; the `t`-th
    update uses `lr(t)`, as `TrainState.step` counts them):
      - `'constant'`: `learning_rate`;
      - `'cosine'`: half a cosine from `learning_rate` to 0 over all
        `epochs * steps_per_epoch` steps (`optax.cosine_decay_schedule`);
      - `'step'`: `learning_rate * decay_rate ** n` with `n` the number of
        `decay_epochs` `<=` the step's 0-based epoch `t // steps_per_epoch`:
        with a decay at 150, epochs 0..149 (the first 150) use the base rate
        and epoch 150 (the 151st) the decayed one. This is RepDistiller's
        `adjust_learning_rate` (1-based `epoch > 150`) and torch's
        `MultiStepLR(milestones=[150, ...])` stepped once per epoch.
    and a linear warm-up multiplies it: `min(1, t / warmup_steps)` with
    `warmup_steps = round(warmup_epochs * steps_per_epoch)` (at least 1), so
    the first update has rate 0 and the schedule is reached at `t =
    warmup_steps`; the schedule itself is not shifted, so the step decays
    stay on their epoch boundaries.

Weight decay applies to every trainable parameter, batch-norm scales and
biases included, as in RepDistiller (which passes all parameters to one
`optim.SGD`); the objective's trainable modules (`TrainState.modules`) are
decayed with the model.
"""

from collections.abc import Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kd_jax import fields
from kd_jax import models
from kd_jax import objective

NAMES = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'step')


def _epoch_list(value: str) -> tuple[int, ...]:
  """`'150, 180'` -> `(150, 180)`; ValueError if a word is not an integer."""
  return tuple(int(word) for word in fields.parse_list(value))


def _valid_epoch_list(value: str) -> bool:
  try:
    return all(epoch >= 1 for epoch in _epoch_list(value))
  except ValueError:
    return False


def _unit_interval() -> fields.Field:
  return fields.Field(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')


SETTINGS: dict[str, objective.Setting] = {
    'name': objective.Setting(
        'adam', fields.one_of(NAMES),
        'adam = torch.optim.Adam (L2 weight decay); adamw = '
        'torch.optim.AdamW (decoupled weight decay); sgd = torch.optim.SGD '
        'with momentum (the CIFAR benchmark: lr 0.05, momentum 0.9, weight '
        'decay 5e-4).'),
    'learning_rate': objective.Setting(
        1e-3, fields.positive_float(),
        'Base learning rate (before schedule and warm-up). Number > 0.'),
    'schedule': objective.Setting(
        'constant', fields.one_of(SCHEDULES),
        'constant; cosine (half cosine to 0 over all steps); step (times '
        'decay_rate at each of decay_epochs).'),
    'decay_epochs': objective.Setting(
        '', fields.Field(str, _valid_epoch_list,
                         'comma-separated integer epochs >= 1, or ""'),
        'For schedule = step: 0-based epochs from which the rate is '
        'multiplied by decay_rate once more, e.g. "150,180,210" of 240 '
        'epochs (RepDistiller). Increasing, each < the stage\'s epochs.'),
    'decay_rate': objective.Setting(
        0.1, fields.Field(float, lambda v: 0 < v <= 1, 'a number in (0, 1]'),
        'For schedule = step: the factor applied at each decay epoch.'),
    'warmup_epochs': objective.Setting(
        0.0, fields.non_negative_float(),
        'Linear warm-up of the rate from 0 over this many epochs (may be '
        'fractional); 0 = none.'),
    'momentum': objective.Setting(
        0.9, _unit_interval(),
        'For sgd: momentum m (torch: buf = m * buf + g). In [0, 1).'),
    'nesterov': objective.Setting(
        False, fields.boolean(),
        'For sgd: Nesterov momentum (update g + m * buf); needs momentum > '
        '0.'),
    'weight_decay': objective.Setting(
        0.0, fields.non_negative_float(),
        'L2 weight decay on every parameter (batch norm and biases too), '
        'coupled (added to the gradient) for sgd and adam, decoupled for '
        'adamw; 5e-4 in the CIFAR benchmark\'s SGD. Number >= 0.'),
    'b1': objective.Setting(
        0.9, _unit_interval(),
        'For adam, adamw: decay of the first moment (torch betas[0]).'),
    'b2': objective.Setting(
        0.999, _unit_interval(),
        'For adam, adamw: decay of the second moment (torch betas[1]).'),
    'eps': objective.Setting(
        1e-8, fields.positive_float(),
        'For adam, adamw: added to the bias-corrected root of the second '
        'moment, as in torch.'),
}


def default_section(**overrides) -> ml_collections.ConfigDict:
  """An optimiser section with every setting at its default, `overrides`
  applied (unknown names are a ValueError)."""
  return objective.settings_section(SETTINGS, 'the optimizer section',
                                    **overrides)


def problems(section: Mapping[str, Any], prefix: str, *,
             epochs: int | None = None) -> list[str]:
  """Rules between the fields of a valid optimiser section.

  Args:
    section: the section, each field already valid on its own.
    prefix: its dotted name, e.g. `'student.optimizer'`; messages name
      fields as `config.<prefix>.<field>`.
    epochs: the stage's number of epochs, if known: step decays and the
      warm-up must fall within training.

  Returns:
    One message per problem (empty if none).
  """
  def name(field: str) -> str:
    return f'config.{prefix}.{field}'

  found = []
  if section['schedule'] == 'step':
    decays = _epoch_list(section['decay_epochs'])
    if not decays:
      found.append(f"{name('decay_epochs')} = '': schedule = 'step' needs "
                   'at least one decay epoch, e.g. "150,180,210"')
    elif any(a >= b for a, b in zip(decays, decays[1:])):
      found.append(f"{name('decay_epochs')} = {section['decay_epochs']!r}: "
                   'expected strictly increasing epochs')
    elif epochs is not None and decays[-1] >= epochs:
      found.append(f"{name('decay_epochs')} = {section['decay_epochs']!r}: "
                   f'epoch {decays[-1]} is not before the end of training '
                   f'({epochs} epochs, 0-based 0..{epochs - 1}); expected '
                   f'decay epochs in [1, {epochs - 1}]')
  if section['nesterov'] and section['name'] != 'sgd':
    found.append(f"{name('nesterov')} = True with {name('name')} = "
                 f"{section['name']!r}: Nesterov momentum is for sgd only")
  elif section['nesterov'] and section['momentum'] <= 0:
    found.append(f"{name('nesterov')} = True with {name('momentum')} = "
                 f"{section['momentum']}: Nesterov needs momentum > 0 (as "
                 'torch.optim.SGD)')
  if epochs is not None and section['warmup_epochs'] > epochs:
    found.append(f"{name('warmup_epochs')} = {section['warmup_epochs']}: "
                 f'longer than training ({epochs} epochs)')
  return found


def _step_decay(learning_rate: float, decay_rate: float,
                boundaries: tuple[int, ...]) -> optax.Schedule:
  """`learning_rate * decay_rate ** (number of boundaries <= t)`, the
  values computed in float64 once and rounded to float32 once; `t` of any
  shape."""
  values = jnp.asarray([learning_rate * decay_rate**n
                        for n in range(len(boundaries) + 1)], jnp.float32)
  edges = jnp.asarray(boundaries, jnp.int32)

  def rate_at(count):
    return values[jnp.sum(jnp.asarray(count)[..., None] >= edges, axis=-1)]
  return rate_at


def _warmup_steps(section: Mapping[str, Any], steps_per_epoch: int) -> int:
  """Steps of the linear warm-up: 0 for none, else at least 1."""
  if not section['warmup_epochs']:
    return 0
  return max(1, round(section['warmup_epochs'] * steps_per_epoch))


def schedule(section: Mapping[str, Any], *, steps_per_epoch: int,
             epochs: int) -> optax.ScalarOrSchedule:
  """The learning rate of an optimiser section, by step.

  Args:
    section: an optimiser section (see `SETTINGS`).
    steps_per_epoch: updates per epoch (`batching.num_train_batches`).
    epochs: the stage's epochs.

  Returns:
    A float for a constant rate without warm-up (as
    `train.learning_rate_schedule`, so `optax.adam`'s state keeps its tree),
    else `t -> lr(t)`: `t` integer step counts (any shape, may be traced)
    to float32 rates of the same shape.
  """
  base = section['learning_rate']
  kind = section['schedule']
  if kind == 'constant':
    main = base
  elif kind == 'cosine':
    main = optax.cosine_decay_schedule(base, max(epochs * steps_per_epoch, 1))
  elif kind == 'step':
    main = _step_decay(base, section['decay_rate'], tuple(
        e * steps_per_epoch for e in _epoch_list(section['decay_epochs'])))
  else:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {kind!r}')
  warmup = _warmup_steps(section, steps_per_epoch)
  if not warmup:
    return main

  def warmed_up(count):
    ramp = jnp.minimum(1.0, jnp.asarray(count, jnp.float32) / warmup)
    return ramp * (main(count) if callable(main) else main)
  return warmed_up


def learning_rate_at(section: Mapping[str, Any], step: int | jax.Array, *,
                     steps_per_epoch: int, epochs: int) -> jax.Array:
  """The learning rate of update number `step` (0-based, any shape, may be
  traced), float32 of `step`'s shape: what `make_optimizer`'s transformation
  multiplies by."""
  rate = schedule(section, steps_per_epoch=steps_per_epoch, epochs=epochs)
  if callable(rate):
    return jnp.asarray(rate(step), jnp.float32)
  return jnp.full(jnp.shape(step), rate, jnp.float32)


def make_optimizer(section: Mapping[str, Any], *, steps_per_epoch: int,
                   epochs: int) -> optax.GradientTransformation:
  """The optax transformation of an optimiser section.

  Args:
    section: an optimiser section (see `SETTINGS`; a ConfigDict or dict),
      valid field by field and by `problems`.
    steps_per_epoch: updates per epoch.
    epochs: the stage's epochs.

  Returns:
    `sgd`: `chain(add_decayed_weights(wd), trace(momentum, nesterov),
    scale_by_learning_rate(lr))`; `adam`: `optax.adam`, after
    `add_decayed_weights(wd)` if `wd > 0`; `adamw`: `optax.adamw`. Updates
    are applied with `optax.apply_updates` (`TrainState.apply_gradients`).
    Equal arguments give the same object, so that a step compiled for one
    run's train state is reused by the next run in the process (a sweep's
    seeds): jit tells states apart by their optimizer.
  """
  return _optimizer(tuple(sorted((key, _hashable(value))
                                 for key, value in dict(section).items())),
                    steps_per_epoch, epochs)


def _hashable(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=64)
def _optimizer(settings: tuple[tuple[str, Any], ...], steps_per_epoch: int,
               epochs: int) -> optax.GradientTransformation:
  section = dict(settings)
  rate = schedule(section, steps_per_epoch=steps_per_epoch, epochs=epochs)
  name, decay = section['name'], section['weight_decay']
  if name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(decay),
        optax.trace(decay=section['momentum'], nesterov=section['nesterov']),
        optax.scale_by_learning_rate(rate))
  adam_args = dict(b1=section['b1'], b2=section['b2'], eps=section['eps'])
  if name == 'adamw':
    return optax.adamw(rate, weight_decay=decay, **adam_args)
  if name == 'adam':
    adam = optax.adam(rate, **adam_args)
    if not decay:  # Exactly optax.adam: the seed protocol's state tree.
      return adam
    return optax.chain(optax.add_decayed_weights(decay), adam)
  raise ValueError(f'optimizer name must be one of {NAMES}, got {name!r}')


def training_only(tx: optax.GradientTransformation, trains: str
                  ) -> optax.GradientTransformation:
  """`tx` on part of a stage's trainable tree (`train.TrainState.trainable`:
  `{'model': params, 'modules': ...}`), and zero updates elsewhere (no
  weight decay either), for a preparation stage (`objective.Preparation`).

  Args:
    tx: the optimizer of the trained part.
    trains: `'features'`: everything but the model's classifier (its
      top-level `kd_jax.models.CLASSIFIER` parameters) is trained;
      `'modules'`: only the objective's modules are.

  Raises:
    ValueError: `trains` is neither, or (when the state is built) a model
      without a classifier is to keep it.
  """
  if trains not in objective.TRAINS:
    raise ValueError(f'trains must be one of {objective.TRAINS}, got '
                     f'{trains!r}')

  def labels(trainable: Mapping[str, Any]) -> dict[str, Any]:
    model = trainable['model']
    if trains == 'modules':
      frozen = set(model)
    elif models.CLASSIFIER in model:
      frozen = {models.CLASSIFIER}
    else:
      raise ValueError(f'the model has no classifier {models.CLASSIFIER!r} '
                       f'to leave out of training (it has {sorted(model)})')
    return {
        'model': {name: jax.tree.map(
            lambda _, f=name in frozen: 'frozen' if f else 'trained', tree)
                  for name, tree in model.items()},
        **({'modules': jax.tree.map(lambda _: 'trained',
                                    trainable['modules'])}
           if 'modules' in trainable else {})}

  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()},
                               labels)
