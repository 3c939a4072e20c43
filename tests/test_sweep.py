"""Sweeps, seeds and statistics, logs and progress bars."""

import glob
import io
import json
import os
import struct

import pytest

from experiments import seed
from kd_jax import errors
from kd_jax import logs
from kd_jax import sweep



def _config(data_dir):
  """The quick variant, its teacher the student's network (the seed
  teacher's steps cost 6x the student's; sweeps do not depend on it)."""
  config = seed.get_config('quick')
  config.data_source, config.data_dir = 'idx', data_dir
  config.eval_batch_size, config.plots = 128, False
  config.teacher.model = 'seed_student_cnn'
  return config


def test_grid_values_are_typed_like_the_field():
  config = seed.get_config()
  assert sweep.parse_grid_value(config, 'distill.kd.temperature', '1, 4') == [
      1.0, 4.0]
  assert sweep.parse_grid_value(config, 'seed', '0,1,2') == [0, 1, 2]
  assert sweep.parse_grid_value(config, 'distill.kd.t2_scaling', 'true,False') == [
      True, False]
  with pytest.raises(errors.UserInputError, match='not a field of this config'):
    sweep.parse_grid_value(config, 'distill.kd.temprature', '1')
  with pytest.raises(errors.UserInputError, match="'x' is not a int"):
    sweep.parse_grid_value(config, 'seed', '0,x')


def test_expand_validates_every_point_before_any_work():
  points = sweep.expand({'kd': seed.get_config()},
                        {'distill.kd.temperature': [2.0, 4.0], 'seed': [0, 1]})
  assert [p.name for p in points] == [
      'kd__distill.kd.temperature=2.0__seed=0', 'kd__distill.kd.temperature=2.0__seed=1',
      'kd__distill.kd.temperature=4.0__seed=0', 'kd__distill.kd.temperature=4.0__seed=1']
  assert points[3].config.distill.kd.temperature == 4.0
  assert points[3].config.seed == 1 and points[3].config.num_seeds == 1
  with pytest.raises(errors.UserInputError,
                     match=r"(?s)sweep point kd \{'distill.kd.weight': -2.0\}: "
                     r'.*config\.distill\.kd\.weight = -2\.0'):
    sweep.expand({'kd': seed.get_config()}, {'distill.kd.weight': [0.5, -2.0]})
  # A seed listed twice would count one replicate twice (a CI of 0).
  with pytest.raises(errors.UserInputError,
                     match=r'--grid=seed: 0 listed more than once'):
    sweep.expand({'kd': seed.get_config()}, {'seed': [0, 0, 1]})


def test_shared_stage_keys():
  a = seed.get_config()
  b = sweep.with_overrides(a, {'distill.kd.temperature': 4.0, 'name': 'other'})
  c = sweep.with_overrides(a, {'teacher.epochs': 2})
  d = sweep.with_overrides(a, {'seed': 1})
  assert sweep.teacher_key(a) == sweep.teacher_key(b) != sweep.teacher_key(c)
  assert sweep.scratch_key(a) == sweep.scratch_key(b) == sweep.scratch_key(c)
  assert sweep.teacher_key(a) != sweep.teacher_key(d)
  assert sweep.scratch_key(a) != sweep.scratch_key(d)


def _mtimes(pattern):
  return {p: os.path.getmtime(p) for p in glob.glob(pattern, recursive=True)}


