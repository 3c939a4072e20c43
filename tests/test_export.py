"""Export of a finished stage (kd_jax.deploy, export.py): ONNX and jax.export
files that compute kd_jax's logits, the deployment report, and bad input
refused before anything is written."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import seed
from kd_jax import deploy
from kd_jax import deploy_report
from kd_jax import errors
from kd_jax import experiment
from kd_jax import export_main
from kd_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the exported program with JAX alone: kd_jax is never imported.
_RUN_JAX_EXPORT = r'''
import sys
import jax, numpy as np
images = np.load(sys.argv[2])
with open(sys.argv[1], 'rb') as f:
  program = jax.export.deserialize(bytearray(f.read()))
np.save(sys.argv[3], np.asarray(program.call(images)))
assert not any(name.startswith('kd_jax') for name in sys.modules)
'''


def _config(data_dir: str):
  """The quick seed protocol on tiny data; the teacher a seed_assistant_cnn
  (cheaper to train than the seed teacher, still larger than the student)."""
  config = seed.get_config('quick')
  config.data_source, config.data_dir = 'idx', data_dir
  config.teacher.model = 'seed_assistant_cnn'
  config.teacher.epochs = 1
  config.plots = False
  return config


@pytest.fixture(scope='module')
def finished(tmp_path_factory, tiny_idx_dir):
  """`(workdir, config, results)` of a finished quick run, and its export
  (`report`) of the distilled student in both formats."""
  workdir = str(tmp_path_factory.mktemp('export') / 'run')
  config = _config(tiny_idx_dir)
  results = experiment.run(config, workdir)
  report = export_main.export_stage(workdir, 'distill', 'onnx,jax',
                                    repeats=2)
  return workdir, config, results, report


def _test_split(config):
  return experiment.load_data(config).test


def _kd_jax_logits(workdir, config, results, stage, images):
  """The stage's logits computed here, independently of the export code."""
  loaded = deploy.load_stage(workdir, stage, config, results)
  return np.asarray(loaded.model.apply(loaded.variables, images,
                                       train=False))


def test_export_writes_both_files_and_the_report(finished):
  workdir, _, _, report = finished
  assert sorted(os.listdir(os.path.join(workdir, 'export'))) == [
      'distill.jax_export', 'distill.onnx', 'report.json', 'report.md']
  with open(os.path.join(workdir, 'export', 'report.json')) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  with open(os.path.join(workdir, 'export', 'report.md')) as f:
    text = f.read()
  assert 'x fewer' in text and 'latency, onnxruntime, batch 64' in text


def test_the_onnx_file_computes_kd_jax_logits_for_any_batch(finished):
  workdir, config, results, _ = finished
  images = _test_split(config).images[:37]  # Not a batch size seen before.
  expected = _kd_jax_logits(workdir, config, results, 'distill', images)
  with open(os.path.join(workdir, 'export', 'distill.onnx'), 'rb') as f:
    session = deploy.onnx_session(f.read())
  assert [i.name for i in session.get_inputs()] == ['images']
  assert session.get_inputs()[0].shape[1:] == [28, 28, 1]
  logits = session.run(['logits'], {'images': images})[0]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_the_jax_export_runs_without_kd_jax(finished, tmp_path):
  workdir, config, results, _ = finished
  images = _test_split(config).images[:5]
  np.save(tmp_path / 'images.npy', images)
  subprocess.run(
      [sys.executable, '-c', _RUN_JAX_EXPORT,
       os.path.join(workdir, 'export', 'distill.jax_export'),
       str(tmp_path / 'images.npy'), str(tmp_path / 'logits.npy')],
      check=True, cwd=tmp_path, env={**os.environ, 'PYTHONPATH': ''})
  np.testing.assert_allclose(
      np.load(tmp_path / 'logits.npy'),
      _kd_jax_logits(workdir, config, results, 'distill', images),
      rtol=1e-6, atol=1e-6)


def test_the_report_compares_the_student_with_its_teacher(finished):
  _, config, results, report = finished
  student, teacher = report['student'], report['teacher']
  assert (student['model'], teacher['model']) == ('seed_student_cnn',
                                                  'seed_assistant_cnn')
  # The accuracies are the run's own, recomputed from the checkpoints.
  assert student['test_accuracy'] == pytest.approx(
      results['distilled_accuracy'], abs=1e-6)
  assert teacher['test_accuracy'] == pytest.approx(
      results['teacher_accuracy'], abs=1e-6)
  assert student['params'] == results['stages']['distill']['params']
  assert student['param_bytes'] == 4 * student['params']
  ratios = report['ratios']
  assert ratios['params'] == pytest.approx(teacher['params']
                                           / student['params'])
  assert ratios['accuracy_points'] == pytest.approx(
      100 * (student['test_accuracy'] - teacher['test_accuracy']))
  for runtime in ('jax', 'onnxruntime'):
    for batch in ('1', '64'):
      assert student['latency_ms'][runtime][batch] > 0
      assert ratios['speedup'][runtime][batch] == pytest.approx(
          teacher['latency_ms'][runtime][batch]
          / student['latency_ms'][runtime][batch])
  for fmt in ('onnx', 'jax'):
    assert student['checks'][fmt]['argmax_agreement'] == 1.0
    assert student['checks'][fmt]['max_abs_diff'] < 1e-4
  assert student['onnx_bytes'] == os.path.getsize(
      os.path.join(report['workdir'], 'export', 'distill.onnx'))
  assert report['test_examples'] == 200


