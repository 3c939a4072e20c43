"""Tests for `kd_jax.augment`.

The deterministic halves (`crop_at`, `flip_where`, `mix_at`, `soft_labels`,
`normalize`) are checked against float64 NumPy references written from
torchvision's and Zhang et al.'s definitions (pad with zeros, then slice;
mirror; convex combination); the random halves by the range and frequencies
of their draws, and by the keys' determinism. Crops and flips move data
only, so they must match exactly.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import augment

_BATCH = 8
_SHAPE = (_BATCH, 6, 5, 3)  # Non-square, to tell rows from columns.
_PADDING = 2
_NUM_CLASSES = 4


# --- float64 NumPy references. ------------------------------------------------


def _np_crop(images, offsets, padding):
  """torchvision's RandomCrop at given offsets: zero-pad, then slice."""
  images = np.asarray(images, np.float64)
  _, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  return np.stack([padded[b, r:r + height, c:c + width]
                   for b, (r, c) in enumerate(np.asarray(offsets))])


def _np_flip(images, mask):
  images = np.asarray(images, np.float64)
  return np.stack([image[:, ::-1] if flip else image
                   for image, flip in zip(images, np.asarray(mask))])


def _np_one_hot(labels, num_classes):
  return np.eye(num_classes)[np.asarray(labels)]


# --- helpers. -----------------------------------------------------------------


def _images(seed=0, shape=_SHAPE):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


def _key(step=0):
  return augment.step_key(0, 0, step)


# --- crop and flip. -----------------------------------------------------------


class CropFlipTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_crop_at_matches_numpy(self, use_jit):
    images = _images()
    # Every corner, the identity window and a few others.
    offsets = np.array([[0, 0], [0, 4], [4, 0], [4, 4], [2, 2], [1, 3],
                        [3, 1], [0, 2]], np.int32)
    crop = lambda x, o: augment.crop_at(x, o, 2)
    got = _maybe_jit(crop, use_jit)(images, offsets)
    np.testing.assert_array_equal(got, _np_crop(images, offsets, 2))
    np.testing.assert_array_equal(got[4], images[4])  # Offset (p, p).

  def test_offsets_cover_the_range_uniformly(self):
    padding, draws = 4, 9000
    offsets = np.asarray(augment.crop_offsets(jax.random.PRNGKey(1), draws,
                                              padding))
    self.assertEqual(offsets.shape, (draws, 2))
    self.assertEqual(offsets.dtype, np.int32)
    for axis in range(2):
      counts = np.bincount(offsets[:, axis], minlength=2 * padding + 1)
      self.assertLen(counts, 2 * padding + 1)  # Nothing outside [0, 2p].
      # Each value has probability 1/9: count 1000, standard deviation 30.
      np.testing.assert_array_less(np.abs(counts - draws / 9), 150)
    # Rows and columns are drawn independently.
    self.assertLess(abs(np.corrcoef(offsets.T)[0, 1]), 0.05)

  @parameterized.parameters(False, True)
  def test_random_crop_is_crop_at_its_offsets(self, use_jit):
    images, key = _images(), _key()
    crop = lambda k, x: augment.random_crop(k, x, _PADDING)
    got = _maybe_jit(crop, use_jit)(key, images)
    offsets = augment.crop_offsets(key, _BATCH, _PADDING)
    np.testing.assert_array_equal(got, _np_crop(images, offsets, _PADDING))

  def test_zero_padding_returns_the_images(self):
    images = jnp.asarray(_images())
    self.assertIs(augment.random_crop(_key(), images, 0), images)

  @parameterized.parameters(False, True)
  def test_flip(self, use_jit):
    images, key = _images(), _key()
    mask = np.arange(_BATCH) % 3 == 0
    np.testing.assert_array_equal(
        _maybe_jit(augment.flip_where, use_jit)(images, mask),
        _np_flip(images, mask))
    np.testing.assert_array_equal(
        _maybe_jit(augment.random_flip, use_jit)(key, images),
        _np_flip(images, augment.flip_mask(key, _BATCH)))

  def test_flip_probability_is_one_half(self):
    mask = np.asarray(augment.flip_mask(jax.random.PRNGKey(2), 10000))
    self.assertEqual(mask.dtype, np.bool_)
    self.assertAlmostEqual(mask.mean(), 0.5, delta=0.025)  # 5 sigma.


