"""Tests for the objective terms the methods' records build.

Every term of `kd_jax.methods.TERMS` (a new method's included), built by
its record from its default config section on inputs made from the record
(the layers it reads, its module's output, several teachers' logits), runs
with and without `jit`; the teacher's outputs get exactly zero gradient and
padded rows none. The terms of the papers implemented here are also checked
against the loss function each wraps and against the float64 NumPy
references of tests/test_losses.py and tests/test_methods.py. Then the
objective: `weighted_sum`, `build_objective` from an experiment config, and
DKD's warm-up.

Inputs have the shapes of tests/test_methods.py's table, so that a run of
both files compiles each eager operation once.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from experiments import seed
from kd_jax import losses
from kd_jax import methods
from kd_jax import objective
from kd_jax.methods import at
from kd_jax.methods import dkd
from kd_jax.methods import fitnets
from kd_jax.methods import multi_teacher
from kd_jax.methods import pkt
from kd_jax.methods import rkd
from test_losses import _np_distillation
from test_losses import _np_hard
from test_methods import _np_attention_transfer
from test_methods import _np_dkd
from test_methods import _np_hint
from test_methods import _np_multi_teacher
from test_methods import _np_pkt
from test_methods import _np_rkd

Outputs = objective.Outputs

_BATCH = 6
_NUM_CLASSES = 10
_NUM_TEACHERS = 3
_MASK = np.array([1, 0, 1, 1, 0, 1], np.float32)
_KEEP = _MASK.astype(bool)
_EPOCH = 5  # DKD's warm-up factor: 5 / 20.
# Student and teacher shapes of the layers a term reads (the relational
# terms flatten theirs to [B, 5] and [B, 7]); other terms get the default.
_FEATURES = {
    'fitnets': ((_BATCH, 4, 4, 3), (_BATCH, 4, 4, 3)),
    'rkd': ((_BATCH, 1, 1, 5), (_BATCH, 1, 1, 7)),
    'pkt': ((_BATCH, 1, 1, 5), (_BATCH, 1, 1, 7)),
    'fsp': ((_BATCH, 4, 4, 3), (_BATCH, 4, 4, 3)),  # Equal channels.
}
_DEFAULT_FEATURES = ((_BATCH, 4, 4, 3), (_BATCH, 4, 4, 5))
# Settings other than the defaults, where those do not fit these sizes: a
# term with memory (CRD) keeps one of _MEMORY_EXAMPLES training examples.
_OVERRIDES = {'crd': {'nce_k': 4, 'feat_dim': 5}}
_MEMORY_EXAMPLES = 40


def _section(name):
  """The term's section at its defaults, `_OVERRIDES` applied."""
  return methods.default_section(name, **_OVERRIDES.get(name, {}))


def _build_term(name):
  """The term `name` from `_section(name)`; a term that reads what a
  preparation stage trained gets that stage's module at its initial
  parameters (for the teacher layers' shapes here)."""
  record, section = methods.TERMS[name], _section(name)
  if not record.prepared_by:
    return record.loss(section)
  prepared = methods.PREPARATION_TERMS[record.prepared_by]
  teacher_shape = _FEATURES.get(name, _DEFAULT_FEATURES)[1][1:]
  layers = prepared.teacher_layers(section)
  module = prepared.module(section, [], [teacher_shape for _ in layers])
  params = module.init(jax.random.PRNGKey(0), [], [
      np.zeros((1, *teacher_shape), np.float32) for _ in layers])['params']
  return record.loss(section, params)


