"""Train state, the pure steps (supervised, distillation, evaluation) and loops.

Every step has one shape, `step(state, batch, ...) -> (state, metrics)`, and is
pure: configuration is bound with `functools.partial`, randomness comes from
`jax.random.fold_in(state.rng, state.step)`, and the caller jits it with the old
state donated (`make_*_step` do this; see `state_donation` for why not on CPU). Metrics are batch means plus `'count'`,
the number of (unpadded) examples they average over, so that `accumulate` can
sum them on device and `summarize` reads them once per logging interval.

A batch is a dict: `'image'` `(B, H, W, C)` float32, `'label'` `(B,)` int32,
optionally `'mask'` `(B,)` float32 (1 for real examples, 0 for padding) and, for
distillation from precomputed teacher outputs, `'teacher_logits'` `(B, K)`.
"""

from collections.abc import Callable, Mapping
import dataclasses
import functools
import math
import time
from typing import Any

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import data as data_lib
from kd_jax import logs
from kd_jax import losses
from kd_jax import models
from kd_jax import parallel
from kd_jax import streaming

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[Any, Batch], tuple[Any, Metrics]]


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, optimizer) plus a base PRNG key and
  batch-norm statistics.

  The key never changes; each step derives its own from `fold_in(rng, step)`,
  so randomness is a function of (seed, step) alone. `batch_stats` is `{}`
  for models without batch norm.
  """
  rng: jax.Array
  batch_stats: Any = None


def model_variables(state: TrainState, params=None) -> dict[str, Any]:
  """The Flax variables of `state`'s model: params (or `params`) and, for
  batch-norm models, their running statistics.

  A FitNets regressor trained alongside the model (see `add_regressor`) is
  not part of the model and is left out.
  """
  params = state.params if params is None else params
  variables = {'params': model_params(params)}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """`params` without the FitNets regressor's entry (`models.REGRESSOR_KEY`)."""
  return {k: v for k, v in params.items() if k != models.REGRESSOR_KEY}


def add_regressor(state: TrainState, regressor_params) -> TrainState:
  """`state` whose params also hold `regressor_params`, trained with them.

  The regressor's parameters live under `models.REGRESSOR_KEY` of
  `state.params`, so the optimizer, checkpoints and resumption treat them
  like the model's own; `model_variables` leaves them out of the model.
  The optimizer state is re-initialised, so call this on a fresh state.
  """
  params = {**state.params, models.REGRESSOR_KEY: regressor_params}
  return state.replace(params=params, opt_state=state.tx.init(params))


SCHEDULES = ('constant', 'cosine')


def learning_rate_schedule(learning_rate: float, schedule: str,
                           total_steps: int) -> optax.ScalarOrSchedule:
  """Adam's step size: `learning_rate` throughout (`'constant'`), or decayed
  from it to 0 along a half cosine over `total_steps` steps (`'cosine'`)."""
  if schedule == 'constant':
    return learning_rate
  if schedule == 'cosine':
    return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
  raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')


PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _cast_floats(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def compute_in(apply_fn: Callable[..., Any], precision: str
               ) -> Callable[..., Any]:
  """`apply_fn` computing in `precision`, its outputs back in float32.

  Mixed precision without touching the model: for `'bfloat16'` the float
  parameters and inputs are cast to bfloat16 for the forward pass, while the
  master parameters, optimizer state, batch-norm statistics, and every loss
  and its reductions stay float32 (logits, captured features and updated
  statistics come back as float32). `'float32'` returns `apply_fn` itself.
  """
  if precision == 'float32':
    return apply_fn
  dtype = PRECISIONS[precision]

  def apply(variables, x, **kwargs):
    variables = {**variables,
                 'params': _cast_floats(variables['params'], dtype)}
    return _cast_floats(apply_fn(variables, _cast_floats(x, dtype), **kwargs),
                        jnp.float32)
  return apply


def create_train_state(model: nn.Module, rng: jax.Array,
                       image_shape: tuple[int, ...],
                       learning_rate: optax.ScalarOrSchedule,
                       precision: str = 'float32') -> TrainState:
  """A fresh state for `model` trained with Adam at `learning_rate`.

  Args:
    model: maps `(B, *image_shape)` images to `(B, K)` logits.
    rng: PRNG key; split into the parameter init key and the dropout base key.
    image_shape: `(H, W, C)` of one image.
    learning_rate: Adam's step size, or a schedule of it (see
      `learning_rate_schedule`).
    precision: `'float32'`, or `'bfloat16'` compute with float32 parameters
      (see `compute_in`).
  """
  init_rng, step_rng = jax.random.split(rng)
  variables = models.init_variables(model, init_rng, image_shape)
  return TrainState.create(
      apply_fn=compute_in(model.apply, precision),
      params=variables['params'],
      tx=optax.adam(learning_rate),
      rng=step_rng,
      batch_stats=variables.get('batch_stats', {}))


def _batch_weights(batch: Batch) -> jax.Array:
  """`(B,)` float32 weights: the batch's mask, or ones."""
  if 'mask' in batch:
    return batch['mask'].astype(jnp.float32)
  return jnp.ones(batch['label'].shape[0], jnp.float32)


def _accuracy(logits: jax.Array, labels: jax.Array,
              weights: jax.Array) -> jax.Array:
  """Weighted fraction of rows whose arg-max of `(B, K)` logits equals `(B,)` labels."""
  return losses.weighted_mean(
      (jnp.argmax(logits, -1) == labels).astype(jnp.float32), weights)


def _student_forward(state: TrainState, params, images: jax.Array,
                     layers: tuple[str, ...] = ()
                     ) -> tuple[jax.Array, list[jax.Array], Any]:
  """Training-mode logits `(B, K)`, the outputs of `layers` (see
  `forward_with_features`) and the updated batch-norm statistics.

  Dropout is keyed by (state.rng, state.step); models without batch norm
  return `state.batch_stats` unchanged.
  """
  rngs = {'dropout': jax.random.fold_in(state.rng, state.step)}
  variables = model_variables(state, params)
  if layers:
    logits, features, batch_stats = forward_with_features(
        state.apply_fn, variables, images, layers, train=True, rngs=rngs)
    return logits, features, (state.batch_stats if batch_stats is None
                              else batch_stats)
  if not state.batch_stats:
    return (state.apply_fn(variables, images, train=True, rngs=rngs), [],
            state.batch_stats)
  logits, updates = state.apply_fn(variables, images, train=True, rngs=rngs,
                                   mutable=['batch_stats'])
  return logits, [], updates['batch_stats']


def _capture(layers: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
  """A `capture_intermediates` filter: the outputs of the submodules whose
  scope path (e.g. `'conv2'`, `'BasicBlock_3'`) is in `layers`."""
  return lambda module, method: (
      method == '__call__' and '/'.join(module.scope.path) in layers)


def find_feature(intermediates: Mapping[str, Any], layer: str) -> jax.Array:
  """One layer's output from a Flax `'intermediates'` collection.

  `layer` is a submodule's scope path (captured with `capture_intermediates`)
  or a name the model sows (`self.sow('intermediates', name, x)`), e.g.
  `'stage3'` or `'embedding'` of the ResNets.
  """
  node = intermediates
  for part in layer.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f'no intermediate feature {layer!r}; found '
                       f'{sorted(intermediates)}')
    node = node[part]
  if isinstance(node, Mapping):
    node = node['__call__']
  return node[0]


def forward_with_features(apply_fn: Callable[..., Any], variables,
                          images: jax.Array, layers: tuple[str, ...], *,
                          train: bool, rngs=None
                          ) -> tuple[jax.Array, list[jax.Array], Any]:
  """Logits `(B, K)`, the outputs of `layers` and updated batch statistics.

  Returns:
    `(logits, [feature per layer], new batch_stats or None)`; features come
    from `capture_intermediates` or the model's own `sow` calls.
  """
  mutable = ['intermediates']
  if train and 'batch_stats' in variables:
    mutable.append('batch_stats')
  logits, collections = apply_fn(
      variables, images, train=train, rngs=rngs or {},
      capture_intermediates=_capture(layers), mutable=mutable)
  features = [find_feature(collections.get('intermediates', {}), layer)
              for layer in layers]
  return logits, features, collections.get('batch_stats')


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
  """One supervised step: cross-entropy with the batch's hard labels.

  Args:
    state: the model being trained.
    batch: `'image'` `(B, H, W, C)`, `'label'` `(B,)`, optional `'mask'` `(B,)`.

  Returns:
    The updated state and scalar metrics `loss`, `accuracy`, `grad_norm`,
    `count`.
  """
  weights = _batch_weights(batch)

  def loss_fn(params):
    logits, _, batch_stats = _student_forward(state, params, batch['image'])
    loss = losses.hard_label_loss(logits, batch['label'], weights=weights)
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'accuracy': _accuracy(logits, batch['label'], weights),
      'grad_norm': optax.tree.norm(grads),
      'count': jnp.sum(weights),
  }
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def teacher_logits_for(batch: Batch, teacher_variables,
                       teacher_apply_fn: Callable[..., jax.Array] | None
                       ) -> jax.Array:
  """The frozen teacher's `(B, K)` logits for `batch`, without gradient.

  Uses `batch['teacher_logits']` when the batch carries precomputed logits;
  otherwise runs the teacher in inference mode on `batch['image']`.
  """
  if 'teacher_logits' in batch:
    logits = batch['teacher_logits']
  else:
    if teacher_apply_fn is None:
      raise ValueError('distill_step needs teacher_apply_fn when the batch has '
                       'no precomputed "teacher_logits"')
    logits = teacher_apply_fn(teacher_variables, batch['image'], train=False)
  return jax.lax.stop_gradient(logits)


