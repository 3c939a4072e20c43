"""The training loop: epochs of compiled steps, evaluation, checkpoints.

`fit` runs a step function (`kd_jax.train`) over the training split, epoch
after epoch, from a fresh or restored state, and evaluates after each epoch.
Its one loop body takes chunks of steps from a source: with `loop='scan'`
the split sits on the device and a chunk is one compiled `lax.scan` over
gathered batches (`scan_steps`); with `loop='python'` (and for a streamed
split) a chunk is one jitted step on a batch read on the host and put on
the devices ahead of time. Both give the same batches in the same order, and
return the same per-chunk results: the new state, count-weighted metric
sums, and the first step whose loss or gradient was not finite.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import math
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import data as data_lib
from kd_jax import logs
from kd_jax import parallel
from kd_jax import streaming
from kd_jax import train

Metrics = train.Metrics
TrainState = train.TrainState


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
    first_bad = train.first_diverged(first_bad, metrics, step_number)
    return (state, train.add_totals(totals, train.weighted(metrics)), first_bad), None

  metric_shapes = jax.eval_shape(step, state, gather(batch_indices[0]),
                                 *step_args)[1]
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 metric_shapes)
  carry = (state, zeros, jnp.int32(-1))
  if unroll:
    # Straight-line code by hand: `lax.scan(unroll=True)` of one step is
    # still a loop (unroll factor 1 = rolled), with the slow body above.
    for k in range(batch_indices.shape[0]):
      carry, _ = body(carry, batch_indices[k])
  else:
    carry, _ = jax.lax.scan(body, carry, batch_indices)
  return carry


@functools.lru_cache(maxsize=32)
def make_scan_steps(step: Callable[..., tuple[Any, Metrics]], *,
                    unroll: bool = False,
                    batch_sharding: jax.sharding.Sharding | None = None):
  """`scan_steps` for `step`, jitted (state donated except on CPU).

  Called as `run(state, arrays, batch_indices, *step_args)`. The same
  arguments give the same jitted function, so a later stage or run in the
  process with the same step, state structure and shapes (e.g. the teacher
  of a sweep's next seed) reuses its compiled program.
  """
  return jax.jit(functools.partial(scan_steps, step, unroll=unroll,
                                   batch_sharding=batch_sharding),
                 donate_argnums=train.state_donation())


_eval_step = jax.jit(train.eval_step)


def _sharded_eval_batches(split: data_lib.Split, batch_size: int,
                          mesh: jax.sharding.Mesh | None):
  """`(host batch, device batch)` pairs of `data.eval_batches`; with a mesh
  of several devices the device batch is split over it, each process
  feeding its rows."""
  if mesh is None or mesh.size == 1:
    for batch in data_lib.eval_batches(split, batch_size):
      yield batch, jax.device_put(batch)
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
    totals = train.accumulate(totals, _eval_step(state, batch))
  return train.summarize(totals)


# One jitted forward per model (`apply_fn` is static: a model's `apply`
# compares equal across calls), so repeated predictions reuse its program.
@functools.partial(jax.jit, static_argnums=0)
def _inference_logits(apply_fn: Callable[..., jax.Array], variables,
                      images: jax.Array) -> jax.Array:
  return apply_fn(variables, images, train=False)


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
  forward = functools.partial(_inference_logits, apply_fn)
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
  learning_rate_field: str
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
          f'stage {self.stage!r} diverged: non-finite loss or gradient, or '
          f'a loss above {train.DIVERGED_LOSS:g}, at training step '
          f'{min(bad) + 1} (epoch {epoch + 1}, batch {batch + 1}); {kept}. '
          f'Lower {self.learning_rate_field} or check the inputs.')


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How `fit` runs a stage.

  Attributes:
    epochs: passes over the training split.
    batch_size: training batch size (the remainder of each epoch is
      dropped); with a mesh, the global batch.
    eval_batch_size: evaluation batch size (the last batch is padded).
    seed: seeds the data order.
    loop: `'scan'` puts the training split on device once and runs chunks of
      steps as one compiled `lax.scan` each; `'python'` calls a jitted step
      once per batch of host arrays (needed for a streamed split).
    steps_per_chunk: steps per scan (0: the rest of the epoch). The running
      epoch metrics are logged as progress after a chunk at most every
      `PROGRESS_SECONDS`.
    scan_unroll: unroll each chunk into straight-line code (see
      `scan_steps`; the fast choice on CPU, with a small `steps_per_chunk`).
    checkpoint_every_steps: also save when a chunk (or step) ends past a
      multiple of this many steps; 0 = only at the end of each epoch.
  """
  epochs: int
  batch_size: int
  eval_batch_size: int
  seed: int = 0
  loop: str = 'scan'
  steps_per_chunk: int = 0
  scan_unroll: bool = False
  checkpoint_every_steps: int = 0
  learning_rate_field: str = 'the learning rate'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, epochs: int,
                  role: str = 'student') -> 'LoopSettings':
    """The settings of an experiment config, for a stage of `epochs` that
    trains by `config.<role>` (a divergence names its learning rate)."""
    return cls(epochs=epochs, batch_size=config.batch_size,
               eval_batch_size=config.eval_batch_size, seed=config.seed,
               loop=config.loop, steps_per_chunk=config.steps_per_chunk,
               scan_unroll=config.scan_unroll,
               checkpoint_every_steps=config.checkpoint_every_steps,
               learning_rate_field=(
                   f'config.{role}.optimizer.learning_rate '
                   f'({config[role].optimizer.learning_rate:g})'))


