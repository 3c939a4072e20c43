"""Checkpoints of a stage's train state with orbax, and loading a teacher.

A stage's directory (`<workdir>/checkpoints/<stage>`) holds one orbax
checkpoint per saved step: the state (params, optimizer state, step, base
rng) and the running metric sums of the unfinished epoch, so that a resumed
run continues exactly where the saved one was. Orbax writes each checkpoint
into a temporary directory and renames it when complete, so a checkpoint cut
short by a kill is never taken for a good one.

Each save also records a SHA-256 fingerprint of what it saved (every array's
path, dtype, shape and bytes) in `checksums.json` beside the steps; a
restore recomputes it, so a checkpoint changed or cut short on disk later
(a flipped byte, a truncated file, a full disk) is never used: it is
skipped with a warning naming it, removed, and the previous one used.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from kd_jax import errors
from kd_jax import workdir

CHECKSUMS = 'checksums.json'
# Step -> fingerprint of the model variables alone (params, batch_stats):
# what a teacher loaded from another run is checked against.
VARIABLE_CHECKSUMS = 'checksums.variables.json'


def fingerprint(tree: Any) -> str:
  """SHA-256 (hex) of a pytree of arrays: each leaf's path, dtype, shape and
  bytes, in tree order. Integers count as int64 (a step saved as a Python
  int or int32 comes back in the template's integer type)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(jax.device_get(leaf))
    if array.dtype.kind in 'iub':
      array = array.astype(np.int64)
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype}|'
                  f'{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def filesystem_error(error: Exception, path: str) -> OSError | None:
  """An `OSError` naming `path` for an orbax/tensorstore error that reports
  an OS error code in its message (e.g. "RESOURCE_EXHAUSTED: Failed
  writing ... [os_error_code='28']" for a full disk), else None."""
  match = _OS_ERROR_CODE.search(str(error))
  if match is None:
    return None
  code = int(match.group(1))
  return OSError(code, os.strerror(code), path)


# What a checkpoint writes besides its arrays' bytes (metadata, manifests).
_CHECKPOINT_OVERHEAD_BYTES = 1 << 20


def check_free_space(directory: str, tree: Any) -> None:
  """Raises `OSError(ENOSPC)` naming `directory` when its filesystem has
  no room for a checkpoint of `tree` (its arrays' bytes plus metadata):
  a full disk found before orbax starts writing, not halfway through."""
  needed = _CHECKPOINT_OVERHEAD_BYTES + sum(
      int(getattr(leaf, 'nbytes', 8))
      for leaf in jax.tree_util.tree_leaves(tree))
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise OSError(errno.ENOSPC,
                  f'{os.strerror(errno.ENOSPC)} (a checkpoint needs about '
                  f'{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)',
                  directory)


def _read_checksums(directory: str, name: str = CHECKSUMS) -> dict[str, str]:
  """Step (as a string) -> fingerprint; {} when there is no (readable)
  record (checkpoints written before fingerprints were)."""
  try:
    with open(os.path.join(directory, name)) as f:
      checksums = json.load(f)
  except (OSError, ValueError):
    return {}
  return checksums if isinstance(checksums, dict) else {}


def model_variables(item: dict[str, Any]) -> dict[str, Any]:
  """The model variables of a saved state: `params`, and `batch_stats`
  when the model has batch norm (as `train.model_variables` gives them)."""
  return {name: item[name] for name in ('params', 'batch_stats')
          if name in item}


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
    """Saves `state` (a `train.TrainState`) and the epoch's metric sums,
    and records their fingerprint."""
    step, item = int(state.step), _state_item(state)
    check_free_space(self.directory, {'state': item, 'totals': totals})
    try:
      self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(item),
                                        totals=ocp.args.StandardSave(totals)),
          force=True)
      self._manager.wait_until_finished()
    except OSError:
      raise
    except Exception as e:  # tensorstore reports OS errors as ValueError.
      raise filesystem_error(e, self.directory) or e
    if jax.process_index():  # One process writes for all (shared storage).
      return
    kept = {str(s) for s in self._manager.all_steps()}
    for name, value in (
        (CHECKSUMS, {'state': item, 'totals': totals}),
        (VARIABLE_CHECKSUMS, model_variables(item))):
      checksums = {k: v for k, v in _read_checksums(self.directory,
                                                    name).items() if k in kept}
      checksums[str(step)] = fingerprint(value)
      workdir.write_atomic(os.path.join(self.directory, name),
                           json.dumps(checksums, indent=1, sort_keys=True))

  def restore(self, template):
    """The newest checkpoint that reads back as it was saved, as `(state,
    totals)`. A newer one that does not (unreadable, or its fingerprint
    differs) is logged, removed and skipped.

    Args:
      template: a fresh `train.TrainState` of the same model and optimizer;
        gives the structure, shapes and dtypes.

    Raises:
      errors.UserInputError: no checkpoint of the stage reads back (the
        message names the directory and each step's problem).
    """
    problems = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      restored, problem = self._restore_step(step, template)
      if problem is None:
        return restored
      self._discard(step, problem)
      problems.append(f'step {step}: {problem}')
    raise errors.UserInputError(
        f'{self.directory}: no checkpoint of this stage reads back as saved ('
        + '; '.join(problems) + '); rerun with --start_over to train the '
        'stage again')

  def restore_newest(self, template):
    """The newest checkpoint as `(state, totals)` if it reads back as saved;
    else None (none saved, or it is logged and removed, so that the stage
    resumes from the one before)."""
    step = self.latest_step()
    if step is None:
      return None
    restored, problem = self._restore_step(step, template)
    if problem is not None:
      self._discard(step, problem)
    return restored

  def _restore_step(self, step: int, template):
    """`((state, totals), None)`, or `(None, what is wrong with step)`."""
    item = _state_item(template)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, item)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          totals=ocp.args.StandardRestore()))
    except Exception as e:  # orbax and tensorstore raise many kinds here.
      return None, f'unreadable ({type(e).__name__}: {str(e)[:200]})'
    # Rebuild the optimizer state's own (named) tuples from the template.
    leaves = jax.tree_util.tree_leaves(restored['state'])
    state_item = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(item), leaves)
    expected = _read_checksums(self.directory).get(str(step))
    if expected is not None and expected != fingerprint(
        {'state': state_item, 'totals': restored['totals']}):
      return None, 'its contents differ from what was saved (checksum)'
    totals = jax.tree_util.tree_map(jax.numpy.asarray, restored['totals'])
    return (template.replace(**state_item), totals), None

  def _discard(self, step: int, problem: str) -> None:
    path = os.path.join(self.directory, str(step))
    logging.warning('checkpoint %s: %s; removed, using the one before',
                    path, problem)
    if not jax.process_index():
      shutil.rmtree(path, ignore_errors=True)
    self._manager.reload()

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
  variables = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(template),
      [jax.numpy.asarray(leaf) for leaf in jax.tree_util.tree_leaves(found)])
  expected = _read_checksums(directory, VARIABLE_CHECKSUMS).get(str(step))
  if expected is not None and expected != fingerprint(variables):
    raise errors.UserInputError(
        f'{what} = {path}: step {step} differs from what was saved (its '
        f'checksum in {VARIABLE_CHECKSUMS}); the checkpoint was changed or '
        'damaged on disk: train that stage again or point to another '
        'checkpoint')
  return variables
