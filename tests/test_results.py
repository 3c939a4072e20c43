"""make_results.py: one command regenerates the README's tables and figures."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ('seed_protocol', 'temperature', 'alpha')


def test_make_results_rewrites_readme_sections(tmp_path, tiny_idx_dir):
  readme = tmp_path / 'README.md'
  readme.write_text('# Title\n\nkept\n' + ''.join(
      f'<!-- results:{name} -->\nstale\n<!-- /results:{name} -->\nkept too\n'
      for name in SECTIONS))
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'make_results.py'),
       '--variant=quick', '--seeds=2', '--temperatures=4',
       '--alphas=0.9', f'--workdir={tmp_path / "work"}', f'--out={out}',
       f'--readme={readme}', f'--data_dir={tiny_idx_dir}',
       '--data_source=idx'],
      capture_output=True, text=True, timeout=900, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               JAX_DISABLE_MOST_OPTIMIZATIONS='1'), cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  text = readme.read_text()
  assert 'stale' not in text
  assert text.count('kept') == 4
  assert '| seed (seed=' not in text  # Seeds are grouped, not listed.
  assert '| seed | 2 |' in text
  # One base config per alpha (it sets two weights): rows, no figure.
  assert '| alpha=0.9 | 2 |' in text
  for name in ('temperature', 'training_curves', 'reliability',
               'tempered_softmax'):
    assert (out / f'{name}.png').stat().st_size > 5000
  assert sorted(p.name for p in out.iterdir() if p.suffix == '.md') == [
      'alpha.md', 'seed_protocol.md', 'temperature.md']