def _one_step(step: Callable[..., tuple[Any, Metrics]], state, batch,
              *step_args) -> tuple[Any, Metrics, jax.Array]:
  """`step` on one batch, returning what a scan chunk returns: the state,
  the count-weighted metrics, and the step's index if it diverged (else
  -1)."""
  step_number = state.step
  state, metrics = step(state, batch, *step_args)
  return (state, train.weighted(metrics),
          train.first_diverged(jnp.int32(-1), metrics, step_number))


@functools.lru_cache(maxsize=32)
def _jitted_one_step(step: Callable[..., tuple[Any, Metrics]]):
  """`_one_step` for `step`, jitted; cached as `make_scan_steps` is."""
  return jax.jit(functools.partial(_one_step, step),
                 donate_argnums=train.state_donation())


def _with_data(run, data: tuple[Any, ...], state, *step_args):
  """`run(state, *data, *step_args)`: a chunk's data bound, the state not."""
  return run(state, *data, *step_args)


class _ScanSource:
  """Chunks of steps over the training split held on the device(s)."""

  def __init__(self, step, dataset: data_lib.Dataset,
               extras: Mapping[str, Any], settings: LoopSettings,
               batch_sharding, mesh):
    self._run = make_scan_steps(step, unroll=settings.scan_unroll,
                                batch_sharding=batch_sharding)
    arrays = {'image': dataset.train.images, 'label': dataset.train.labels,
              **extras}
    # The split and each chunk's batch indices: on the device, or on every
    # device of the mesh.
    self._sharding = (None if batch_sharding is None
                      else parallel.replicated(mesh))
    self._arrays = jax.device_put(arrays, self._sharding)
    self._settings = settings
    self._num_examples = dataset.train.num_examples

  def chunks(self, epoch: int, start: int, steps_per_epoch: int
             ) -> Iterator[tuple[int, Callable[..., Any]]]:
    """`(steps, run)` pairs, `run(state, *step_args)` running them."""
    s = self._settings
    indices = data_lib.epoch_batch_indices(s.seed, epoch, self._num_examples,
                                           s.batch_size)
    for chunk in _chunks(start, steps_per_epoch, s.steps_per_chunk):
      chunk_indices = jax.device_put(indices[chunk], self._sharding)
      yield chunk.stop - chunk.start, functools.partial(
          _with_data, self._run, (self._arrays, chunk_indices))


class _BatchSource:
  """Single steps over host batches (in memory or streamed), each put on the
  device(s) two steps ahead."""

  def __init__(self, step, dataset: data_lib.Dataset,
               extras: Mapping[str, Any], settings: LoopSettings,
               batch_sharding):
    self._run = _jitted_one_step(step)
    self._train = dataset.train
    self._extras = {k: np.asarray(v) for k, v in extras.items()}
    self._settings = settings
    # Each process reads only the rows its devices train on.
    self._process, self._processes = (
        (0, 1) if batch_sharding is None else
        (jax.process_index(), jax.process_count()))
    self._put = (jax.device_put if batch_sharding is None else
                 functools.partial(parallel.global_batch,
                                   sharding=batch_sharding))

  def chunks(self, epoch: int, start: int, steps_per_epoch: int
             ) -> Iterator[tuple[int, Callable[..., Any]]]:
    del steps_per_epoch
    s = self._settings
    if isinstance(self._train, streaming.StreamingSplit):
      batches = self._train.train_batches(
          s.batch_size, seed=s.seed, epoch=epoch, start_batch=start,
          process_index=self._process, process_count=self._processes,
          extras=self._extras)
    else:
      batches = data_lib.train_batches(
          self._train, s.batch_size, seed=s.seed, epoch=epoch,
          start_batch=start, extras=self._extras,
          rows=parallel.process_rows(s.batch_size, self._process,
                                     self._processes))
    for batch in parallel.prefetch(batches, self._put):
      yield 1, functools.partial(_with_data, self._run, (batch,))