def test_flops_per_image_counts_a_dense_layer():
  # x @ W + b for one image: 2 * 784 * 10 multiply-adds and 10 additions.
  weights = jax.random.normal(jax.random.PRNGKey(0), (784, 10))
  flops = deploy_report.flops_per_image(
      lambda images: images.reshape(images.shape[0], -1) @ weights + 1.0,
      (28, 28, 1))
  assert flops == pytest.approx(2 * 784 * 10 + 10, rel=0.01)


@pytest.mark.parametrize('name', ['resnet20', 'wrn_16_1', 'shufflenetv1'])
def test_zoo_blocks_convert_to_onnx_faithfully(name):
  # Residual blocks' batch norms, ShuffleNet's average pooling.
  model = models.make_model(name, input_mean=(0.5, 0.4, 0.3),
                            input_std=(0.2, 0.25, 0.3), num_classes=100)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
  loaded = deploy.LoadedStage('distill', name, model, variables, {},
                              (32, 32, 3))
  program = deploy.inference_program(loaded)
  images = np.random.RandomState(0).rand(3, 32, 32, 3).astype(np.float32)
  expected = deploy_report.jax_logits(program, images)
  session = deploy.onnx_session(deploy.to_onnx(program, (32, 32, 3), name))
  scale = np.abs(expected).max()
  np.testing.assert_allclose(deploy.run_onnx(session, images), expected,
                             rtol=1e-5, atol=1e-5 * scale)


def _unfinished_copy(workdir, tmp_path):
  """A copy of `workdir` whose scratch stage is not finished."""
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('export'))
  results = json.loads((copy / 'results.json').read_text())
  del results['stages']['scratch']
  (copy / 'results.json').write_text(json.dumps(results))
  return str(copy)


@pytest.mark.parametrize('stage, formats, match', [
    ('distill', 'onnx,tflite', r'--format=onnx,tflite: expected a '
     r'comma-separated list of onnx, jax \(unknown: tflite\)'),
    ('distill', ',', '--format=,: expected a comma-separated list'),
    ('distil', 'jax', r'--stage=distil: .* has no such stage \(its stages: '
     r'teacher, distill, scratch\)'),
    ('scratch', 'jax', r'--stage=scratch: not finished in .* \(finished: '
     r'teacher, distill\)'),
])
def test_bad_requests_are_refused_and_write_nothing(finished, tmp_path, stage,
                                                    formats, match):
  copy = _unfinished_copy(finished[0], tmp_path)
  with pytest.raises(errors.UserInputError, match=match):
    export_main.export_stage(copy, stage, formats, repeats=1)
  assert not os.path.exists(os.path.join(copy, 'export'))


@pytest.mark.parametrize('present', [[], ['config.json'], ['results.json']])
def test_a_directory_without_a_run_is_not_a_workdir(tmp_path, present):
  for name in present:
    (tmp_path / name).write_text('{}')
  with pytest.raises(errors.UserInputError, match='not a kd_jax workdir'):
    export_main.export_stage(str(tmp_path), 'distill', 'jax')
  assert sorted(os.listdir(tmp_path)) == sorted(present)


def test_onnx_without_its_packages_says_how_to_install_them(monkeypatch):
  real = deploy.importlib.util.find_spec
  monkeypatch.setattr(deploy.importlib.util, 'find_spec',
                      lambda name: None if name == 'jax2onnx' else real(name))
  with pytest.raises(errors.UserInputError,
                     match=r"needs jax2onnx; install them with pip install "
                     r"'kd_jax\[export\]', or pass --format=jax"):
    deploy.parse_formats('onnx,jax')
  assert deploy.parse_formats('jax') == ('jax',)


def test_the_command_reports_bad_input_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'export.py'),
       f'--workdir={tmp_path}', '--format=jax'],
      capture_output=True, text=True, check=False, cwd=ROOT)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == (
      f'error: --workdir={tmp_path}: not a kd_jax workdir (no config.json); '
      'pass the --workdir of a finished run.py run')
  assert os.listdir(tmp_path) == []


def test_an_export_computing_other_logits_is_refused_and_nothing_written(
    finished, tmp_path, monkeypatch):
  # A copy of the run, whose ONNX program (as the check sees it) is off by
  # 2e-4 of kd_jax's largest test logit: above the tolerance of 1e-4.
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir,
                  ignore=shutil.ignore_patterns('export'))
  run_onnx = deploy.run_onnx

  def off_by_a_little(session, images):
    logits = run_onnx(session, images)
    return logits + 2 * export_main.TOLERANCE * np.max(np.abs(logits))

  monkeypatch.setattr(deploy, 'run_onnx', off_by_a_little)
  with pytest.raises(errors.UserInputError,
                     match='--format=onnx: the exported distill stage '
                     'computes other logits than kd_jax'):
    export_main.export_stage(workdir, 'distill', 'onnx', repeats=1)
  assert not os.path.exists(os.path.join(workdir, 'export'))
  # Within the tolerance it passes, and the scale it was judged against is
  # recorded.
  monkeypatch.setattr(deploy, 'run_onnx', lambda session, images: run_onnx(
      session, images) * (1 + export_main.TOLERANCE / 2))
  report = export_main.export_stage(workdir, 'distill', 'onnx', repeats=1)
  check = report['student']['checks']['onnx']
  assert 0 < check['max_abs_diff'] <= (export_main.TOLERANCE
                                       * check['max_abs_logit'])
