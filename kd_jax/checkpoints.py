"""Checkpoints of a stage's train state with orbax, and loading a teacher.

A stage's directory (`<workdir>/checkpoints/<stage>`) holds one orbax
checkpoint per saved step: the state (params, optimizer state, step, base
rng) and the running metric sums of the unfinished epoch, so that a resumed
run continues exactly where the saved one was. Orbax writes each checkpoint
into a temporary directory and renames it when complete, so a checkpoint cut
short by a kill is never taken for a good one.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from kd_jax import errors


def _state_item(state) -> dict[str, Any]:
  item = {'params': state.params, 'opt_state': state.opt_state,
          'step': state.step, 'rng': state.rng}
  # Orbax stores no empty dicts.
  for optional in ('batch_stats', 'modules', 'memory'):
    if getattr(state, optional):
      item[optional] = getattr(state, optional)
  return item


class StageCheckpoints:
  """Saves and restores one stage's train state; keeps the last `keep`."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, state, totals: dict[str, jax.Array]) -> None:
    """Saves `state` (a `train.TrainState`) and the epoch's metric sums."""
    self._manager.save(
        int(state.step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(_state_item(state)),
                                totals=ocp.args.StandardSave(totals)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, template):
    """The newest checkpoint as `(state, totals)`.

    Args:
      template: a fresh `train.TrainState` of the same model and optimizer;
        gives the structure, shapes and dtypes.
    """
    step = self.latest_step()
    item = _state_item(template)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, item)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        totals=ocp.args.StandardRestore()))
    # Rebuild the optimizer state's own (named) tuples from the template.
    leaves = jax.tree_util.tree_leaves(restored['state'])
    state_item = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(item), leaves)
    state = template.replace(**state_item)
    totals = jax.tree_util.tree_map(jax.numpy.asarray, restored['totals'])
    return state, totals

  def close(self) -> None:
    self._manager.close()


def _describe_differences(found, expected) -> list[str]:
  found_shapes = _shapes(found)
  expected_shapes = _shapes(expected)
  problems = []
  for name in sorted(set(found_shapes) | set(expected_shapes)):
    if name not in found_shapes:
      problems.append(f'{name}: missing from the checkpoint')
    elif name not in expected_shapes:
      problems.append(f'{name}: in the checkpoint, not in the model')
    elif found_shapes[name] != expected_shapes[name]:
      problems.append(f'{name}: checkpoint {found_shapes[name]}, model '
                      f'{expected_shapes[name]}')
  return problems


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in flat}


def load_variables(path: str, template: dict[str, Any], *,
                   what: str) -> dict[str, Any]:
  """Model variables from a stage checkpoint directory, checked against a model.

  Args:
    path: a stage's checkpoint directory (its newest step is used) or one
      step's directory inside it.
    template: variables of the configured model (`'params'` and, with batch
      norm, `'batch_stats'`), for structure and shapes.
    what: how to name the checkpoint in errors, e.g. 'config.teacher.checkpoint'.

  Returns:
    The saved variables, with `template`'s structure.

  Raises:
    errors.UserInputError: `path` is missing, holds no complete checkpoint,
      cannot be read, or was saved from another architecture or class count
      (the message lists the differing parameters).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise errors.UserInputError(f'{what} = {path}: no such directory')
  base, name = os.path.split(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    directory, step = base, int(name)
  else:
    directory, step = path, None
  try:
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            read_only=True, enable_async_checkpointing=False)) as manager:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise errors.UserInputError(
            f'{what} = {path}: holds no complete checkpoint (expected a '
            'stage checkpoint directory such as <workdir>/checkpoints/teacher '
            'or one of its numbered step directories)')
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))
  except errors.UserInputError:
    raise
  except Exception as e:  # orbax and tensorstore raise many kinds here.
    raise errors.UserInputError(
        f'{what} = {path}: cannot read the checkpoint '
        f'({type(e).__name__}: {e})') from e
  saved = restored['state'] if isinstance(restored['state'], dict) else {}
  if 'params' not in saved:
    raise errors.UserInputError(f'{what} = {path}: step {step} holds no '
                                'parameters')
  found = {name: saved[name] for name in ('params', 'batch_stats')
           if name in saved}
  problems = _describe_differences(found, template)
  if problems:
    raise errors.UserInputError(
        f'{what} = {path} (step {step}) does not fit the configured model:\n  '
        + '\n  '.join(problems))
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(template),
      [jax.numpy.asarray(leaf) for leaf in jax.tree_util.tree_leaves(found)])