def fit(state: TrainState, step: Callable[..., tuple[TrainState, Metrics]],
        dataset: data_lib.Dataset, settings: LoopSettings, *, stage: str,
        step_args: tuple[Any, ...] = (),
        train_extras: Mapping[str, Any] | None = None,
        checkpoints: Any = None, resume_totals: Metrics | None = None,
        on_epoch_end: EpochCallback | None = None,
        mesh: jax.sharding.Mesh | None = None
        ) -> tuple[TrainState, dict[str, float]]:
  """Trains `state` with `step` up to `settings.epochs`, evaluating after each.

  Batch i of epoch e holds the examples `data.epoch_batch_indices(seed, e, N,
  batch_size)[i]`, whichever loop runs the steps, and step randomness comes
  from `state.step`, so training continues exactly from a restored state:
  `state.step` says which epoch and batch come next.

  Args:
    state: initial or restored state (donated on GPU/TPU; do not reuse it).
    step: pure `(state, batch, *step_args) -> (state, metrics)`, e.g.
      `train.train_step`; jitted here.
    dataset: `train` is trained on, `test` evaluated after every epoch.
      `train` may be a `streaming.StreamingSplit` (read batch by batch,
      never held in memory; needs `loop='python'`).
    settings: epochs, batch sizes, seed, loop and checkpoint interval.
    stage: name used in logs and errors.
    step_args: extra arguments of every step call (e.g. teacher variables).
    train_extras: more per-example arrays of the training split (N rows,
      e.g. cached `'teacher_logits'`), batched alongside images and labels.
    checkpoints: a `checkpoints.StageCheckpoints` to save to, or None.
    resume_totals: the restored metric sums of a part-done epoch.
    on_epoch_end: called as `(stage, epoch, train_metrics, test_metrics)`.
    mesh: data parallelism over this mesh's devices (`parallel.make_mesh`):
      state, step arguments and the training split replicated, each batch
      split along the mesh's data axis; `batch_size` stays the global batch.
      None (or a mesh of one device) runs on the default device.

  Returns:
    The trained state and the test metrics after the last epoch.

  Raises:
    NonFiniteError: a step diverged (`train.first_diverged`: a NaN or
      infinite loss or gradient, or a loss above `train.DIVERGED_LOSS`);
      raised at the next checkpoint or epoch end, before anything bad is
      saved.
  """
  s = settings
  if s.loop not in LOOPS:
    raise ValueError(f'loop must be one of {LOOPS}, got {s.loop!r}')
  if isinstance(dataset.train, streaming.StreamingSplit) and s.loop != 'python':
    raise ValueError(f"a streamed training split needs loop='python', got "
                     f'{s.loop!r}')
  steps_per_epoch = data_lib.num_train_batches(dataset.train.num_examples,
                                               s.batch_size)
  first_epoch, offset = divmod(int(state.step), steps_per_epoch)
  guard = _Guard(stage, steps_per_epoch, int(state.step) or None,
                 s.learning_rate_field)
  batch_sharding = None
  if mesh is not None and mesh.size > 1:
    parallel.check_batch_size(s.batch_size, mesh, 'config.batch_size')
    parallel.check_batch_size(s.eval_batch_size, mesh,
                              'config.eval_batch_size')
    batch_sharding = parallel.batch_sharded(mesh)
    state, step_args = jax.device_put((state, step_args),
                                      parallel.replicated(mesh))
  extras = dict(train_extras or {})
  source = (_ScanSource(step, dataset, extras, s, batch_sharding, mesh)
            if s.loop == 'scan' else
            _BatchSource(step, dataset, extras, s, batch_sharding))

  def save(state, totals):
    guard.check()
    if checkpoints is not None:
      checkpoints.save(state, totals)
      guard.last_good_step = int(state.step)

  test_metrics = None
  for epoch in range(first_epoch, s.epochs):
    start = offset if epoch == first_epoch else 0
    totals = resume_totals if start else None
    done = start
    last_report = time.monotonic()
    bar = logs.progress(steps_per_epoch,
                        f'{stage} epoch {epoch + 1}/{s.epochs}', initial=start)
    for steps, run in source.chunks(epoch, start, steps_per_epoch):
      state, chunk_totals, first_bad = run(state, *step_args)
      totals = train.add_totals(totals, chunk_totals)
      guard.pending.append(first_bad)
      if not bar.disable:  # Show steps done, not steps dispatched.
        jax.block_until_ready(first_bad)
      bar.update(steps)
      before, done = done, done + steps
      global_before = epoch * steps_per_epoch + before
      if s.checkpoint_every_steps and done < steps_per_epoch and (
          global_before // s.checkpoint_every_steps
          != (global_before + steps) // s.checkpoint_every_steps):
        save(state, totals)
      if time.monotonic() - last_report > PROGRESS_SECONDS:
        last_report = time.monotonic()
        logging.info('%s epoch %d/%d, step %d/%d: %s', stage, epoch + 1,
                     s.epochs, done, steps_per_epoch,
                     _format(train.summarize(totals)))
    bar.close()
    guard.check()
    train_metrics = train.summarize(totals)
    check_finite(train_metrics, stage=stage, epoch=epoch)
    test_metrics = evaluate(state, dataset.test, s.eval_batch_size, mesh)
    logging.info('%s epoch %d/%d: train %s | test %s', stage, epoch + 1,
                 s.epochs, _format(train_metrics), _format(test_metrics))
    if on_epoch_end is not None:
      on_epoch_end(stage, epoch, train_metrics, test_metrics)
    save(state, totals)
  if test_metrics is None:  # Restored at the very end: nothing left to train.
    test_metrics = evaluate(state, dataset.test, s.eval_batch_size, mesh)
  return state, test_metrics


def _format(metrics: Mapping[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' for k, v in metrics.items() if k != 'count')
