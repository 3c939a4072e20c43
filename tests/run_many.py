"""Runs `run.py` once per job, in order, as `python run.py ARGS...` would,
but each run in a fork of this one process: the interpreter starts and
imports run.py's modules (JAX, Flax, orbax: 5 s of CPU) once for all.

  python tests/run_many.py '[{"args": ["--workdir=/tmp/a", ...]},
                             {"args": [...], "copy": ["/tmp/a", "/tmp/b"]}]'

A job's optional "copy" (source, destination) is a directory copied before
its run, if the source exists; its optional "flip_a_byte_under" a
directory: one byte in the middle of its largest file is inverted after the
copy (a damaged checkpoint); its optional "kill_when_exists" a path: the
run is killed (SIGKILL) once that exists. Prints one JSON line: per job, the
run's exit status (negative: the signal that ended it), stdout and stderr
(file descriptors 1 and 2, as a subprocess's); tests call `run_jobs`.
Forking is safe: this process only imports JAX, it never starts its
backends (each run starts its own).
"""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, 'run.py')


def run_jobs(jobs: list[dict], *, env: dict[str, str]) -> list[dict]:
  """The outcomes of `jobs` (see above), run in a subprocess with `env`."""
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__),
       json.dumps(jobs, default=str)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
      check=False)
  if result.returncode:
    raise RuntimeError(f'{__file__} failed: {result.stderr[-3000:]}')
  return json.loads(result.stdout.splitlines()[-1])


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


def largest_file(directory: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory)
           for f in names]
  return max(files, key=os.path.getsize)


def flip_a_byte(path: str) -> None:
  """Inverts the byte in the middle of the file `path`."""
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def main() -> None:
  sys.path.insert(0, ROOT)  # As for `python run.py`.
  import run  # pylint: disable=g-import-not-at-top,unused-import
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, job in enumerate(json.loads(sys.argv[1])):
      if 'copy' in job and os.path.isdir(job['copy'][0]):
        shutil.copytree(*job['copy'])
      if 'flip_a_byte_under' in job:
        flip_a_byte(largest_file(job['flip_a_byte_under']))
      out_path = os.path.join(tmp, f'{i}.out')
      err_path = os.path.join(tmp, f'{i}.err')
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(job['args'], out_path, err_path)
      kill_when = job.get('kill_when_exists')
      while True:
        done, status = os.waitpid(pid, os.WNOHANG if kill_when else 0)
        if done:
          break
        if os.path.exists(kill_when):
          os.kill(pid, signal.SIGKILL)
          kill_when = None  # Then wait for it.
        else:
          time.sleep(0.05)
      with open(out_path) as out, open(err_path) as err:
        results.append({'returncode': os.waitstatus_to_exitcode(status),
                        'stdout': out.read(), 'stderr': err.read()})
  print(json.dumps(results))


if __name__ == '__main__':
  main()
