"""What the entry points (run.py, export.py, sweep.py, compare_methods.py,
benchmark_cifar100.py, make_results.py; their code in kd_jax/*_main.py)
share: flags, one-line errors, quiet logs, the distributed start. The
scripts import this module, never each other.
"""

import errno
import logging as pylogging
import os
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
# Private, but the only way to tell whether XLA has read its flags already.
from jax._src import xla_bridge
from ml_collections import config_flags

from kd_jax import errors
from kd_jax import parallel
from kd_jax import validation

# The tutorial's protocol, the config every script starts from by default.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'experiments', 'seed.py')
# Mistakes in flags or config overrides surface as these; they are reported in
# one line instead of a traceback.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, TypeError,
               ValueError)


def define_config_flag() -> None:
  """Defines --config (the config file, its variant and overrides)."""
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG,
      'Experiment config file, optionally with a variant: file.py:quick.',
      lock_config=True)


def define_distributed_flags() -> None:
  """Flags that make this process one of a multi-process (multi-host) run."""
  flags.DEFINE_bool(
      'multihost', False, 'Join a multi-process run whose processes JAX '
      'finds by itself: a Cloud TPU pod slice, Slurm or Open MPI.')
  flags.DEFINE_string(
      'coordinator_address', '', 'host:port of process 0, for a multi-process '
      'run launched by hand; default $JAX_COORDINATOR_ADDRESS.')
  flags.DEFINE_integer('num_processes', 0, 'Processes of a multi-process run '
                       'launched by hand.')
  flags.DEFINE_integer('process_id', -1, 'This process\'s index, 0 to '
                       '--num_processes - 1.')


def start_distributed() -> None:
  """Starts JAX's distributed runtime if the flags ask for it.

  Processes other than process 0 then log warnings and errors only: they
  train in lockstep with process 0, which logs and writes the outputs.
  """
  try:
    parallel.initialize_distributed(
        coordinator_address=flags.FLAGS.coordinator_address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id,
        auto_detect=flags.FLAGS.multihost)
  except errors.UserInputError as e:
    exit_with_error(e)
  if not parallel.is_main_process():
    logging.set_verbosity(logging.WARNING)