def _inputs(name, seed_=0):
  """`(student, teacher, batch)` for the term `name` at its default section:
  logits, the layers its record says it reads, and its module's output."""
  record = methods.TERMS[name]
  section = _section(name)
  rng = np.random.default_rng(seed_)

  def normal(shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  student_shape, teacher_shape = _FEATURES.get(name, _DEFAULT_FEATURES)
  teacher_layers = record.teacher_layers(section)
  modules = {}
  if record.module is not None:
    # The student layers mapped to the teacher layers' shapes: FitNets'
    # regressor gives the maps; VID's a mean map and per-channel variances.
    modules[name] = [normal(teacher_shape) for _ in teacher_layers]
    if name == 'vid':
      modules[name] = [(mean, 1.0 + np.abs(normal(teacher_shape[-1:])))
                       for mean in modules[name]]
    if name == 'ft':  # The translator's factor map.
      modules[name] = normal(teacher_shape)
    if name == 'crd':  # The heads' unit vectors, student's and teacher's.
      modules[name] = tuple(
          v / np.linalg.norm(v, axis=1, keepdims=True)
          for v in (normal((_BATCH, section.feat_dim)) for _ in range(2)))
  student = Outputs(
      normal((_BATCH, _NUM_CLASSES), 3.0),
      {layer: normal(student_shape)
       for layer in record.student_layers(section)}, modules)
  teacher = Outputs(
      normal((_BATCH, _NUM_TEACHERS, _NUM_CLASSES) if record.several_teachers
             else (_BATCH, _NUM_CLASSES), 3.0),
      {layer: normal(teacher_shape) for layer in teacher_layers})
  batch = {'label': rng.integers(0, _NUM_CLASSES, _BATCH).astype(np.int32),
           'mask': _MASK, 'epoch': np.int32(_EPOCH)}
  if record.memory is not None:  # What the distil step adds for it.
    labels = np.arange(_MEMORY_EXAMPLES, dtype=np.int32) % _NUM_CLASSES
    index = rng.permutation(_MEMORY_EXAMPLES)[:_BATCH].astype(np.int32)
    batch.update(
        label=labels[index], index=index, rng=jax.random.PRNGKey(seed_),
        memory={name: record.memory(section, labels,
                                    jax.random.PRNGKey(1))})
  return student, teacher, batch


def _flat(x):
  return np.asarray(x).reshape(len(x), -1)


# The loss function each term wraps, called directly with the section's
# settings: `(section, student, teacher, batch) -> (loss, aux)`.
_DIRECT = {
    'ce': lambda c, s, t, b: (losses.hard_label_loss(
        s.logits, b['label'], weights=b['mask']), {}),
    'kd': lambda c, s, t, b: (losses.distillation_loss(
        s.logits, t.logits, c.temperature, t2_scaling=c.t2_scaling,
        form=c.form, weights=b['mask']), {}),
    'dkd': lambda c, s, t, b: (lambda loss, aux: (
        dkd.warmup_factor(b['epoch'], c.warmup_epochs) * loss, aux))(
            *dkd.dkd_loss(s.logits, t.logits, b['label'],
                          tckd_weight=c.tckd_weight,
                          nckd_weight=c.nckd_weight,
                          temperature=c.temperature, weights=b['mask'])),
    'fitnets': lambda c, s, t, b: fitnets.hint_loss(
        s.modules['fitnets'][0], t.features['conv2'], weights=b['mask']),
    'at': lambda c, s, t, b: at.multi_layer_attention_transfer_loss(
        [(s.features['conv2'], t.features['conv2'])], p=c.p,
        weights=b['mask']),
    'rkd': lambda c, s, t, b: rkd.rkd_loss(
        _flat(s.features['conv2']), _flat(t.features['conv2']),
        distance_weight=c.distance_weight, angle_weight=c.angle_weight,
        weights=b['mask']),
    'pkt': lambda c, s, t, b: pkt.pkt_loss(
        _flat(s.features['conv2']), _flat(t.features['conv2']), eps=c.eps,
        weights=b['mask']),
    'multi_teacher': lambda c, s, t, b: (
        multi_teacher.multi_teacher_distillation_loss(
            s.logits, t.logits, c.temperature, t2_scaling=c.t2_scaling,
            weights=b['mask'])),
}


def _reference(name, c, s, t, b):
  """The term's value from the float64 NumPy references, on the rows of
  weight 1 (the mask is 0/1)."""
  labels = b['label'][_KEEP]
  if name == 'ce':
    return np.mean(_np_hard(s.logits[_KEEP], labels))
  if name == 'kd':
    return np.mean(_np_distillation(s.logits[_KEEP], t.logits[_KEEP],
                                    c.temperature, c.t2_scaling, c.form))
  if name == 'dkd':
    tckd, nckd = _np_dkd(s.logits[_KEEP], t.logits[_KEEP], labels,
                         c.temperature)
    warmup = min(b['epoch'] / c.warmup_epochs, 1.0)
    return warmup * c.temperature**2 * np.mean(
        c.tckd_weight * tckd + c.nckd_weight * nckd)
  if name == 'multi_teacher':
    return np.mean(_np_multi_teacher(s.logits[_KEEP], t.logits[_KEEP],
                                     c.temperature, None, c.t2_scaling))
  if name == 'fitnets':
    return np.mean(_np_hint(s.modules['fitnets'][0][_KEEP],
                            t.features['conv2'][_KEEP]))
  student, teacher = s.features['conv2'][_KEEP], t.features['conv2'][_KEEP]
  if name == 'at':
    return np.mean(_np_attention_transfer(student, teacher, c.p))
  if name == 'rkd':
    distance, angle = _np_rkd(student, teacher)
    return c.distance_weight * distance + c.angle_weight * angle
  if name == 'pkt':
    return _np_pkt(student, teacher, c.eps)
  raise ValueError(name)


@functools.cache
def _value_aux_and_grads(name):
  """Jitted `(student, teacher, batch) -> (loss, aux, (student grads,
  teacher grads))` of the term `name` built from its default section."""
  term = _build_term(name)
  grad_fn = jax.value_and_grad(term, argnums=(0, 1), has_aux=True)

  def evaluate(student, teacher, batch):
    (value, aux), grads = grad_fn(student, teacher, batch)
    return value, aux, grads

  return jax.jit(evaluate)


def _assert_aux_equal(got, expected, rtol):
  assert set(got) == set(expected), (set(got), set(expected))
  for key in expected:
    for g, e in zip(jax.tree.leaves(got[key]), jax.tree.leaves(expected[key])):
      np.testing.assert_allclose(g, e, rtol=rtol, err_msg=key)


class TermsTest(parameterized.TestCase):

  def test_the_papers_terms_are_registered(self):
    self.assertContainsSubset(_DIRECT, methods.TERMS)

  def test_defaults_are_the_papers(self):
    expected = {
        'ce': {'weight': 1.0},
        'kd': {'weight': 0.9, 'temperature': 4.0, 't2_scaling': True,
               'form': 'kl'},
        'dkd': {'weight': 1.0, 'tckd_weight': 1.0, 'nckd_weight': 8.0,
                'temperature': 4.0, 'warmup_epochs': 20},
        'at': {'weight': 1000.0, 'p': 2.0},
        'rkd': {'weight': 1.0, 'distance_weight': 25.0, 'angle_weight': 50.0},
        'fitnets': {'weight': 100.0},
        'pkt': {'eps': 1e-7},
        'multi_teacher': {'temperature': 4.0, 't2_scaling': True,
                          'teacher_weights': ''},
    }
    for name, settings in expected.items():
      section = methods.default_section(name)
      for key, value in settings.items():
        with self.subTest(term=name, setting=key):
          self.assertEqual(section[key], value)

  @parameterized.parameters(*sorted(_DIRECT))
  def test_term_is_its_loss(self, name):
    section = methods.default_section(name)
    term = methods.TERMS[name].loss(section)
    student, teacher, batch = _inputs(name)
    value, aux = term(student, teacher, batch)
    direct_value, direct_aux = _DIRECT[name](section, student, teacher, batch)
    np.testing.assert_allclose(value, direct_value, rtol=1e-6)
    _assert_aux_equal(aux, direct_aux, rtol=1e-6)
    np.testing.assert_allclose(
        value, _reference(name, section, student, teacher, batch), rtol=1e-4,
        atol=1e-7)

  # Every registered term, a new method's included.
  @parameterized.parameters(*sorted(methods.TERMS))
  def test_term_under_jit_with_a_frozen_teacher(self, name):
    term = _build_term(name)
    student, teacher, batch = _inputs(name)
    value, aux = term(student, teacher, batch)
    self.assertEqual(np.shape(value), ())
    self.assertIsInstance(aux, dict)
    jit_value, jit_aux, (student_grads, teacher_grads) = (
        _value_aux_and_grads(name)(student, teacher, batch))
    np.testing.assert_allclose(jit_value, value, rtol=1e-5)
    _assert_aux_equal(jit_aux, aux, rtol=1e-5)
    # The gradients of the teacher's outputs are exactly 0.
    for grad in jax.tree.leaves(teacher_grads):
      np.testing.assert_array_equal(grad, 0.0)
    student_grads = jax.tree.leaves(student_grads)
    self.assertTrue(any(np.any(grad != 0) for grad in student_grads))
    for grad in student_grads:
      self.assertTrue(np.all(np.isfinite(grad)))
      if np.ndim(grad) and np.shape(grad)[0] == _BATCH:  # Not VID's variance.
        np.testing.assert_array_equal(grad[~_KEEP], 0.0)  # Padded rows.

  def test_multi_teacher_with_one_teacher_is_kd(self):
    student, teacher, batch = _inputs('kd')
    kd_term, multi_teacher_term = (
        methods.TERMS[name].loss(methods.default_section(name))
        for name in ('kd', 'multi_teacher'))
    np.testing.assert_allclose(
        multi_teacher_term(
            student, Outputs(teacher.logits[:, None]), batch)[0],
        kd_term(student, teacher, batch)[0], rtol=1e-6)


class DKDWarmupTest(parameterized.TestCase):

  def test_term_scales_with_the_epoch(self):
    student, teacher, batch = _inputs('dkd')
    warm = methods.TERMS['dkd'].loss(methods.default_section('dkd'))
    cold = methods.TERMS['dkd'].loss(
        methods.default_section('dkd', warmup_epochs=0))
    no_warmup, no_warmup_aux = cold(student, teacher, batch)
    self.assertGreater(no_warmup, 0.0)
    # The reference code's warm-up: min(epoch / 20, 1), epochs from 1.
    for epoch, factor in ((1, 0.05), (10, 0.5), (20, 1.0), (40, 1.0)):
      at_epoch = {**batch, 'epoch': np.int32(epoch)}
      value, aux = warm(student, teacher, at_epoch)
      jit_value, jit_aux, _ = _value_aux_and_grads('dkd')(
          student, teacher, at_epoch)
      with self.subTest(epoch=epoch):
        np.testing.assert_allclose(value, factor * no_warmup, rtol=1e-6)
        np.testing.assert_allclose(jit_value, factor * no_warmup, rtol=1e-5)
        # The logged TCKD and NCKD are before the warm-up.
        _assert_aux_equal(aux, no_warmup_aux, rtol=1e-6)
        _assert_aux_equal(jit_aux, no_warmup_aux, rtol=1e-5)


class ObjectiveTest(parameterized.TestCase):

  def test_weighted_sum(self):
    student, teacher, batch = _inputs('kd')
    ce, kd = (methods.TERMS[name].loss(methods.default_section(name))
              for name in ('ce', 'kd'))
    loss, aux = objective.weighted_sum([('ce', 0.1, ce), ('kd', 0.7, kd)])(
        student, teacher, batch)
    ce_value, _ = ce(student, teacher, batch)
    kd_value, _ = kd(student, teacher, batch)
    self.assertEqual(set(aux), {'ce_loss', 'kd_loss'})
    np.testing.assert_allclose(aux['ce_loss'], ce_value, rtol=1e-6)
    np.testing.assert_allclose(aux['kd_loss'], kd_value, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.1 * ce_value + 0.7 * kd_value,
                               rtol=1e-6)

  def test_weighted_sum_reports_each_terms_aux(self):
    logits, logit_teacher, batch = _inputs('dkd')
    features, feature_teacher, _ = _inputs('rkd')
    student = Outputs(logits.logits, features.features)
    teacher = Outputs(logit_teacher.logits, feature_teacher.features)
    ce_term, dkd_term, rkd_term = (
        methods.TERMS[name].loss(methods.default_section(name))
        for name in ('ce', 'dkd', 'rkd'))
    loss, aux = objective.weighted_sum(
        [('ce', 0.5, ce_term), ('dkd', 2.0, dkd_term),
         ('rkd', 0.25, rkd_term)])(student, teacher, batch)
    ce_value, _ = ce_term(student, teacher, batch)
    dkd_value, dkd_aux = dkd_term(student, teacher, batch)
    rkd_value, rkd_aux = rkd_term(student, teacher, batch)
    self.assertEqual(set(aux), {'ce_loss', 'dkd_loss', 'dkd/tckd',
                                'dkd/nckd', 'rkd_loss', 'rkd/distance',
                                'rkd/angle'})
    np.testing.assert_allclose(
        loss, 0.5 * ce_value + 2.0 * dkd_value + 0.25 * rkd_value, rtol=1e-6)
    np.testing.assert_allclose(aux['ce_loss'], ce_value, rtol=1e-6)
    np.testing.assert_allclose(aux['dkd_loss'], dkd_value, rtol=1e-6)
    np.testing.assert_allclose(aux['rkd_loss'], rkd_value, rtol=1e-6)
    for key in dkd_aux:
      np.testing.assert_allclose(aux[f'dkd/{key}'], dkd_aux[key], rtol=1e-6)
    for key in rkd_aux:
      np.testing.assert_allclose(aux[f'rkd/{key}'], rkd_aux[key], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'at least one term'):
      objective.weighted_sum([])

  def test_build_objective_from_an_experiment_config(self):
    config = seed.get_config('quick')
    config = seed.with_method(config, 'at', ce={'weight': 1.0},
                              at=seed.feature_layers(config))
    self.assertEqual(methods.term_names(config.distill), ('ce', 'at'))
    student, teacher, batch = _inputs('at')
    loss, aux = methods.build_objective(config.distill)(
        student, teacher, batch)
    ce_value, _ = _DIRECT['ce'](config.distill.ce, student, teacher, batch)
    at_value, _ = _DIRECT['at'](config.distill.at, student, teacher, batch)
    self.assertEqual(set(aux), {'ce_loss', 'at_loss'})
    np.testing.assert_allclose(aux['ce_loss'], ce_value, rtol=1e-6)
    np.testing.assert_allclose(aux['at_loss'], at_value, rtol=1e-6)
    np.testing.assert_allclose(
        loss, 1.0 * ce_value + config.distill.at.weight * at_value,
        rtol=1e-6)
    self.assertEqual(config.distill.at.weight, 1000.0)

  def test_default_section_rejects_unknown_settings(self):
    with self.assertRaisesRegex(ValueError, 'alpha'):
      methods.default_section('dkd', alpha=1.0)


if __name__ == '__main__':
  absltest.main()
