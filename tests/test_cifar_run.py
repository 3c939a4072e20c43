"""The CIFAR-100 benchmark configs: every pair x method validates, and a
quick run of a pair's config on a synthetic cifar-100-python.tar.gz trains
every stage with augmentation, SGD and the dataset's normalisation."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from experiments.cifar100 import common
from kd_jax import experiment
from kd_jax import methods
from kd_jax import validation
from synthetic import write_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair_config(teacher, student, arg):
  module = importlib.import_module(f'experiments.cifar100.{teacher}_{student}')
  return module.get_config(arg)


def test_there_is_one_config_per_pair_of_the_crd_table():
  names = sorted(f for f in os.listdir(os.path.join(ROOT, 'experiments',
                                                    'cifar100'))
                 if f.endswith('.py') and f not in ('common.py',
                                                    '__init__.py'))
  assert names == sorted(f'{t}_{s}.py' for t, s in common.PAIRS)
  assert len(common.PAIRS) == 13


@pytest.mark.parametrize('teacher, student', common.PAIRS)
def test_every_method_of_every_pair_is_a_valid_config(teacher, student):
  for method in methods.METHODS:
    if method in common.UNSUPPORTED:
      with pytest.raises(ValueError, match='at most one method'):
        _pair_config(teacher, student, method)
      continue
    config = _pair_config(teacher, student, method)
    validation.validate(config)
    assert config.distill.method == method
    assert (teacher, student) == (config.teacher.model, config.student.model)
    for role in ('teacher', 'student'):
      optimizer = config[role].optimizer
      assert optimizer.name == 'sgd' and optimizer.weight_decay == 5e-4
      assert optimizer.learning_rate == (
          0.01 if config[role].model in common.SMALL_LR_MODELS else 0.05)
      assert optimizer.decay_epochs == '150,180,210'
      assert config[role].epochs == 240
    assert (config.augment.crop_padding, config.augment.flip) == (4, True)


def test_recipe_details():
  kd = _pair_config('resnet32x4', 'resnet8x4', '')
  assert (kd.distill.ce.weight, kd.distill.kd.weight) == (0.1, 0.9)
  assert kd.distill.kd.temperature == 4.0 and kd.distill.kd.t2_scaling
  at = _pair_config('vgg13', 'mobilenetv2', 'at')
  assert at.distill.at.student_layers == 'stage1,stage2,stage3,stage4'
  fitnets = _pair_config('resnet56', 'resnet20', 'fitnets,quick')
  assert fitnets.distill.fitnets.teacher_layers == 'stage2'
  assert fitnets.name == 'cifar100_resnet56_resnet20_fitnets_quick'
  with pytest.raises(ValueError, match="variants 'kd,dkd'"):
    _pair_config('resnet56', 'resnet20', 'kd,dkd')


def test_quick_pair_runs_on_the_official_archive(tmp_path):
  write_cifar(str(tmp_path / 'data'), 'cifar100', num=128)
  workdir = tmp_path / 'work'
  # The pair's recipe with small networks in its place (the pair's own
  # networks compile for minutes with XLA's optimisations off), run in this
  # process (run.py reading a config file's variant: tests/test_run.py).
  config = _pair_config('resnet56', 'resnet20', 'quick')
  config.data_dir = str(tmp_path / 'data')
  config.teacher.model = config.student.model = 'resnet8'
  config.plots = False
  experiment.run(config, str(workdir))
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['dataset'] == 'cifar100'
  assert 'cifar-100-python.tar.gz' in results['data_source']
  stages = results['stages']
  assert set(stages) == {'teacher', 'distill', 'scratch'}
  assert stages['distill']['teacher_logits'] == 'online'  # Augmented.
  assert stages['teacher']['params'] == 83_892  # RepDistiller's resnet8.
  with open(workdir / 'metrics.jsonl') as f:
    first = json.loads(f.readline())
  assert first['train/count'] == 2 * 64 and first['test/count'] == 128


def _group(method, distilled, scratch=(0.70, 0.72), teacher=(0.75, 0.77)):
  from kd_jax import stats  # pylint: disable=g-import-not-at-top
  group = {'base': method, 'seeds': [0, 1]}
  for role, values in (('teacher', teacher), ('distilled', distilled),
                       ('scratch', scratch)):
    group[f'{role}_mean'], group[f'{role}_ci'] = stats.mean_ci(list(values))
  group['p_value'] = stats.paired_test(list(distilled), list(scratch)).p_value
  return group


def test_pairs_table_has_the_literature_layout():
  from kd_jax import compare  # pylint: disable=g-import-not-at-top
  table = compare.pairs_table({
      ('resnet56', 'resnet20'): [_group('kd', (0.71, 0.74)),
                                 _group('dkd', (0.73, 0.75))],
      ('vgg13', 'vgg8'): [_group('kd', (0.72, 0.73))]})
  lines = table.splitlines()
  assert lines[0] == '| | resnet56 → resnet20 | vgg13 → vgg8 |'
  # mean ± half width of the t interval over two seeds: 12.706 * sd / sqrt 2.
  assert lines[2] == '| teacher | 76.00 ± 12.71 | 76.00 ± 12.71 |'
  assert lines[3].startswith('| student (scratch) | 71.00 ± 12.71 |')
  assert lines[4].startswith('| `kd` | 72.50 ± 19.06 (p ')
  assert lines[5].endswith('| - |')  # dkd did not run on vgg13 -> vgg8.
  assert 'over 2 seeds' in table


# benchmark_cifar100.py with resnet8 in every pair's place (the pair's own
# networks compile for minutes with XLA's optimisations off): the command's
# own main, in a process of its own, as its flags are absl's global ones.
_SMALL_BENCHMARK = r'''
import sys
sys.path.insert(0, sys.argv.pop(1))
from experiments.cifar100 import resnet56_resnet20 as pair
pair_config = pair.get_config


def small_networks(arg):
  config = pair_config(arg)
  config.teacher.model = config.student.model = 'resnet8'
  config.plots = False
  return config


pair.get_config = small_networks
from kd_jax import benchmark_main
benchmark_main.console_main()
'''


def _benchmark(*args):
  return subprocess.run([sys.executable, '-c', _SMALL_BENCHMARK, ROOT, *args],
                        capture_output=True, text=True, timeout=600,
                        check=False)


def test_benchmark_command_runs_a_pair_and_writes_the_table(tmp_path):
  # The documented command end to end: one pair, kd, two seeds, :quick, on
  # a synthetic archive.
  write_cifar(str(tmp_path / 'data'), 'cifar100', num=128)
  workdir = tmp_path / 'bench'
  result = _benchmark(
      '--pairs=resnet56_resnet20', '--methods=kd', '--seeds=0,1',
      '--variant=quick', f'--data_dir={tmp_path / "data"}',
      f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (workdir / 'cifar100.md').read_text().splitlines()
  assert result.stdout.splitlines()[:5] == lines[:5]
  assert lines[0] == '| | resnet56 → resnet20 |'
  assert lines[2].startswith('| teacher | ')
  assert lines[3].startswith('| student (scratch) | ')
  assert lines[4].startswith('| `kd` | ') and '(p ' in lines[4]
  # One teacher (seed 0) for both seeds, as the literature distils them.
  pair_dir = workdir / 'resnet56_resnet20'
  assert len(os.listdir(pair_dir / 'teachers')) == 1
  # A kd run and a scratch run per seed, each on the archive.
  for kind in ('runs', 'scratch'):
    results = [json.loads(p.read_text())
               for p in (pair_dir / kind).glob('*/results.json')]
    assert sorted(r['seed'] for r in results) == [0, 1]
    assert all('cifar-100-python.tar.gz' in r['data_source']
               for r in results)


def test_benchmark_command_refuses_an_unknown_pair_before_any_work(tmp_path):
  result = _benchmark('--pairs=resnet56_resnet21',
                      f'--workdir={tmp_path / "bench"}')
  assert result.returncode == 2
  assert "--pairs: unknown pair 'resnet56_resnet21'" in result.stderr
  assert not os.listdir(tmp_path)