def _cause(error: BaseException) -> BaseException:
  """`error` unwrapped from errors that re-raise it as their first arg."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return error


def _message(error: BaseException) -> str:
  """The user-facing text of `error`, unwrapped from re-raised errors."""
  error = _cause(error)
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])  # str(KeyError) would quote and escape it.
  return str(error)


def exit_with_error(error: BaseException) -> NoReturn:
  """Prints `error`'s message without tracebacks and exits with status 2."""
  lines = [line for line in _message(error).splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    lines = [lines[0], lines[-1]]  # ml_collections embeds the config's one.
  print('error: ' + '\n'.join(lines), file=sys.stderr)
  sys.exit(2)


# What to do about a filesystem failure, by errno.
_FILESYSTEM_ADVICE = {
    errno.ENOSPC: 'free some space',
    errno.EDQUOT: 'free some space (disk quota exceeded)',
    errno.EROFS: 'use a writable --workdir',
    errno.EACCES: 'fix its permissions or use another --workdir',
    errno.EPERM: 'fix its permissions or use another --workdir',
    errno.ENOTDIR: 'a file stands where a directory should be: move it away '
                   'or use another --workdir',
    errno.EISDIR: 'a directory stands where a file should be: move it away '
                  'or use another --workdir',
}


def exit_with_filesystem_error(error: OSError, workdir: str) -> NoReturn:
  """One line for a filesystem failure during a run, naming the path and
  what to do, and exit status 1. What the run wrote stays: the same command
  resumes once the cause is fixed."""
  path = error.filename or workdir
  advice = _FILESYSTEM_ADVICE.get(error.errno, 'fix the cause')
  print(f'error: {path}: {error.strerror or error}; {advice}, then run the '
        'same command again (it resumes from the newest checkpoint)',
        file=sys.stderr)
  sys.exit(1)


def run(main, *, parse=True) -> None:
  """`absl.app.run(main)` for an entry point: with `parse_flags` (unless
  `parse` is False), and Ctrl-C ending the process with one line and status
  130 instead of a traceback (what finished, and the newest checkpoint,
  stay; the same command resumes)."""
  try:
    app.run(main, **({'flags_parser': parse_flags} if parse else {}))
  except KeyboardInterrupt:
    print('interrupted; run the same command again to resume from the '
          'newest checkpoint', file=sys.stderr)
    sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with user mistakes reported by `exit_with_error`."""
  try:
    return flags.FLAGS(argv)
  except FLAG_ERRORS as e:
    exit_with_error(flag_error(e, argv))


def flag_error(error: BaseException, argv: list[str]) -> BaseException:
  """What to report for `error`, raised while defining or parsing the flags
  of `argv`: for an override of a field the config lacks, an error naming
  that field (and the closest one); else `error` itself. (With the default
  config, `--config.X=...` is applied when --config is defined.)"""
  return _unknown_override(_cause(error), argv) or error


def _unknown_override(error: BaseException,
                      argv: list[str]) -> ValueError | None:
  """For a KeyError from `--config.X=...` (or the AttributeError the config
  library makes of it), a clear error naming the field the config lacks
  (the config library reports only the missing key)."""
  if not isinstance(error, (KeyError, AttributeError)) or not error.args:
    return None
  # The key, as ml_collections quotes it (then maybe a "Did you mean" line).
  key = str(error.args[0]).splitlines()[0].strip('\'"')
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=')[0]
    if key in path.split('.'):
      close = validation.closest_field(path)
      return ValueError(
          f'--config.{path}: the config has no field config.{path}' + (
              f'; did you mean --config.{close}?' if close else ''))
  return None


def start(argv: list[str]):
  """What a command that runs a config does first: no stray arguments,
  `configure_jax()`, quiet orbax logs, the distributed runtime if asked
  for; returns `config_from_flags()`."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  configure_jax()
  quiet_orbax_logs()
  start_distributed()
  return config_from_flags()


def config_from_flags():
  """`--config` with its overrides; a config file that failed to load, or a
  bad override, fails here (on first use) with one line."""
  try:
    config = flags.FLAGS.config
    config.name  # pylint: disable=pointless-statement
    return config
  except FLAG_ERRORS as e:
    exit_with_error(flag_error(e, sys.argv))


class _QuietOrbax:
  """Logging filter: orbax's INFO lines (one per file it writes) are noise."""

  def filter(self, record) -> bool:
    return (record.levelno >= pylogging.WARNING
            or 'orbax' not in record.pathname)


# JAX's persistent compilation cache: where compiled programs are kept
# between runs, unless JAX_COMPILATION_CACHE_DIR (JAX's own setting) or
# KD_JAX_COMPILATION_CACHE (a directory, or 'off') says otherwise.
DEFAULT_COMPILATION_CACHE = os.path.join('~', '.cache', 'kd_jax', 'jax')
# Its size limit; having one also makes JAX lock the directory around each
# read and write, so that concurrent runs can share it.
COMPILATION_CACHE_BYTES = 4 * 2**30
# Programs compiling faster than this are not worth a file each.
COMPILATION_CACHE_MIN_SECONDS = 0.1


def start_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process (every
  entry point calls it first), so that a second run of the same or a
  similar config compiles almost nothing.

  Returns:
    The cache directory, or None when it is off (`KD_JAX_COMPILATION_CACHE=
    off`) or JAX_COMPILATION_CACHE_DIR already chose it for JAX.
  """
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return None
  directory = os.environ.get('KD_JAX_COMPILATION_CACHE',
                             DEFAULT_COMPILATION_CACHE)
  if directory.lower() in ('', 'off', 'none'):
    return None
  directory = os.path.expanduser(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_compilation_cache_max_size', COMPILATION_CACHE_BYTES)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    COMPILATION_CACHE_MIN_SECONDS)
  return directory


# XLA:CPU (jaxlib 0.10) hands every convolution to YNNPACK, whose weight
# gradient of a 3x3 convolution is 6-8x slower than Eigen's on this
# project's AVX-512 CPU (64->64 channels on 32x32 maps, batch 64: 670-890 ms
# against 105 ms; README.md, Performance). This flag takes convolutions out
# of YNNPACK and leaves matmuls in it.
CPU_CONVOLUTION_XLA_FLAG = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution')
_YNN_FUSION_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


def use_eigen_cpu_convolutions() -> bool:
  """Adds `CPU_CONVOLUTION_XLA_FLAG` to XLA_FLAGS, so that XLA:CPU runs
  convolutions with Eigen instead of YNNPACK (every entry point calls it
  first; library users may too, before JAX's first computation). GPUs and
  TPUs ignore it. The results differ from YNNPACK's by rounding only.

  Returns:
    Whether the flag was added: not when XLA_FLAGS already chooses the YNN
    fusion types (the user's choice wins), nor once JAX has started its
    backends (XLA reads its flags once, so it would have no effect).
  """
  current = os.environ.get('XLA_FLAGS', '')
  if _YNN_FUSION_FLAG in current or xla_bridge.backends_are_initialized():
    return False
  os.environ['XLA_FLAGS'] = f'{current} {CPU_CONVOLUTION_XLA_FLAG}'.strip()
  return True


def configure_jax() -> None:
  """JAX's settings for every entry point: the persistent compilation cache
  and, on a CPU, Eigen's convolutions."""
  use_eigen_cpu_convolutions()
  start_compilation_cache()


def quiet_orbax_logs() -> None:
  """Drops orbax's INFO lines from absl's log (for every entry point)."""
  pylogging.getLogger('absl').addFilter(_QuietOrbax())
