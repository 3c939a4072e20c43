"""`kd_jax.cli`: the entry points' shared start-up (the compilation cache,
XLA:CPU's convolutions)."""

import os
import subprocess
import sys

import jax

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


# A 3x3 convolution's weight gradient, compiled; prints whether XLA:CPU put
# a convolution in a YNNPACK fusion, and the XLA_FLAGS it ran with.
_CONVOLUTION_PROBE = """
import os, sys
import jax, jax.numpy as jnp
from kd_jax import cli
if sys.argv[1] == 'configure':
  cli.configure_jax()
x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
loss = lambda w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()
hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
ynn_bodies = [hlo[hlo.index(name + ' '):].split('\\n}')[0]
              for name in set(line.split('calls=')[1].split(',')[0]
                              for line in hlo.splitlines()
                              if '__ynn_fusion' in line and 'calls=' in line)]
print(any('convolution(' in body for body in ynn_bodies))
print(os.environ.get('XLA_FLAGS', ''))
"""


def _probe_convolutions(mode: str, xla_flags: str) -> tuple[bool, str]:
  env = dict(os.environ, XLA_FLAGS=xla_flags, KD_JAX_COMPILATION_CACHE='off')
  result = subprocess.run(
      [sys.executable, '-c', _CONVOLUTION_PROBE, mode], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120, check=True)
  in_ynn, flags_seen = result.stdout.splitlines()
  return in_ynn == 'True', flags_seen


def test_entry_points_take_convolutions_out_of_ynnpack():
  # By default XLA:CPU runs this convolution in YNNPACK (slow weight
  # gradients); the entry points' set-up moves it to Eigen, keeping the
  # user's other XLA flags.
  other = '--xla_cpu_use_fusion_emitters=false'
  assert _probe_convolutions('plain', other) == (True, other)
  assert _probe_convolutions('configure', other) == (
      False, f'{other} {cli.CPU_CONVOLUTION_XLA_FLAG}')


def test_a_users_ynn_choice_wins_and_a_started_backend_is_left_alone(
    monkeypatch):
  mine = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'
  assert _probe_convolutions('configure', mine) == (True, mine)
  monkeypatch.setenv('XLA_FLAGS', mine)
  assert not cli.use_eigen_cpu_convolutions()
  assert os.environ['XLA_FLAGS'] == mine
  # This test process has computed with JAX already: too late for flags.
  monkeypatch.setenv('XLA_FLAGS', '')
  jax.numpy.zeros(1).block_until_ready()
  assert not cli.use_eigen_cpu_convolutions()
  assert os.environ['XLA_FLAGS'] == ''


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
