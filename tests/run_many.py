"""Runs `run.py` once per argument list, as `python run.py ARGS...` would,
but each run in a fork of this one process: the interpreter starts and
imports run.py's modules (JAX, Flax, orbax: seconds) once for all of them.

  python tests/run_many.py '[["--config.foo=1"], ["--config=x.py:fast"]]'

prints one JSON list: per argument list, the run's exit status, stdout and
stderr (file descriptors 1 and 2, as a subprocess's). Used by
tests/test_run.py for the command-line mistakes, which stop before any
work. Forking is safe: this process only imports JAX, it never starts its
backends (a run that gets that far starts its own).
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, 'run.py')


def _child(args: list[str], out_path: str, err_path: str) -> None:
  """Runs run.py as `__main__` with `args`; never returns."""
  code = 1
  try:
    for fd, path in ((1, out_path), (2, err_path)):
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(target, fd)
      os.close(target)
    sys.argv = [RUN_PY, *args]
    try:
      runpy.run_path(RUN_PY, run_name='__main__')
      code = 0
    except SystemExit as e:  # What the interpreter would make of it.
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
    except BaseException:  # pylint: disable=broad-exception-caught
      traceback.print_exc()  # As an uncaught exception would.
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)  # pylint: disable=protected-access


def main() -> None:
  sys.path.insert(0, ROOT)  # As for `python run.py`.
  import run  # pylint: disable=g-import-not-at-top,unused-import
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, args in enumerate(json.loads(sys.argv[1])):
      out_path = os.path.join(tmp, f'{i}.out')
      err_path = os.path.join(tmp, f'{i}.err')
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(args, out_path, err_path)
      _, status = os.waitpid(pid, 0)
      with open(out_path) as out, open(err_path) as err:
        results.append({'returncode': os.waitstatus_to_exitcode(status),
                        'stdout': out.read(), 'stderr': err.read()})
  print(json.dumps(results))


if __name__ == '__main__':
  main()
