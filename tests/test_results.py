"""make_results.py: one command regenerates the README's tables and figures."""

import os

from absl import flags
import pytest

SECTIONS = ('seed_protocol', 'temperature', 'alpha')


def test_make_results_rewrites_the_sections_of_the_studies_it_ran(
    tmp_path, tiny_idx_dir, make_results_with, monkeypatch):
  readme = tmp_path / 'README.md'
  readme.write_text('# Title\n\nkept\n' + ''.join(
      f'<!-- results:{name} -->\nstale\n<!-- /results:{name} -->\nkept too\n'
      for name in SECTIONS))
  out = tmp_path / 'out'
  # One study keeps the test short; every study runs the same code path.
  # Its `main` in this process (saves starting an interpreter; the module
  # is the script, run as `python make_results.py` would run it).
  make_results = make_results_with(
      '--variant=quick', '--seeds=2', '--studies=seed_protocol',
      f'--workdir={tmp_path / "work"}', f'--out={out}', f'--readme={readme}',
      f'--data_dir={tiny_idx_dir}', '--data_source=idx')
  # The teachers with the student's network: what is tested is the script
  # (the seed teacher's steps cost 6x; it is trained in tests/test_run.py).
  config_of = make_results._config  # pylint: disable=protected-access

  def cheap_teacher(*variants):
    config = config_of(*variants)
    config.teacher.model = 'seed_student_cnn'
    return config

  monkeypatch.setattr(make_results, '_config', cheap_teacher)
  make_results.main(['make_results'])
  text = readme.read_text()
  assert text.count('stale') == 2  # The two studies not run are kept.
  assert text.count('kept') == 4
  assert '| seed (seed=' not in text  # Seeds are grouped, not listed.
  assert '| seed | 2 |' in text
  for name in ('training_curves', 'reliability', 'tempered_softmax'):
    assert (out / f'{name}.png').stat().st_size > 5000
  assert sorted(p.name for p in out.iterdir()) == [
      'reliability.png', 'seed_protocol.md', 'tempered_softmax.png',
      'training_curves.png']


@pytest.fixture
def make_results_with():
  """`make_results_with(*args)`: the make_results.py module, imported in this
  process, with its flags parsed from `args` (reset afterwards)."""
  import make_results  # pylint: disable=g-import-not-at-top

  def parse(*args):
    flags.FLAGS(['make_results', *args])
    return make_results

  yield parse
  flags.FLAGS.unparse_flags()


def test_unknown_study_is_refused_before_any_work(tmp_path, make_results_with,
                                                  capsys):
  # Its `main` in this process, as above.
  make_results = make_results_with(
      '--studies=seed_protocol,alphas', f'--workdir={tmp_path / "work"}',
      f'--out={tmp_path / "out"}', '--readme=')
  with pytest.raises(SystemExit) as exited:
    make_results.main(['make_results'])
  assert exited.value.code == 2
  assert ('--studies: expected names from seed_protocol, temperature, alpha, '
          'got seed_protocol,alphas') in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_each_alpha_is_a_base_config_weighing_both_terms(make_results_with):
  make_results = make_results_with('--alphas=0.3,0.6', '--temperatures=2',
                                   '--variant=quick')
  every = make_results.studies([0, 1])
  bases, grid, _ = every['alpha']
  assert list(bases) == ['alpha=0.3', 'alpha=0.6']
  for alpha, config in zip((0.3, 0.6), bases.values()):
    assert config.distill.ce.weight == alpha
    assert config.distill.kd.weight == pytest.approx(1 - alpha)
    assert config.student.model == 'hinton_student_mlp'
    assert config.name == 'seed_quick_strong_mlp'
  assert grid == {'seed': [0, 1]}
  bases, grid, _ = every['temperature']
  assert grid == {'distill.kd.temperature': [2.0], 'seed': [0, 1]}
  assert list(every) == list(SECTIONS)
