"""Tests for `kd_jax.methods.crd` (contrastive representation distillation,
Tian et al., ICLR 2020)."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import checkpoints
from kd_jax import methods
from kd_jax import models
from kd_jax import objective
from kd_jax import train
from kd_jax.methods import crd
from method_checks import assert_gradient_matches_finite_differences
from method_checks import assert_rejected
from method_checks import cifar_pair_config
from method_checks import quick_configs

_MASK = np.array([1, 1, 0, 1], np.float32)
_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0], np.int32)


# --- float64 NumPy references, written from the paper's equations. ----------


def _np_unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_nce(h, num_data):
  """Eq. 18 per example: -log h(positive) - sum log(1 - h(negative)), with
  h(x) = x / (x + K / N + eps) (the authors' eps)."""
  k = h.shape[1] - 1
  noise = k / num_data
  positive = np.log(h[:, 0] / (h[:, 0] + noise + 1e-7))
  negatives = np.log(noise / (h[:, 1:] + noise + 1e-7)).sum(axis=1)
  return -(positive + negatives)


def _np_crd(v_s, v_t, memory, index, contrast, temperature, momentum,
            keep=None):
  """`(loss, student part, teacher part, new memory)` in float64."""
  v_s, v_t = np.float64(v_s), np.float64(v_t)
  bank_s = np.float64(memory['student'])
  bank_t = np.float64(memory['teacher'])
  z = np.float64(memory['normalizers'])
  num_data = bank_s.shape[0]
  keep = np.ones(len(v_s), bool) if keep is None else keep
  parts, normalizers = [], []
  for anchor, bank, z_old in ((v_s, bank_t, z[0]), (v_t, bank_s, z[1])):
    scores = np.exp(np.einsum('bkd,bd->bk', bank[contrast], anchor)
                    / temperature)
    z_new = scores[keep].mean() * num_data if z_old < 0 else z_old
    normalizers.append(z_new)
    parts.append(_np_nce(scores / z_new, num_data)[keep].mean())
  new = {}
  for name, bank, v in (('student', bank_s, v_s), ('teacher', bank_t, v_t)):
    bank = bank.copy()
    moved = _np_unit(momentum * bank[index] + (1 - momentum) * v)
    bank[index[keep]] = moved[keep]
    new[name] = bank
  new['normalizers'] = np.array(normalizers)
  return parts[0] + parts[1], parts[0], parts[1], new


def _inputs(seed=0, batch=4, dim=5, negatives=3):
  rng = np.random.default_rng(seed)
  memory = {
      'student': _np_unit(rng.standard_normal((len(_LABELS), dim))),
      'teacher': _np_unit(rng.standard_normal((len(_LABELS), dim))),
      'normalizers': -np.ones(2),
      'labels': _LABELS,
  }
  memory = {k: np.asarray(v, np.int32 if k == 'labels' else np.float32)
            for k, v in memory.items()}
  v_s, v_t = (_np_unit(rng.standard_normal((batch, dim))).astype(np.float32)
              for _ in range(2))
  index = rng.permutation(len(_LABELS))[:batch].astype(np.int32)
  contrast = np.concatenate(
      [index[:, None], rng.integers(0, len(_LABELS), (batch, negatives))],
      axis=1).astype(np.int32)
  return v_s, v_t, memory, index, contrast


# --- the loss and the memory. -------------------------------------------------


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('z_set', [False, True])
def test_loss_and_new_memory_match_the_equations(jit, z_set):
  v_s, v_t, memory, index, contrast = _inputs()
  if z_set:
    memory['normalizers'] = np.array([3.0, 7.0], np.float32)
  loss_fn = functools.partial(crd.crd_loss, temperature=0.5, momentum=0.3,
                              weights=_MASK)
  if jit:
    loss_fn = jax.jit(loss_fn)
  loss, aux, new = loss_fn(v_s, v_t, memory, index, contrast)
  expected, student, teacher, new_expected = _np_crd(
      v_s, v_t, memory, index, contrast, 0.5, 0.3, _MASK.astype(bool))
  np.testing.assert_allclose(loss, expected, rtol=2e-5)
  np.testing.assert_allclose(aux['student'], student, rtol=2e-5)
  np.testing.assert_allclose(aux['teacher'], teacher, rtol=2e-5)
  for name in ('student', 'teacher', 'normalizers'):
    np.testing.assert_allclose(new[name], new_expected[name], rtol=2e-5,
                               atol=1e-7)
  np.testing.assert_array_equal(new['labels'], memory['labels'])
  # The masked row's bank rows did not move; the others are unit vectors.
  for name in ('student', 'teacher'):
    np.testing.assert_array_equal(new[name][index[2]],
                                  memory[name][index[2]])
    np.testing.assert_allclose(
        np.linalg.norm(new[name][index[_MASK == 1]], axis=1), 1.0, rtol=1e-6)


def test_a_batch_of_one_and_a_masked_row_holding_nan():
  v_s, v_t, memory, index, contrast = _inputs(1, batch=1)
  loss, _, _ = crd.crd_loss(v_s, v_t, memory, index, contrast,
                            temperature=0.07, momentum=0.5)
  expected = _np_crd(v_s, v_t, memory, index, contrast, 0.07, 0.5)[0]
  np.testing.assert_allclose(loss, expected, rtol=5e-5)
  v_s, v_t, memory, index, contrast = _inputs(2)
  v_s[2] = np.nan
  loss, _, new = crd.crd_loss(v_s, v_t, memory, index, contrast,
                              weights=_MASK)
  assert np.isfinite(loss)
  assert np.all(np.isfinite(new['student']))


def test_gradient_matches_finite_differences_and_skips_masked_rows():
  v_s, v_t, memory, index, contrast = _inputs(3)
  memory['normalizers'] = np.array([2.0, 0.5], np.float32)  # Z already set.
  memory64 = {k: (v if k == 'labels' else np.float64(v))
              for k, v in memory.items()}

  def loss(embeddings):
    return crd.crd_loss(*embeddings, memory64, index, contrast,
                        temperature=0.5, momentum=0.5, weights=_MASK)[0]

  grad = assert_gradient_matches_finite_differences(
      loss, (v_s, v_t), zero_rows=_MASK)
  assert all(np.any(np.asarray(g) != 0) for g in grad)


def test_contrast_sets_are_the_example_then_distinct_other_classes():
  index = np.array([0, 4, 9], np.int32)
  label = _LABELS[index]
  key = jax.random.PRNGKey(0)
  contrast = np.asarray(jax.jit(
      crd.contrast_indices, static_argnums=4)(key, index, label, _LABELS, 6))
  assert contrast.shape == (3, 7)
  np.testing.assert_array_equal(contrast[:, 0], index)
  for row, own in zip(contrast, label):
    negatives = row[1:]
    assert len(set(negatives.tolist())) == 6  # Without replacement.
    assert np.all(_LABELS[negatives] != own)
  again = crd.contrast_indices(key, index, label, _LABELS, 6)
  np.testing.assert_array_equal(again, contrast)
  other = crd.contrast_indices(jax.random.PRNGKey(1), index, label, _LABELS, 6)
  assert np.any(np.asarray(other) != contrast)
  # Class 3 has 2 examples: 10 of other classes, all of them drawn.
  full = crd.contrast_indices(key, np.array([9]), np.array([3]), _LABELS, 10)
  assert sorted(np.asarray(full)[0, 1:].tolist()) == [
      i for i in range(12) if _LABELS[i] != 3]


@pytest.mark.parametrize('jit', [False, True])
def test_kth_smallest_and_smallest_keys_match_a_sort(jit):
  rng = np.random.default_rng(0)
  kth = jax.jit(crd.kth_smallest, static_argnums=1) if jit else crd.kth_smallest
  smallest = (jax.jit(crd.smallest_keys, static_argnums=1) if jit
              else crd.smallest_keys)
  for shape, high in (((3, 50), 2**32), ((2, 40), 5), ((1, 7), 2**31)):
    keys = rng.integers(0, high, shape, dtype=np.uint64).astype(np.uint32)
    if high == 2**32:
      keys[0, :3] = 2**32 - 1  # The largest key, as same-class examples get.
    for k in (1, shape[1] // 2, shape[1]):
      np.testing.assert_array_equal(kth(keys, k),
                                    np.sort(keys, axis=1)[:, k - 1])
      # Expected: a stable sort's first k positions (ties: lower first).
      expected = np.zeros(shape, bool)
      for row, order in enumerate(np.argsort(keys, axis=1, kind='stable')):
        expected[row, order[:k]] = True
      np.testing.assert_array_equal(smallest(keys, k), expected)


def test_negatives_are_uniform_over_other_classes():
  # 2,000 draws of 6 of the 8 examples outside class 0: each is drawn with
  # probability 6/8, and each pair together with probability 6/8 * 5/7.
  index = np.zeros(2000, np.int32)
  label = np.zeros(2000, np.int32)
  contrast = np.asarray(jax.jit(crd.contrast_indices, static_argnums=4)(
      jax.random.PRNGKey(3), index, label, _LABELS, 6))
  others = np.flatnonzero(_LABELS != 0)
  drawn = np.zeros((2000, len(_LABELS)), bool)
  np.put_along_axis(drawn, contrast[:, 1:], True, axis=1)
  assert drawn.sum(axis=1).tolist() == [6] * 2000
  assert not drawn[:, _LABELS == 0].any()
  frequency = drawn[:, others].mean(axis=0)
  # 4 standard errors of a Bernoulli(3/4) mean over 2,000 draws.
  np.testing.assert_allclose(frequency, 0.75,
                             atol=4 * np.sqrt(0.75 * 0.25 / 2000))
  together = (drawn[:, others, None] & drawn[:, None, others]).mean(axis=0)
  pair = 6 / 8 * 5 / 7
  off_diagonal = together[~np.eye(len(others), dtype=bool)]
  np.testing.assert_allclose(off_diagonal, pair,
                             atol=4 * np.sqrt(pair * (1 - pair) / 2000))


@pytest.mark.parametrize('jit', [False, True])
def test_scores_from_the_whole_bank_equal_the_gathered_rows(jit, monkeypatch):
  v_s, _, memory, _, contrast = _inputs(4, batch=3, negatives=5)
  bank = memory['teacher']

  def scores_and_gradient():
    fn = lambda anchor: crd.contrast_scores(bank, contrast, anchor, 0.3)
    fn = jax.jit(fn) if jit else fn
    gradient = jax.grad(lambda a: jnp.sum(fn(a) * weights))(v_s)
    return np.asarray(fn(v_s)), np.asarray(gradient)

  weights = np.arange(contrast.size, dtype=np.float32).reshape(contrast.shape)
  whole_bank = scores_and_gradient()  # 12 rows <= 8 x 6: the whole bank.
  monkeypatch.setattr(crd, 'WHOLE_BANK_RATIO', 1)  # 12 > 6: gathered.
  gathered = scores_and_gradient()
  expected = np.exp(np.einsum('bkd,bd->bk', np.float64(bank)[contrast],
                              np.float64(v_s)) / 0.3)
  expected_gradient = np.einsum('bk,bkd->bd', weights * expected / 0.3,
                                np.float64(bank)[contrast])
  for scores, gradient in (whole_bank, gathered):
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5)


def test_initial_memory_and_too_many_negatives():
  section = methods.default_section('crd', nce_k=8, feat_dim=6)
  memory = crd.METHOD.memory(section, _LABELS, jax.random.PRNGKey(0))
  bound = 1 / np.sqrt(6 / 3)
  for name in ('student', 'teacher'):
    assert memory[name].shape == (12, 6)
    assert np.all(np.abs(memory[name]) <= bound)
  assert not np.array_equal(memory['student'], memory['teacher'])
  np.testing.assert_array_equal(memory['normalizers'], [-1, -1])
  assert crd.fewest_negatives(_LABELS) == 8  # Classes 0, 1, 2 have 4, 3, 3.
  with pytest.raises(ValueError, match='nce_k = 9 negatives.*only 8'):
    crd.METHOD.memory(methods.default_section('crd', nce_k=9), _LABELS,
                      jax.random.PRNGKey(0))


def test_heads_are_linear_maps_to_unit_vectors():
  heads = crd.CRDHeads(4)
  student = np.random.default_rng(0).standard_normal((3, 2, 2, 5))
  teacher = np.random.default_rng(1).standard_normal((3, 7))
  params = heads.init(jax.random.PRNGKey(0), [student], [teacher])['params']
  v_s, v_t = heads.apply({'params': params}, [student], [teacher])
  for v, x, name in ((v_s, student.reshape(3, -1), 'student_embed'),
                     (v_t, teacher, 'teacher_embed')):
    layer = params[name]
    expected = _np_unit(x @ np.float64(layer['kernel'])
                        + np.float64(layer['bias']))
    np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)
    bound = 1 / np.sqrt(x.shape[1])  # PyTorch's nn.Linear default.
    assert np.all(np.abs(layer['kernel']) <= bound)