def ensemble_prediction(teacher_logits: jax.Array) -> jax.Array:
  """`(B,)` predicted classes of `(B, K)` logits, or of the mean softmax of
  `(B, M, K)` logits of M teachers."""
  if teacher_logits.ndim == 3:
    return jnp.argmax(jnp.mean(jax.nn.softmax(teacher_logits), axis=1), -1)
  return jnp.argmax(teacher_logits, -1)


def distill_step(state: TrainState, batch: Batch, teacher_variables=None, *,
                 teacher_apply_fn: Callable[..., jax.Array] | None = None,
                 alpha: float | None = None,
                 temperature: float | None = None, t2_scaling: bool = True,
                 form: str = 'kl',
                 objective: Callable[..., tuple[jax.Array, Metrics]] | None
                 = None,
                 feature_loss: Callable[..., tuple[jax.Array, Metrics]] | None
                 = None, student_layers: tuple[str, ...] = (),
                 teacher_layers: tuple[str, ...] = (),
                 feature_weight: float = 1.0,
                 regressor_apply_fn: Callable[..., list[jax.Array]] | None
                 = None) -> tuple[TrainState, Metrics]:
  """One distillation step of the student in `state` from a frozen teacher.

  Only `state.params` are differentiated; the teacher's logits are under
  `jax.lax.stop_gradient`, so no gradient ever reaches the teacher.

  Args:
    state: the student being trained.
    batch: `'image'` `(B, H, W, C)`, `'label'` `(B,)`, optional `'mask'` `(B,)`
      and optional precomputed `'teacher_logits'` `(B, K)`, or `(B, M, K)`
      for M teachers (with an objective that takes them).
    teacher_variables: the teacher's Flax variables (`{'params': ...}` and,
      with batch norm, `'batch_stats'`, used in inference mode), used when
      the batch has no `'teacher_logits'`.
    teacher_apply_fn: the teacher module's `apply`.
    alpha: weight of the hard-label loss; `1 - alpha` weighs distillation.
    temperature: softmax temperature `T` of the distillation term.
    t2_scaling: multiply the distillation term by `T**2` (Hinton et al.).
    form: distillation term, a key of `losses.DISTILLATION_FORMS`.
    objective: instead of Hinton's KD with the four settings above, any
      `(student_logits, teacher_logits, labels, *, weights) -> (loss, aux)`,
      e.g. a `kd_jax.methods.LOGIT_METHODS` entry with its settings bound.
    feature_loss: optional `(student_features, teacher_features, *, weights)
      -> (loss, aux)` over the outputs of `student_layers` and
      `teacher_layers` (lists, one array per layer), added to the objective
      times `feature_weight` (e.g. `kd_jax.methods.FEATURE_METHODS`). Needs
      the teacher run inside the step (no precomputed logits).
    student_layers: layer names (scope paths or sown names) of the student.
    teacher_layers: the matching layers of the teacher.
    feature_weight: weight of the feature loss.
    regressor_apply_fn: FitNets: `apply` of a `models.HintRegressor`, mapping
      the student's features to the teacher's shapes before `feature_loss`;
      its parameters are `state.params[models.REGRESSOR_KEY]` (see
      `add_regressor`) and train with the student's.

  Returns:
    The updated state and scalar metrics: `loss` (total), `student_loss`
    (hard), `distillation_loss` (soft) and any other terms the objective
    reports, `accuracy`, `teacher_accuracy`, `agreement` (student and teacher
    arg-max equal), `grad_norm`, `count`.
  """
  if objective is None:
    if alpha is None or temperature is None:
      raise ValueError('distill_step needs alpha and temperature, or an '
                       'objective')
    objective = functools.partial(losses.kd_loss, alpha=alpha,
                                  temperature=temperature,
                                  t2_scaling=t2_scaling, form=form)
  weights = _batch_weights(batch)
  if feature_loss is None:
    teacher_logits = teacher_logits_for(batch, teacher_variables,
                                        teacher_apply_fn)
  else:
    if 'teacher_logits' in batch or teacher_apply_fn is None:
      raise ValueError('a feature loss needs the teacher run inside the step '
                       '(teacher_apply_fn, no precomputed teacher_logits)')
    teacher_logits, teacher_features, _ = forward_with_features(
        teacher_apply_fn, teacher_variables, batch['image'], teacher_layers,
        train=False)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    teacher_features = jax.lax.stop_gradient(teacher_features)

  def loss_fn(params):
    logits, features, batch_stats = _student_forward(
        state, params, batch['image'],
        student_layers if feature_loss is not None else ())
    loss, aux = objective(logits, teacher_logits, batch['label'],
                          weights=weights)
    if regressor_apply_fn is not None:
      features = regressor_apply_fn(
          {'params': params[models.REGRESSOR_KEY]}, features)
    if feature_loss is not None:
      feature_value, feature_aux = feature_loss(features, teacher_features,
                                                weights=weights)
      loss = loss + feature_weight * feature_value
      aux = {**aux, **feature_aux, 'feature_loss': feature_value}
    return loss, (aux, logits, batch_stats)

  (loss, (aux, logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  teacher_prediction = ensemble_prediction(teacher_logits)
  metrics = {
      **aux,
      'loss': loss,
      'accuracy': _accuracy(logits, batch['label'], weights),
      'teacher_accuracy': losses.weighted_mean(
          (teacher_prediction == batch['label']).astype(jnp.float32),
          weights),
      'agreement': _accuracy(logits, teacher_prediction, weights),
      'grad_norm': optax.tree.norm(grads),
      'count': jnp.sum(weights),
  }
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(state: TrainState, batch: Batch) -> Metrics:
  """Inference-mode metrics of `state`'s model on one (possibly padded) batch.

  Args:
    state: the model to evaluate.
    batch: `'image'` `(B, H, W, C)`, `'label'` `(B,)`, optional `'mask'` `(B,)`;
      padded rows (mask 0) count for nothing.

  Returns:
    Scalar `loss` (cross-entropy), `accuracy` and `count` (real examples).
  """
  weights = _batch_weights(batch)
  logits = state.apply_fn(model_variables(state), batch['image'], train=False)
  return {
      'loss': losses.hard_label_loss(logits, batch['label'], weights=weights),
      'accuracy': _accuracy(logits, batch['label'], weights),
      'count': jnp.sum(weights),
  }


def _weighted(metrics: Metrics) -> Metrics:
  """Batch means times `'count'`, so that sums over batches stay exact."""
  count = metrics['count']
  return {k: v if k == 'count' else v * count for k, v in metrics.items()}


def _add_totals(totals: Metrics | None, more: Metrics) -> Metrics:
  """Running sums plus `more` (`more` itself when there are none yet)."""
  return more if totals is None else jax.tree_util.tree_map(jnp.add, totals,
                                                            more)


@jax.jit
def accumulate(totals: Metrics | None, metrics: Metrics) -> Metrics:
  """Adds one step's metrics, weighted by their `'count'`, to running sums."""
  return _add_totals(totals, _weighted(metrics))


def summarize(totals: Metrics) -> dict[str, float]:
  """Reads accumulated sums to the host (one sync) as count-weighted means."""
  host = jax.device_get(totals)
  count = float(host['count'])
  summary = {k: float(v) / max(count, 1.0) for k, v in host.items()
             if k != 'count'}
  summary['count'] = count
  return summary


def state_donation() -> tuple[int, ...]:
  """`donate_argnums` for a step whose first argument is the train state.

  Donated on GPU/TPU, where it saves a copy of parameters and optimizer
  state. Not on CPU: there XLA's in-place update of donated buffers made
  steps slower (seed teacher 35 vs 24 ms, student in chunks 3.1 vs 2.1 ms
  here), and the copy costs nothing that matters.
  """
  return () if jax.default_backend() == 'cpu' else (0,)


def make_train_step() -> StepFn:
  """`train_step`, jitted (state donated except on CPU)."""
  return jax.jit(train_step, donate_argnums=state_donation())


def distill_step_with(teacher_apply_fn: Callable[..., jax.Array] | None,
                      **settings) -> Callable[..., tuple[TrainState, Metrics]]:
  """`distill_step` with its settings bound (pure, not jitted).

  `settings` are `distill_step`'s keywords: `alpha`, `temperature`,
  `t2_scaling`, `form`, or an `objective`. The result is called as
  `step(state, batch, teacher_variables)`, or as `step(state, batch)` for
  batches that carry `'teacher_logits'`.
  """
  return functools.partial(distill_step, teacher_apply_fn=teacher_apply_fn,
                           **settings)


def make_distill_step(teacher_apply_fn: Callable[..., jax.Array] | None,
                      **settings) -> Callable[..., tuple[TrainState, Metrics]]:
  """`distill_step_with(...)`, jitted (state donated except on CPU)."""
  return jax.jit(distill_step_with(teacher_apply_fn, **settings),
                 donate_argnums=state_donation())


def first_nonfinite(first_bad: jax.Array, metrics: Metrics,
                    step_number: jax.Array) -> jax.Array:
  """`step_number` if this step's loss or gradient norm is not finite and no
  earlier one was (`first_bad` is -1), else `first_bad` (int32 scalars)."""
  finite = jnp.isfinite(metrics['loss'])
  if 'grad_norm' in metrics:
    finite &= jnp.isfinite(metrics['grad_norm'])
  return jnp.where((first_bad < 0) & ~finite,
                   step_number.astype(jnp.int32), first_bad)


def scan_steps(step: Callable[..., tuple[Any, Metrics]], state,
               arrays: Mapping[str, jax.Array], batch_indices: jax.Array,
               *step_args, unroll: bool = False,
               batch_sharding: jax.sharding.Sharding | None = None
               ) -> tuple[Any, Metrics]:
  """Runs `step` on K batches gathered on device, as one `lax.scan`.

  With `unroll=True` the K steps become straight-line code. XLA:CPU runs
  convolutions inside a loop body an order of magnitude slower than outside
  one (jax-ml/jax#12868; here the seed teacher's step took 516 ms in a rolled
  scan against 23 ms unrolled), so on CPU keep K small and unroll; on GPU/TPU
  a rolled scan over a whole epoch compiles once and runs well.

  Args:
    step: pure `(state, batch, *step_args) -> (state, metrics)`.
    state: the state before the first step.
    arrays: per-example arrays with N rows on device, e.g. `'image'`
      `(N, H, W, C)`, `'label'` `(N,)`, optionally `'teacher_logits'`
      `(N, K)`.
    batch_indices: `(K, B)` int32; batch k is `arrays[...][batch_indices[k]]`.
    *step_args: passed to every `step` call (e.g. teacher variables).
    unroll: unroll the K steps completely instead of looping.
    batch_sharding: data parallelism: each gathered batch is constrained to
      this sharding (`parallel.batch_sharded`), so every device computes on
      its slice of the batch and gradients are all-reduced.

  Returns:
    The state after K steps, the count-weighted sums of their metrics (read
    them with `summarize`), and the index (`state.step` before the update) of
    the first step whose loss or gradient norm was not finite, or -1.
  """
  def gather(indices):
    batch = {key: jnp.take(array, indices, axis=0)
             for key, array in arrays.items()}
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch

  def body(carry, indices):
    state, totals, first_bad = carry
    step_number = state.step
    state, metrics = step(state, gather(indices), *step_args)
    first_bad = first_nonfinite(first_bad, metrics, step_number)
    return (state, _add_totals(totals, _weighted(metrics)), first_bad), None

  metric_shapes = jax.eval_shape(step, state, gather(batch_indices[0]),
                                 *step_args)[1]
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 metric_shapes)
  (state, totals, first_bad), _ = jax.lax.scan(
      body, (state, zeros, jnp.int32(-1)), batch_indices, unroll=unroll)
  return state, totals, first_bad


def make_scan_steps(step: Callable[..., tuple[Any, Metrics]], *,
                    unroll: bool = False,
                    batch_sharding: jax.sharding.Sharding | None = None):
  """`scan_steps` for `step`, jitted (state donated except on CPU).

  Called as `run(state, arrays, batch_indices, *step_args)`.
  """
  return jax.jit(functools.partial(scan_steps, step, unroll=unroll,
                                   batch_sharding=batch_sharding),
                 donate_argnums=state_donation())


_eval_step = jax.jit(eval_step)


def _sharded_eval_batches(split: data_lib.Split, batch_size: int,
                          mesh: jax.sharding.Mesh | None):
  """`(host batch, device batch)` pairs of `data.eval_batches`; with a mesh
  of several devices the device batch is split over it, each process
  feeding its rows."""
  if mesh is None or mesh.size == 1:
    for batch in data_lib.eval_batches(split, batch_size):
      yield batch, batch
    return
  parallel.check_batch_size(batch_size, mesh, 'the evaluation batch size')
  sharding, rows = parallel.batch_sharded(mesh), parallel.local_rows(batch_size)
  for batch in data_lib.eval_batches(split, batch_size):
    yield batch, parallel.global_batch(
        {key: value[rows] for key, value in batch.items()}, sharding)


def evaluate(state: TrainState, split: data_lib.Split, batch_size: int,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Loss and accuracy over every example of `split`, each counted once.

  With a `mesh` of several devices, `state` is replicated on it (a no-op for
  `fit`'s state) and every batch is split over its devices (`batch_size`
  divisible by their number).
  """
  if mesh is not None and mesh.size > 1:
    state = jax.device_put(state, parallel.replicated(mesh))
  totals = None
  for _, batch in _sharded_eval_batches(split, batch_size, mesh):
    totals = accumulate(totals, _eval_step(state, batch))
  return summarize(totals)


def predict_logits(apply_fn: Callable[..., jax.Array], variables,
                   split: data_lib.Split, batch_size: int,
                   desc: str = 'logits',
                   mesh: jax.sharding.Mesh | None = None) -> jax.Array:
  """Inference-mode logits `(N, K)` for every example of `split`, on device.

  Used to cache a frozen teacher's outputs once instead of recomputing them
  in every distillation step, and for calibration. `desc` names the
  progress bar (drawn on terminals only). With a `mesh` of several devices
  each batch is split over them (`batch_size` divisible by their number)
  and the logits come back replicated on the mesh, readable in every
  process.
  """
  forward = jax.jit(lambda v, x: apply_fn(v, x, train=False))
  sharded = mesh is not None and mesh.size > 1
  if sharded:
    variables = jax.device_put(variables, parallel.replicated(mesh))
  chunks = []
  bar = logs.progress(data_lib.num_eval_batches(split.num_examples,
                                                batch_size), desc,
                      unit='batch')
  for batch, device_batch in _sharded_eval_batches(split, batch_size, mesh):
    logits = forward(variables, device_batch['image'])
    real = int(batch['mask'].sum())
    chunks.append(logits if real == batch_size or sharded else logits[:real])
    if not bar.disable:
      jax.block_until_ready(logits)
    bar.update()
  bar.close()
  if sharded:  # Drop the padding inside one compiled gather to every device.
    return jax.jit(lambda parts: jnp.concatenate(parts)[:split.num_examples],
                   out_shardings=parallel.replicated(mesh))(chunks)
  return jnp.concatenate(chunks)


def check_finite(summary: Mapping[str, float], *, stage: str,
                 epoch: int) -> None:
  """Raises FloatingPointError if any epoch metric is NaN or infinite."""
  bad = sorted(k for k, v in summary.items() if not math.isfinite(v))
  if bad:
    raise FloatingPointError(
        f'stage {stage!r}, epoch {epoch + 1}: non-finite {", ".join(bad)} '
        f'({", ".join(f"{k}={summary[k]}" for k in bad)}); lower the learning '
        'rate or check the inputs')


EpochCallback = Callable[[str, int, dict[str, float], dict[str, float]], None]
LOOPS = ('scan', 'python')
PROGRESS_SECONDS = 30.0


def _chunks(start: int, stop: int, steps_per_chunk: int) -> list[slice]:
  """Slices [start, stop) into chunks whose ends are multiples of the chunk
  size (counted from 0), so that a run resumed at a chunk's end cuts the rest
  of the epoch exactly as the uninterrupted run did."""
  size = steps_per_chunk or stop
  bounds = sorted({start, stop, *range((start // size + 1) * size, stop, size)})
  return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class NonFiniteError(FloatingPointError):
  """A training step produced a NaN or infinite loss or gradient."""


@dataclasses.dataclass
class _Guard:
  """Remembers (on device) where a step first went non-finite; checks it on
  the host only when a checkpoint or the epoch's end needs to know."""
  stage: str
  steps_per_epoch: int
  last_good_step: int | None
  pending: list[jax.Array] = dataclasses.field(default_factory=list)

  def check(self) -> None:
    bad = [int(b) for b in jax.device_get(self.pending) if int(b) >= 0]
    self.pending.clear()
    if bad:
      epoch, batch = divmod(min(bad), self.steps_per_epoch)
      kept = ('no checkpoint of this stage was saved before it'
              if self.last_good_step is None else
              f'the last good checkpoint is at step {self.last_good_step}')
      raise NonFiniteError(
          f'stage {self.stage!r}: non-finite loss or gradient at training '
          f'step {min(bad) + 1} (epoch {epoch + 1}, batch {batch + 1}); '
          f'{kept}. Lower the learning rate or check the inputs.')


_first_nonfinite = jax.jit(first_nonfinite)


def fit(state: TrainState, step: Callable[..., tuple[TrainState, Metrics]],
        dataset: data_lib.Dataset, *, stage: str, epochs: int,
        batch_size: int, eval_batch_size: int, seed: int,
        step_args: tuple[Any, ...] = (),
        train_extras: Mapping[str, Any] | None = None,
        loop: str = 'scan', steps_per_chunk: int = 0,
        scan_unroll: bool = False,
        checkpoints: Any = None, checkpoint_every_steps: int = 0,
        resume_totals: Metrics | None = None,
        on_epoch_end: EpochCallback | None = None,
        mesh: jax.sharding.Mesh | None = None
        ) -> tuple[TrainState, dict[str, float]]:
  """Trains `state` with `step` up to `epochs` epochs, evaluating after each.

  Batch i of epoch e holds the examples `data.epoch_batch_indices(seed, e, N,
  batch_size)[i]`, whichever loop runs the steps, and step randomness comes
  from `state.step`, so training continues exactly from a restored state:
  `state.step` says which epoch and batch come next.

  Args:
    state: initial or restored state (donated on GPU/TPU; do not reuse it).
    step: pure `(state, batch, *step_args) -> (state, metrics)`, e.g.
      `train_step` or `distill_step_with(...)`; jitted here.
    dataset: `train` is trained on, `test` evaluated after every epoch.
      `train` may be a `streaming.StreamingSplit` (read batch by batch,
      never held in memory; needs `loop='python'`).
    stage: name used in logs and errors.
    epochs: number of passes over the training split.
    batch_size: training batch size (the remainder of each epoch is dropped).
    eval_batch_size: evaluation batch size (the last batch is padded).
    seed: seeds the data order.
    step_args: extra arguments of every step call (e.g. teacher variables).
    train_extras: more per-example arrays of the training split (N rows,
      e.g. cached `'teacher_logits'`), batched alongside images and labels.
    loop: `'scan'` puts the training split on device once and runs chunks of
      steps as one compiled `lax.scan` each; `'python'` calls a jitted step
      once per batch of host arrays.
    steps_per_chunk: steps per scan (0: the rest of the epoch). The running
      epoch metrics are logged as progress after a chunk at most every
      `PROGRESS_SECONDS`.
    scan_unroll: unroll each chunk into straight-line code (see
      `scan_steps`; the fast choice on CPU, with a small `steps_per_chunk`).
    checkpoints: a `checkpoints.StageCheckpoints` to save to, or None.
    checkpoint_every_steps: also save when a chunk (or step) ends past a
      multiple of this many steps; 0 = only at the end of each epoch.
    resume_totals: the restored metric sums of a part-done epoch.
    on_epoch_end: called as `(stage, epoch, train_metrics, test_metrics)`.
    mesh: data parallelism over this mesh's devices (`parallel.make_mesh`):
      state, step arguments and the training split replicated, each batch
      split along the mesh's data axis; `batch_size` stays the global batch.
      None (or a mesh of one device) runs on the default device.

  Returns:
    The trained state and the test metrics after the last epoch.

  Raises:
    NonFiniteError: a step's loss or gradient was NaN or infinite; raised at
      the next checkpoint or epoch end, before anything bad is saved.
  """
  if loop not in LOOPS:
    raise ValueError(f'loop must be one of {LOOPS}, got {loop!r}')
  streamed = isinstance(dataset.train, streaming.StreamingSplit)
  if streamed and loop != 'python':
    raise ValueError(f"a streamed training split needs loop='python', got "
                     f'{loop!r}')
  extras = dict(train_extras or {})
  num_examples = dataset.train.num_examples
  steps_per_epoch = data_lib.num_train_batches(num_examples, batch_size)
  first_epoch, offset = divmod(int(state.step), steps_per_epoch)
  guard = _Guard(stage, steps_per_epoch, int(state.step) or None)
  batch_sharding = None
  if mesh is not None and mesh.size > 1:
    parallel.check_batch_size(batch_size, mesh, 'config.batch_size')
    parallel.check_batch_size(eval_batch_size, mesh, 'config.eval_batch_size')
    batch_sharding = parallel.batch_sharded(mesh)
    state, step_args = jax.device_put((state, step_args),
                                      parallel.replicated(mesh))
  if loop == 'scan':
    run = make_scan_steps(step, unroll=scan_unroll,
                          batch_sharding=batch_sharding)
    arrays = {'image': dataset.train.images, 'label': dataset.train.labels,
              **extras}
    arrays = jax.device_put(arrays, None if batch_sharding is None
                            else parallel.replicated(mesh))
  else:
    jitted_step = jax.jit(step, donate_argnums=state_donation())
    host_extras = {k: np.asarray(v) for k, v in extras.items()}
    # Each process reads only the rows its devices train on.
    process, processes = ((0, 1) if batch_sharding is None else
                          (jax.process_index(), jax.process_count()))

  def save(state, totals):
    guard.check()
    if checkpoints is not None:
      checkpoints.save(state, totals)
      guard.last_good_step = int(state.step)

  def due(before: int, after: int) -> bool:
    return bool(checkpoint_every_steps) and (
        before // checkpoint_every_steps != after // checkpoint_every_steps)

  test_metrics = None
  for epoch in range(first_epoch, epochs):
    start = offset if epoch == first_epoch else 0
    totals = resume_totals if start else None
    indices = data_lib.epoch_batch_indices(seed, epoch, num_examples,
                                           batch_size)
    last_report = time.monotonic()
    bar = logs.progress(steps_per_epoch, f'{stage} epoch {epoch + 1}/{epochs}',
                        initial=start)
    if loop == 'scan':
      for chunk in _chunks(start, steps_per_epoch, steps_per_chunk):
        before = int(state.step)
        state, chunk_totals, first_bad = run(state, arrays, indices[chunk],
                                             *step_args)
        totals = _add_totals(totals, chunk_totals)
        guard.pending.append(first_bad)
        if not bar.disable:  # Show steps done, not steps dispatched.
          jax.block_until_ready(first_bad)
        bar.update(chunk.stop - chunk.start)
        if due(before, before + chunk.stop - chunk.start) and (
            chunk.stop < steps_per_epoch):
          save(state, totals)
        if time.monotonic() - last_report > PROGRESS_SECONDS:
          last_report = time.monotonic()
          logging.info('%s epoch %d/%d, step %d/%d: %s', stage, epoch + 1,
                       epochs, chunk.stop, steps_per_epoch,
                       _format(summarize(totals)))
    else:
      if streamed:
        batches = dataset.train.train_batches(
            batch_size, seed=seed, epoch=epoch, start_batch=start,
            process_index=process, process_count=processes,
            extras=host_extras)
      else:
        batches = data_lib.train_batches(
            dataset.train, batch_size, seed=seed, epoch=epoch,
            start_batch=start, extras=host_extras,
            rows=parallel.process_rows(batch_size, process, processes))
      first_bad = jnp.int32(-1)
      put = (jax.device_put if batch_sharding is None else
             functools.partial(parallel.global_batch, sharding=batch_sharding))
      for i, batch in enumerate(parallel.prefetch(batches, put), start=start):
        step_number = state.step
        state, metrics = jitted_step(state, batch, *step_args)
        totals = accumulate(totals, metrics)
        first_bad = _first_nonfinite(first_bad, metrics, step_number)
        if not bar.disable:
          jax.block_until_ready(first_bad)
        bar.update()
        global_step = epoch * steps_per_epoch + i
        if due(global_step, global_step + 1) and i + 1 < steps_per_epoch:
          guard.pending.append(first_bad)
          save(state, totals)
      guard.pending.append(first_bad)
    bar.close()
    guard.check()
    train_metrics = summarize(totals)
    check_finite(train_metrics, stage=stage, epoch=epoch)
    test_metrics = evaluate(state, dataset.test, eval_batch_size, mesh)
    logging.info('%s epoch %d/%d: train %s | test %s', stage, epoch + 1, epochs,
                 _format(train_metrics), _format(test_metrics))
    if on_epoch_end is not None:
      on_epoch_end(stage, epoch, train_metrics, test_metrics)
    save(state, totals)
  if test_metrics is None:  # Restored at the very end: nothing left to train.
    test_metrics = evaluate(state, dataset.test, eval_batch_size, mesh)
  return state, test_metrics


def _format(metrics: Mapping[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' for k, v in metrics.items() if k != 'count')
