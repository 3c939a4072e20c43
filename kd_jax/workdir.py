"""A run's directory: its config, metrics, results and what may be deleted.

Everything `kd_jax.experiment.run` writes lives under the workdir, and
nowhere else:

  config.json          the resolved config
  metrics.jsonl        one JSON line per stage and epoch (train and test)
  tensorboard/<stage>/ the same metrics as TensorBoard scalars
  checkpoints/<stage>/ orbax checkpoints of each stage's train state
  results.json         test accuracies (`teacher_accuracy`,
                       `distilled_accuracy`, `scratch_accuracy`,
                       `<stage>_accuracy` for chain links) and per-stage
                       details
  results.md           the same as a Markdown table
  plots/               figures

A workdir written with a different config is refused (`check_workdir`)
unless the run starts over, which deletes only `OWN_FILES`.
"""

from collections.abc import Callable, Mapping
import datetime
import fcntl
import json
import os
import shutil
from typing import Any

from absl import logging
import ml_collections

from kd_jax import augment
from kd_jax import errors
from kd_jax import logs
from kd_jax import methods
from kd_jax import optimizers
from kd_jax import stages as stages_lib

# Fields that may change between runs in one workdir: which stages to run,
# and whether figures are drawn, do not change what any stage computes.
RERUNNABLE_FIELDS = ('stages', 'name', 'num_seeds', 'plots')
# Fields added after workdirs were first written: an older config.json
# without them ran with these values.
ADDED_FIELD_DEFAULTS = {'num_devices': 0, 'precision': 'float32',
                        'input': 'memory', 'data_url': '',
                        'plots': True}
# The config sections that a workdir running only one stage never reads.
_UNUSED_SECTIONS = {'teacher': ('student', 'distill'),
                    'scratch': ('teacher', 'distill')}


class WorkdirLock:
  """An exclusive lock on a workdir for the whole of a run or sweep.

  It is `flock` on the directory itself: nothing is written for it, and the
  kernel releases it when the process ends, however it ends (a kill, a
  crash), so a stale lock cannot outlive its holder. A second run on the
  same directory stops at once with one line naming it and the holder's
  process ID. On a network filesystem the lock holds across machines only
  where the filesystem implements `flock` across clients (NFSv4 with lock
  support, Lustre mounted with `flock`); elsewhere it guards launches on
  one machine only.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd = None

  def take(self) -> None:
    """Locks the directory (which must exist); a no-op if already held.

    Raises:
      errors.UserInputError: another process holds it.
    """
    if self._fd is not None:
      return
    fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _flock_holder(self.path)
      os.close(fd)
      raise errors.UserInputError(
          f'--workdir={self.path}: in use by another kd_jax run ('
          + (f'process {holder}' if holder else 'another process')
          + '); wait for it to end, or use another --workdir') from None
    self._fd = fd

  def take_if_exists(self) -> None:
    """`take`, if the directory exists (else the run takes it once it has
    made the directory, before writing in it)."""
    if os.path.isdir(self.path):
      self.take()

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the last descriptor releases the flock.
      self._fd = None


def _flock_holder(path: str) -> int | None:
  """The process ID holding a `flock` on `path`, from Linux's /proc/locks
  (`N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`), or None."""
  inode = os.stat(path).st_ino
  try:
    with open('/proc/locks') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  for line in lines:
    fields = line.split()
    if len(fields) > 5 and fields[1] == 'FLOCK' and fields[5].split(
        ':')[-1] == str(inode):
      return int(fields[4])
  return None


def write_atomic(path: str, payload: bytes | str) -> None:
  """Writes `payload` to `path` through a temporary file and a rename."""
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(payload.encode() if isinstance(payload, str) else payload)
  os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path` (a workdir's config.json, results.json).

  Raises:
    errors.UserInputError: the file cannot be read, is not JSON, or holds
      something other than an object (the message names the file).
  """
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.UserInputError(
        f'{path}: cannot read it as JSON ({e}); move the workdir aside or '
        'choose another --workdir') from e
  if not isinstance(value, dict):
    raise errors.UserInputError(
        f'{path}: expected a JSON object, found {type(value).__name__} '
        f'{json.dumps(value)[:40]}; move the workdir aside or choose another '
        '--workdir')
  return value