# --- the entry point and its keys. --------------------------------------------


class AugmentTest(parameterized.TestCase):

  def test_off_is_the_identity(self):
    images = jnp.asarray(_images())
    self.assertIs(augment.augment(_key(), images), images)
    self.assertIs(
        augment.augment(_key(), images, crop_padding=0, flip=False), images)

  @parameterized.parameters(False, True)
  def test_crop_then_flip(self, use_jit):
    images, key = _images(), _key(3)
    run = lambda k, x: augment.augment(k, x, crop_padding=_PADDING, flip=True)
    got = _maybe_jit(run, use_jit)(key, images)
    offsets = augment.crop_offsets(augment.stream_key(key, 'crop'), _BATCH,
                                   _PADDING)
    mask = augment.flip_mask(augment.stream_key(key, 'flip'), _BATCH)
    np.testing.assert_array_equal(
        got, _np_flip(_np_crop(images, offsets, _PADDING), mask))

  def test_jit_equals_eager(self):
    images, key = _images(), _key(4)
    run = lambda k, x: augment.augment(k, x, crop_padding=_PADDING, flip=True)
    np.testing.assert_array_equal(jax.jit(run)(key, images), run(key, images))

  def test_same_step_same_views(self):
    images = _images()
    run = jax.jit(lambda k: augment.augment(k, images, crop_padding=_PADDING,
                                            flip=True))
    first = run(augment.step_key(7, 3, 11))
    np.testing.assert_array_equal(run(augment.step_key(7, 3, 11)), first)
    for other in [(7, 3, 12), (7, 4, 11), (8, 3, 11)]:
      self.assertFalse(np.array_equal(run(augment.step_key(*other)), first),
                       other)

  def test_keys_from_traced_epoch_and_step(self):
    """Inside `jit` and `lax.scan`, as in a compiled epoch."""
    eager = np.stack([augment.step_key(5, 2, s) for s in range(4)])
    jitted = jax.jit(augment.step_key)(5, jnp.int32(2), jnp.int32(1))
    np.testing.assert_array_equal(jitted, eager[1])

    def body(carry, step):
      return carry, augment.step_key(5, carry, step)
    _, scanned = jax.lax.scan(body, jnp.int32(2), jnp.arange(4))
    np.testing.assert_array_equal(scanned, eager)

  def test_streams_differ(self):
    key = _key()
    streams = [np.asarray(augment.stream_key(key, name))
               for name in ('crop', 'flip', 'mixup')]
    self.assertLen({s.tobytes() for s in streams + [np.asarray(key)]}, 4)


# --- mixup. -------------------------------------------------------------------


class MixupTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_mix_at_is_a_convex_combination(self, use_jit):
    images = _images()
    labels = np.arange(_BATCH, dtype=np.int32) % _NUM_CLASSES
    perm = np.random.default_rng(3).permutation(_BATCH).astype(np.int32)
    mixed = _maybe_jit(augment.mix_at, use_jit)(images, labels, perm, 0.3)
    x = np.asarray(images, np.float64)
    np.testing.assert_allclose(mixed.images, 0.3 * x + 0.7 * x[perm],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(mixed.labels, labels)
    np.testing.assert_array_equal(mixed.partner_labels, labels[perm])
    np.testing.assert_allclose(
        augment.soft_labels(mixed, _NUM_CLASSES),
        0.3 * _np_one_hot(labels, _NUM_CLASSES)
        + 0.7 * _np_one_hot(labels[perm], _NUM_CLASSES), rtol=1e-6)

  @parameterized.parameters(False, True)
  def test_mixup_is_mix_at_its_draws(self, use_jit):
    images, key = _images(), _key(5)
    labels = np.arange(_BATCH, dtype=np.int32) % _NUM_CLASSES
    run = lambda k, x, y: augment.mixup(k, x, y, 0.4)
    mixed = _maybe_jit(run, use_jit)(key, images, labels)
    perm, lam = augment.mixup_draws(key, _BATCH, 0.4)
    self.assertCountEqual(np.asarray(perm), range(_BATCH))
    self.assertBetween(float(lam), 0.0, 1.0)
    np.testing.assert_allclose(mixed.lam, lam)
    x = np.asarray(images, np.float64)
    lam = float(lam)
    np.testing.assert_allclose(mixed.images, lam * x + (1 - lam) * x[perm],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(mixed.partner_labels, labels[perm])

  def test_one_hot_labels_give_the_same_soft_labels(self):
    images, key = _images(), _key(6)
    labels = np.arange(_BATCH, dtype=np.int32) % _NUM_CLASSES
    as_ids = augment.mixup(key, images, labels, 1.0)
    as_rows = augment.mixup(key, images,
                            _np_one_hot(labels, _NUM_CLASSES).astype(
                                np.float32), 1.0)
    soft = augment.soft_labels(as_ids, _NUM_CLASSES)
    np.testing.assert_allclose(soft, augment.soft_labels(as_rows,
                                                         _NUM_CLASSES))
    np.testing.assert_allclose(np.sum(soft, axis=1), 1.0, rtol=1e-6)

  def test_lambda_is_beta_distributed(self):
    keys = jax.random.split(jax.random.PRNGKey(4), 4000)
    for alpha in (0.2, 1.0):
      _, lam = jax.vmap(lambda k, a=alpha: augment.mixup_draws(k, 2, a))(keys)
      lam = np.asarray(lam, np.float64)
      self.assertTrue(np.all((lam >= 0) & (lam <= 1)))
      # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
      self.assertAlmostEqual(lam.mean(), 0.5, delta=0.03)
      self.assertAlmostEqual(lam.var(), 1 / (4 * (2 * alpha + 1)),
                             delta=0.02)

  def test_alpha_zero_is_the_identity(self):
    images = jnp.asarray(_images())
    labels = jnp.arange(_BATCH) % _NUM_CLASSES
    mixed = augment.mixup(_key(), images, labels, 0.0)
    self.assertIs(mixed.images, images)
    self.assertEqual(float(mixed.lam), 1.0)
    np.testing.assert_array_equal(
        augment.soft_labels(mixed, _NUM_CLASSES),
        _np_one_hot(labels, _NUM_CLASSES))


# --- normalisation and settings. ----------------------------------------------


class NormalizeAndSettingsTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_normalize(self, use_jit):
    images = _images()
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    got = _maybe_jit(lambda x: augment.normalize(x, mean, std), use_jit)(
        images)
    np.testing.assert_allclose(
        got, (np.asarray(images, np.float64) - mean) / np.asarray(std),
        rtol=1e-6, atol=1e-6)

  def test_normalize_off(self):
    images = jnp.asarray(_images())
    self.assertIs(augment.normalize(images, None, None), images)

  def test_settings(self):
    defaults = {name: s.default for name, s in augment.SETTINGS.items()}
    for name, setting in augment.SETTINGS.items():
      self.assertIsNone(setting.field.problem(f'augment.{name}',
                                              defaults[name]), name)
    self.assertTrue(augment.AugmentSettings.from_section(defaults).is_identity)
    self.assertFalse(augment.AugmentSettings(crop_padding=4).is_identity)
    for name, bad in [('crop_padding', -1), ('flip', 1),
                      ('mixup_alpha', -0.5), ('crop_padding', 4.0)]:
      problem = augment.SETTINGS[name].field.problem(f'augment.{name}', bad)
      self.assertIsNotNone(problem)
      self.assertStartsWith(problem, f'config.augment.{name} = ')


if __name__ == '__main__':
  absltest.main()