# --- in the distil step: the teacher frozen, the memory in the state. --------


def _distil_setup():
  config = ml_collections.ConfigDict({'distill': {
      'method': 'crd', 'terms': 'ce,crd', 'teacher_logits': 'auto',
      'ce': methods.default_section('ce', weight=1.0),
      'crd': methods.default_section('crd', nce_k=5, feat_dim=8)}})
  student = models.make_model('seed_student_cnn')
  teacher = models.make_model('seed_teacher_cnn')
  labels = np.arange(16, dtype=np.int32) % 4
  heads = crd.CRDHeads(8)
  heads_params = heads.init(jax.random.PRNGKey(2),
                            [np.zeros((1, 7, 7, 32))],
                            [np.zeros((1, 7, 7, 256))])['params']
  state = train.create_train_state(
      student, jax.random.PRNGKey(0), (28, 28, 1), tx=optax.sgd(0.1),
      modules={'crd': heads_params},
      memory=methods.initial_memory(config.distill, labels,
                                    jax.random.PRNGKey(3)))
  teacher_variables = models.init_variables(teacher, jax.random.PRNGKey(1),
                                            (28, 28, 1))
  distiller = train.Distiller(
      objective=methods.build_objective(config.distill),
      teacher_apply_fn=teacher.apply, student_layers=('conv2',),
      teacher_layers=('conv2',),
      modules={'crd': (heads, ('conv2',), ('conv2',))})
  images = np.random.default_rng(0).uniform(size=(16, 28, 28, 1))
  batches = [{'image': images[i:i + 4].astype(np.float32),
              'label': labels[i:i + 4], 'index': np.arange(i, i + 4)}
             for i in (0, 4, 8)]
  return state, teacher_variables, distiller, batches