def _metric_records(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl; a line that is not a whole record (a
  kill during an append tears the last one) is dropped with a warning
  naming the file and the line."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict) or 'stage' not in record:
        logging.warning('%s, line %d: not a whole metrics record (a write cut '
                        'short?); dropped', path, number)
        continue
      records.append(record)
  return records


def _differing_fields(old: Any, new: Any, prefix: str = '') -> list[str]:
  """Dotted names of the fields that differ between two nested dicts."""
  if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
    return [] if old == new else [prefix.rstrip('.')]
  names = []
  for key in sorted(set(old) | set(new)):
    if f'{prefix}{key}' in RERUNNABLE_FIELDS:
      continue
    names += _differing_fields(old.get(key), new.get(key), f'{prefix}{key}.')
  return names


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a `workdir` that holds a run with another config; writes nothing.

  Fields that do not change what is computed are not compared (`name`,
  `stages`, `num_seeds`), nor, when both runs train only the teacher (or
  only the student from scratch), the sections that stage never reads:
  a sweep shares such workdirs between points.

  Raises:
    errors.UserInputError: `workdir` is not a directory, or its config.json
      differs from `config` (the message names the differing fields).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserInputError(f'--workdir={workdir}: exists and is not a '
                                'directory')
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    old, new = upgraded_config(read_json(path)), _config_dict(config)
    stages = {stages_lib.parse_stages(old.get('stages', ''))} | {
        stages_lib.parse_stages(new['stages'])}
    if len(stages) == 1 and (only := stages.pop()) and len(only) == 1:
      for section in _UNUSED_SECTIONS.get(only[0], ()):
        old.pop(section, None)
        new.pop(section, None)
    differing = _differing_fields(old, new)
    if differing:
      raise errors.UserInputError(
          f'--workdir={workdir} holds a run with a different config (fields: '
          f'{", ".join("config." + f for f in differing)}); use another '
          '--workdir, or pass --start_over to replace that run')


def upgraded_config(old: dict[str, Any]) -> dict[str, Any]:
  """A config.json written by an earlier kd_jax, in today's layout: fields
  added since at the defaults that reproduce the old behaviour
  (`ADDED_FIELD_DEFAULTS`, `config.augment` off, method settings at their
  records' defaults) and each role's
  `learning_rate` and `schedule` moved into its `optimizer` section (Adam)."""
  for field, default in ADDED_FIELD_DEFAULTS.items():
    old.setdefault(field, default)
  old.setdefault('augment', augment.default_section().to_dict())
  for name, section in (old.get('distill') or {}).items():
    if isinstance(section, dict) and name in methods.RECORDS:
      for key, value in methods.default_section(name).items():
        section.setdefault(key, value)
  for role in ('teacher', 'student'):
    section = old.get(role)
    if isinstance(section, dict) and 'optimizer' not in section:
      moved = {k: section.pop(k) for k in ('learning_rate', 'schedule')
               if k in section}
      section['optimizer'] = optimizers.default_section(**moved).to_dict()
  return old


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates `workdir` and writes the resolved config to its config.json."""
  os.makedirs(workdir, exist_ok=True)
  write_atomic(os.path.join(workdir, 'config.json'),
                json.dumps(_config_dict(config), indent=2, sort_keys=True) + '\n')


class Workdir:
  """Reads and writes a run's files.

  Every process of a multi-process run reads; only the one with `writes`
  (process 0) writes, so files are written once.
  """

  def __init__(self, path: str, *, writes: bool = True):
    self.path = path
    self.writes = writes
    self.tensorboard = logs.TensorBoardWriter(self.file('tensorboard'))

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def checkpoint_dir(self, stage: str) -> str:
    return self.file(os.path.join('checkpoints', stage))

  def load_results(self) -> dict[str, Any]:
    path = self.file('results.json')
    if not os.path.exists(path):
      return {'stages': {}}
    results = read_json(path)
    if not isinstance(results.get('stages'), dict):
      raise errors.UserInputError(
          f'{path}: expected a "stages" object (the finished stages); move '
          'the workdir aside or choose another --workdir')
    return results

  def keep_stage_metrics(self, stage: str, epochs: int) -> None:
    """Keeps the metric lines of `stage`'s first `epochs` epochs only.

    Lines of epochs that a resumed stage will run again, and a line torn by
    a kill, are dropped (from TensorBoard's view too).
    """
    path = self.file('metrics.jsonl')
    if not self.writes or not os.path.exists(path):
      return
    if os.path.isdir(os.path.join(self.file('tensorboard'), stage)):
      self.tensorboard.resume(stage, epochs + 1)
    kept = [json.dumps(record) + '\n' for record in _metric_records(path)
            if record['stage'] != stage or record.get('epoch', 0) <= epochs]
    write_atomic(path, ''.join(kept))

  def append_metrics(self, stage: str, epoch: int,
                     train_metrics: Mapping[str, float],
                     test_metrics: Mapping[str, float]) -> None:
    """Adds one epoch's metrics to metrics.jsonl and TensorBoard (x = epoch)."""
    if not self.writes:
      return
    record = {'stage': stage, 'epoch': epoch + 1}
    record.update({f'train/{k}': v for k, v in train_metrics.items()})
    record.update({f'test/{k}': v for k, v in test_metrics.items()})
    with open(self.file('metrics.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')
    self.tensorboard.write(stage, epoch + 1, {
        k: v for k, v in record.items() if '/' in k and k[-6:] != '/count'})

  def record(self, results: dict[str, Any], stage: str,
             info: dict[str, Any]) -> None:
    """Adds a finished stage to `results` and results.json (atomically)."""
    results['stages'][stage] = info
    results[stages_lib.result_key(stage)] = info['test_accuracy']
    results['updated'] = datetime.datetime.now().isoformat(timespec='seconds')
    if self.writes:
      write_atomic(self.file('results.json'),
                   json.dumps(results, indent=2, sort_keys=True) + '\n')
    logging.info('stage %s: test accuracy %.4f', stage, info['test_accuracy'])

  def forget(self, results: dict[str, Any], stage: str) -> None:
    """Marks `stage` unfinished in `results` and results.json (atomically):
    it runs again (resuming from its newest checkpoint)."""
    results['stages'].pop(stage, None)
    results.pop(stages_lib.result_key(stage), None)
    if self.writes:
      write_atomic(self.file('results.json'),
                   json.dumps(results, indent=2, sort_keys=True) + '\n')


# What `run` writes in a workdir; `start_over` deletes these and nothing else.
OWN_FILES = ('config.json', 'metrics.jsonl', 'results.json', 'results.md',
             'checkpoints', 'tensorboard', 'plots', 'export')
# The figures a run writes in plots/ (`reports.write_plots`).
OWN_PLOTS = ('training_curves.png', 'reliability.png', 'tempered_softmax.png')


def _is_export_file(name: str) -> bool:
  """What `export.py` writes in export/ (kd_jax.export_main)."""
  return name.endswith(('.onnx', '.jax_export')) or name in ('report.json',
                                                            'report.md')


def _is_checkpoint_file(name: str) -> bool:
  """orbax's step directories (complete or temporary), the checksums and
  provenance.json."""
  return name.split('.')[0].isdigit() or name.startswith(
      ('checksums.json', 'checksums.variables.json', 'provenance.json'))


def _delete_own(directory: str, is_own: Callable[[str], bool]) -> None:
  """Deletes the entries of `directory` that `is_own` names, then the
  directory itself if nothing else is left in it."""
  for name in os.listdir(directory):
    if is_own(name):
      path = os.path.join(directory, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  if not os.listdir(directory):
    os.rmdir(directory)


def clear_workdir(workdir: str) -> None:
  """Deletes what an earlier run wrote in `workdir`, nothing else: nothing
  in a directory that holds no run (no config.json); in plots/ only the
  run's figures, in checkpoints/<stage>/ only checkpoints, in
  tensorboard/<stage>/ only event files (a directory goes when nothing
  else is left in it)."""
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return
  per_stage = {'checkpoints': _is_checkpoint_file,
               'tensorboard': lambda n: n.startswith('events.out.tfevents.')}
  for name in OWN_FILES:
    path = os.path.join(workdir, name)
    if name in per_stage and os.path.isdir(path):
      for stage in os.listdir(path):
        if os.path.isdir(os.path.join(path, stage)):
          _delete_own(os.path.join(path, stage), per_stage[name])
      _delete_own(path, lambda n: False)
    elif name == 'plots' and os.path.isdir(path):
      _delete_own(path, lambda n: n in OWN_PLOTS)
    elif name == 'export' and os.path.isdir(path):
      _delete_own(path, _is_export_file)
    elif os.path.isfile(path):
      os.remove(path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir`'s metrics.jsonl (one per stage and epoch);
  none if it has no such file."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return _metric_records(path) if os.path.exists(path) else []
