"""Checkpoints read back exactly as saved, or not at all."""

import errno
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoints
from kd_jax import errors
from kd_jax import models
from kd_jax import train
from run_many import flip_a_byte
from run_many import largest_file


def _state(step: int) -> train.TrainState:
  state = train.create_train_state(models.make_model('seed_student_cnn'),
                                   jax.random.PRNGKey(0), (28, 28, 1))
  params = jax.tree_util.tree_map(lambda p: p + step, state.params)
  return state.replace(step=step, params=params)


def _saved(tmp_path, steps=(4, 8)) -> checkpoints.StageCheckpoints:
  store = checkpoints.StageCheckpoints(str(tmp_path / 'stage'), keep=3)
  for step in steps:
    store.save(_state(step), {'loss': jnp.float32(step), 'count': 1.0})
  return store


def test_fingerprint_sees_every_byte_path_and_dtype():
  tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(2)}
  same = checkpoints.fingerprint(tree)
  assert same == checkpoints.fingerprint(
      {'a': tree['a'].copy(), 'b': tree['b'].copy()})
  changed = [
      {'a': np.where(tree['a'] == 5, np.nextafter(np.float32(5), 6),
                     tree['a']), 'b': tree['b']},  # One bit of one value.
      {'a': tree['a'].reshape(3, 2), 'b': tree['b']},
      {'a': tree['a'].astype(np.int32), 'b': tree['b']},
      {'c': tree['a'], 'b': tree['b']},
  ]
  assert len({same, *map(checkpoints.fingerprint, changed)}) == 5


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(
    tmp_path, damage, caplog):
  store = _saved(tmp_path)
  newest = str(tmp_path / 'stage' / '8')
  path = largest_file(newest)
  if damage == 'flip':
    flip_a_byte(path)
  else:
    os.truncate(path, 0)
  state, totals = store.restore(_state(0))
  assert int(state.step) == 4 and float(totals['loss']) == 4.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params,
                         _state(4).params)
  assert any(newest in r.getMessage() for r in caplog.records)
  assert not os.path.exists(newest)  # Removed: never tried again.
  assert store.latest_step() == 4
  store.close()


def test_no_good_checkpoint_left_is_one_error_naming_the_directory(tmp_path):
  store = _saved(tmp_path)
  for step in (4, 8):
    flip_a_byte(largest_file(str(tmp_path / 'stage' / str(step))))
  with pytest.raises(errors.UserInputError) as info:
    store.restore(_state(0))
  message = str(info.value)
  assert message.startswith(f'{tmp_path / "stage"}: no checkpoint of this '
                            'stage reads back as saved (step 8: ')
  assert 'step 4: ' in message and '--start_over' in message
  store.close()


def test_an_undamaged_checkpoint_restores_exactly(tmp_path):
  store = _saved(tmp_path)
  for state, totals in (store.restore_newest(_state(0)),
                        store.restore(_state(0))):
    assert int(state.step) == 8 and float(totals['loss']) == 8.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params,
                           _state(8).params)
  store.close()


def test_a_full_disk_is_found_before_orbax_writes(tmp_path, monkeypatch):
  ckpt = checkpoints.StageCheckpoints(str(tmp_path / 'stage'), keep=2)
  real = checkpoints.shutil.disk_usage
  monkeypatch.setattr(checkpoints.shutil, 'disk_usage',
                      lambda path: real(path)._replace(free=10_000))
  with pytest.raises(OSError) as info:
    ckpt.save(_state(4), {'loss': jnp.zeros(())})
  assert info.value.errno == errno.ENOSPC
  assert info.value.filename == str(tmp_path / 'stage')
  # Metadata (1 MiB) + parameters and Adam's two moments, float32.
  needed = 2**20 + 3 * 4 * models.count_params(_state(4).params)
  assert (f'a checkpoint needs about {needed / 1e6:.1f} MB, 0.0 MB are free'
          in str(info.value))
  assert os.listdir(tmp_path / 'stage') == []
  ckpt.close()


def test_an_os_error_inside_orbax_becomes_an_os_error_naming_the_stage():
  # What tensorstore raises for a disk that fills up during a write.
  error = ValueError(
      'RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/teacher/28.orbax-'
      'checkpoint-tmp/d/97ed": Failed to write 552 bytes to file 11: No space '
      "left on device [os_error_code='28']")
  converted = checkpoints.filesystem_error(error, '/w/checkpoints/teacher')
  assert (converted.errno, converted.filename) == (
      errno.ENOSPC, '/w/checkpoints/teacher')
  assert checkpoints.filesystem_error(ValueError('shape mismatch'), '/w') is None


def _teacher_template():
  return models.init_variables(models.make_model('seed_student_cnn'),
                               jax.random.PRNGKey(0), (28, 28, 1))


def test_a_loaded_teacher_is_checked_against_its_saved_fingerprint(tmp_path):
  _saved(tmp_path).close()
  directory = str(tmp_path / 'stage')
  variables = checkpoints.load_variables(directory, _teacher_template(),
                                         what='config.teacher.checkpoint')
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables['params'],
                         _state(8).params)
  with open(os.path.join(directory, checkpoints.VARIABLE_CHECKSUMS)) as f:
    recorded = json.load(f)
  assert sorted(recorded) == ['4', '8']
  assert recorded['8'] == checkpoints.fingerprint(variables)
  # Bytes changed on disk: refused, whether orbax still reads them or not.
  flip_a_byte(largest_file(os.path.join(directory, '8')))
  with pytest.raises(errors.UserInputError,
                     match='config.teacher.checkpoint = ' + re.escape(
                         directory)):
    checkpoints.load_variables(directory, _teacher_template(),
                               what='config.teacher.checkpoint')


def test_a_teacher_that_no_longer_matches_its_checksum_is_refused(tmp_path):
  _saved(tmp_path).close()
  directory = str(tmp_path / 'stage')
  path = os.path.join(directory, checkpoints.VARIABLE_CHECKSUMS)
  with open(path) as f:
    recorded = json.load(f)
  recorded['8'] = checkpoints.fingerprint({'other': np.zeros(1)})
  with open(path, 'w') as f:
    json.dump(recorded, f)
  with pytest.raises(errors.UserInputError,
                     match=r'step 8 differs from what was saved'):
    checkpoints.load_variables(directory, _teacher_template(), what='t')