def test_step_trains_heads_moves_the_bank_and_resumes_exactly(tmp_path):
  state, teacher_variables, distiller, batches = _distil_setup()
  step = jax.jit(functools.partial(train.distill_step, distiller=distiller))
  first, metrics = step(state, batches[0], teacher_variables)
  assert np.isfinite(metrics['crd_loss']) and metrics['crd_loss'] > 0
  assert objective.NEW_MEMORY not in metrics
  bank = state.memory['crd']['student']
  moved = np.asarray(first.memory['crd']['student'])
  np.testing.assert_array_equal(moved[4:], bank[4:])  # Only rows 0..3.
  assert np.all(moved[:4] != bank[:4])
  assert np.all(np.asarray(first.memory['crd']['normalizers']) > 0)
  for name in ('student_embed', 'teacher_embed'):
    assert np.any(first.modules['crd'][name]['kernel']
                  != state.modules['crd'][name]['kernel'])

  # The teacher gets no gradient: differentiate the step's loss in it.
  def loss_in_teacher(variables):
    _, step_metrics = train.distill_step(state, batches[0], variables,
                                         distiller=distiller)
    return step_metrics['loss']
  for grad in jax.tree.leaves(
      jax.jit(jax.grad(loss_in_teacher))(teacher_variables)):
    np.testing.assert_array_equal(grad, 0.0)

  # Three steps straight, or two, a checkpoint, a restore and one more: the
  # same bits (the bank and Z are in the checkpoint; the negatives depend on
  # the step only).
  straight = first
  for batch in batches[1:]:
    straight, _ = step(straight, batch, teacher_variables)
  saved, _ = step(first, batches[1], teacher_variables)
  store = checkpoints.StageCheckpoints(str(tmp_path / 'ckpt'), keep=1)
  store.save(saved, {'count': jnp.float32(0)})
  restored, _ = store.restore(state)
  store.close()
  resumed, _ = step(restored, batches[2], teacher_variables)
  for a, b in zip(jax.tree.leaves((straight.params, straight.modules,
                                   straight.memory)),
                  jax.tree.leaves((resumed.params, resumed.modules,
                                   resumed.memory))):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path / 'ckpt')


# --- the configs. -------------------------------------------------------------


def test_configs():
  quick, strong = quick_configs('crd')
  assert quick.distill.crd.nce_k == 1024
  assert quick.distill.crd.teacher_layers == 'conv2'
  assert strong.distill.crd.teacher_layers == 'embedding'
  cifar = cifar_pair_config('crd', 'embedding', 'embedding')
  assert cifar.distill.crd.nce_k == 16384
  assert cifar.distill.crd.weight == 0.8
  for field, value, match in (
      ('nce_m', 1.5, r'config\.distill\.crd\.nce_m = 1\.5'),
      ('nce_t', 0.0, r'config\.distill\.crd\.nce_t = 0\.0'),
      ('teacher_layers', 'conv1,conv2', 'exactly one layer')):
    config = quick_configs('crd', ('quick',))[0]
    config.distill.crd[field] = value
    assert_rejected(config, match)