def test_sweep_shares_teachers_resumes_and_summarizes(tmp_path, tiny_idx_dir):
  workdir = str(tmp_path / 'sweep')
  grid = {'distill.kd.temperature': [2.0], 'seed': [0, 1]}
  rows = sweep.run_sweep({'kd': _config(tiny_idx_dir)}, grid, workdir)
  assert len(rows) == 2
  assert 'distilled_test_ece' in rows[0] and 'teacher_temperature' in rows[0]
  # Each row says what produced it: one code and data, two configs (seeds).
  assert rows[0]['provenance']['data_sha256'] == (
      rows[1]['provenance']['data_sha256'])
  assert rows[0]['provenance']['config_sha256'] != (
      rows[1]['provenance']['config_sha256'])

  # Resuming retrains nothing; a new grid value reuses the teachers and the
  # students from scratch: one of each per seed, not per point. (One call
  # checks both: the points that ran resume as they are.)
  before = _mtimes(os.path.join(workdir, '**', 'results.json'))
  grid['distill.kd.temperature'].append(4.0)
  more = sweep.run_sweep({'kd': _config(tiny_idx_dir)}, grid, workdir)
  assert len(more) == 4
  assert more[:2] == rows
  after = _mtimes(os.path.join(workdir, '**', 'results.json'))
  assert {path: after[path] for path in before} == before
  assert len(after) == len(before) + 2  # The new points' distil runs.
  assert len(os.listdir(os.path.join(workdir, 'teachers'))) == 2
  assert len(os.listdir(os.path.join(workdir, 'scratch'))) == 2
  by_point = {row['point']: row for row in more}
  assert (by_point['kd__distill.kd.temperature=2.0__seed=1']['teacher_accuracy']
          == by_point['kd__distill.kd.temperature=4.0__seed=1'][
              'teacher_accuracy'])
  with open(os.path.join(workdir, 'summary.json')) as f:
    groups = json.load(f)
  assert [g['overrides'] for g in groups] == [{'distill.kd.temperature': 2.0},
                                              {'distill.kd.temperature': 4.0}]
  assert groups[0]['seeds'] == [0, 1]
  with open(os.path.join(workdir, 'summary.md')) as f:
    table = f.read()
  assert '| kd (distill.kd.temperature=2.0) | 2 |' in table and '±' in table
  assert 'paired t-test' in table
  assert 'Warning' not in table  # One code and data for every row.
  figure = sweep.plot_sweep(sweep.summarize(more), grid, workdir)
  assert figure.endswith('sweep_distill.kd.temperature.png')
  assert os.path.getsize(figure) > 5000


def test_progress_bar_is_silent_off_a_terminal():
  quiet = io.StringIO()
  bar = logs.progress(10, 'teacher epoch 1/5', file=quiet)
  bar.update(10)
  bar.close()
  assert bar.disable and quiet.getvalue() == ''

  class Terminal(io.StringIO):

    def isatty(self):
      return True

  shown = Terminal()
  bar = logs.progress(10, 'teacher epoch 1/5', file=shown)
  bar.update(4)
  bar.refresh()
  assert not bar.disable and 'teacher epoch 1/5' in shown.getvalue()
  assert '4/10' in shown.getvalue()
  bar.close()


def _read_events(directory):
  """Every event of the TensorBoard event files in `directory`, file by file
  in the order they were written."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for path in sorted(glob.glob(os.path.join(directory, 'events.out.*')),
                     key=os.path.getmtime):
    with open(path, 'rb') as f:
      raw = f.read()
    offset = 0
    while offset < len(raw):  # TFRecord: length, crc, payload, crc.
      (length,) = struct.unpack('<Q', raw[offset:offset + 8])
      events.append(event_pb2.Event.FromString(
          raw[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def read_event_scalars(directory):
  """(tag, step, value) of every scalar in the TensorBoard event files."""
  return [(value.tag, event.step, value.simple_value)
          for event in _read_events(directory)
          for value in event.summary.value]


def test_tensorboard_events_mirror_metrics_jsonl(tmp_path):
  writer = logs.TensorBoardWriter(str(tmp_path / 'tb'))
  writer.write('distill', 1, {'train/loss': 0.5, 'test/accuracy': 0.75})
  writer.write('distill', 2, {'train/loss': 0.25, 'test/accuracy': 0.875})
  writer.close()
  scalars = read_event_scalars(str(tmp_path / 'tb' / 'distill'))
  assert sorted(scalars) == [('test/accuracy', 1, 0.75),
                             ('test/accuracy', 2, 0.875),
                             ('train/loss', 1, 0.5), ('train/loss', 2, 0.25)]


def test_tensorboard_drops_the_epochs_a_resumed_stage_runs_again(tmp_path):
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  first = logs.TensorBoardWriter(str(tmp_path / 'tb'))
  for epoch in (1, 2, 3):
    first.write('teacher', epoch, {'train/loss': 1.0 / epoch})
  first.close()
  second = logs.TensorBoardWriter(str(tmp_path / 'tb'))
  second.resume('teacher', 2)  # Epoch 1 kept; 2 and 3 run again.
  second.write('teacher', 2, {'train/loss': 0.5})
  second.close()
  events = _read_events(str(tmp_path / 'tb' / 'teacher'))
  starts = [(i, e.step) for i, e in enumerate(events)
            if e.session_log.status == event_pb2.SessionLog.START]
  # TensorBoard discards earlier events at step >= 2 on reading this marker.
  assert len(starts) == 1 and starts[0][1] == 2
  after = [(v.tag, e.step, v.simple_value) for e in events[starts[0][0]:]
           for v in e.summary.value]
  assert after == [('train/loss', 2, 0.5)]  # Exact in float32.
