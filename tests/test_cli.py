"""`kd_jax.cli`: the entry points' shared start-up (the compilation cache)."""

import os
import subprocess
import sys

from kd_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compilation_cache_defaults_to_a_locked_directory(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['KD_JAX_COMPILATION_CACHE'] = str(tmp_path / 'cache')
  code = ('import jax; from kd_jax import cli; '
          'print(cli.start_compilation_cache()); '
          'print(jax.config.jax_compilation_cache_dir); '
          'print(jax.config.jax_compilation_cache_max_size)')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120,
                          check=True)
  directory, configured, max_size = result.stdout.split()
  assert directory == configured == str(tmp_path / 'cache')
  # A size limit makes JAX lock the directory, so runs can share it.
  assert int(max_size) == cli.COMPILATION_CACHE_BYTES > 0


def test_compilation_cache_is_left_to_jax_or_turned_off(monkeypatch):
  # JAX's own setting wins (as in this test session's conftest).
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/somewhere')
  assert cli.start_compilation_cache() is None
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  monkeypatch.setenv('KD_JAX_COMPILATION_CACHE', 'off')
  assert cli.start_compilation_cache() is None


def test_ctrl_c_is_one_line_and_status_130():
  code = ('from kd_jax import cli\n'
          'def main(argv):\n'
          '  raise KeyboardInterrupt\n'
          'cli.run(main)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 130
  assert result.stderr.strip() == (
      'interrupted; run the same command again to resume from the newest '
      'checkpoint')
