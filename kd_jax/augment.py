"""The CIFAR benchmark's data augmentation, on device, inside compiled steps.

RepDistiller's (and mdistiller's) CIFAR training transform is

    RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize

and Zhang et al.'s mixup is a common addition. Here each is a pure JAX
function of a PRNG key and a batch `(B, H, W, C)` float32 in [0, 1], so that
it runs inside the jitted (or scanned) step instead of in a host pipeline:

  * `random_crop`: zero-pad by `padding` on every side (0 in pixel space,
    i.e. before `normalize`) and take an `H x W` window at an offset drawn
    uniformly from `[0, 2 * padding]` per axis and per image, as
    `torchvision.transforms.RandomCrop(H, padding=padding)`;
  * `random_flip`: mirror left-right with probability 1/2 per image;
  * `mixup`: `lam * x + (1 - lam) * x[perm]`, one `lam ~ Beta(alpha, alpha)`
    per batch and a random permutation of the batch;
  * `normalize`: `(x - mean) / std` per channel.

Each random function is a draw (`crop_offsets`, `flip_mask`, `mixup_draws`)
followed by a deterministic function of it (`crop_at`, `flip_where`,
`mix_at`), which the tests check against NumPy.

Keys. `step_key(seed, epoch, step)` is a function of those three numbers only
(they may be traced, e.g. inside `lax.scan`), so a resumed run, or a loop
that visits batches in another order, sees the same views of every batch,
and every stage of an experiment (teacher, distilled and scratch students)
sees the same views of the same batch. `augment` derives the crop and flip
keys from it with `stream_key`; mixup takes `stream_key(key, 'mixup')`.
With `jax_threefry_partitionable` (on by default in this JAX) the draws do not
depend on how the batch is sharded across devices.

Crop implementation. `crop_at` is a `vmap` of `lax.dynamic_slice` over the
zero-padded batch, which lowers to one `pad` and one windowed `gather` (one
`H x W x C` slice per image). Measured at B = 64, 32x32x3 float32, jitted,
on this project's 2-core CPU (shared, so noisy: median of 1000 calls, two
runs): vmap(dynamic_slice) 0.16-0.17 ms; a gather of explicit row and
column indices 0.2-0.4 ms; a clipped gather without padding plus a mask
0.2-0.35 ms; a one-hot formulation (two batched matmuls at
`Precision.HIGHEST`, needed to stay exact under TF32 on GPU) 0.87 ms. With
the offset draw, crop and flip together (`augment`) take 0.23-0.35 ms. The
dynamic slice is both the fastest and the clearest; on GPU a gather of
contiguous windows is also the cheap case, while the one-hot version does
`H + W` multiply-adds per output value instead of one copy (not measured
there: no GPU in this session).
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import fields
from kd_jax import objective

Array = jax.Array

# `fold_in(PRNGKey(seed), _AUGMENT_DOMAIN)` is the root of every augmentation
# key: far from the stages' `rng_index` values (kd_jax/stages.py), so that
# augmentation never shares a key with initialisation or dropout.
_AUGMENT_DOMAIN = 0x61756700  # b'aug\0'
# One key per random choice of a step, derived from the step's key.
_STREAMS = {'crop': 0, 'flip': 1, 'mixup': 2, 'objective': 3}


SETTINGS: dict[str, objective.Setting] = {
    'crop_padding': objective.Setting(
        0, fields.int_at_least(0),
        'Random crop: zero-pad each training image by this many pixels on '
        'every side and crop a window of its original size at a uniformly '
        'random offset (torchvision RandomCrop(32, padding=4) is 4); 0 = '
        'off.'),
    'flip': objective.Setting(
        False, fields.boolean(),
        'Random horizontal flip of each training image with probability '
        '1/2 (torchvision RandomHorizontalFlip).'),
    'mixup_alpha': objective.Setting(
        0.0, fields.non_negative_float(),
        'Mixup (Zhang et al., 2018): mix each batch with a permutation of '
        'itself, lam ~ Beta(alpha, alpha) per batch; 0 = off (1 or 0.2 are '
        'common).'),
}


def default_section(**overrides) -> ml_collections.ConfigDict:
  """A `config.augment` section, every setting at its default (off) but
  `overrides`."""
  return objective.settings_section(SETTINGS, 'config.augment', **overrides)


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """The `config.augment` section, read once before `jit` (all static).

  Attributes:
    crop_padding: `random_crop`'s padding; 0 = no crop.
    flip: whether to `random_flip`.
    mixup_alpha: `mixup`'s Beta parameter; 0 = no mixup.
  """
  crop_padding: int = 0
  flip: bool = False
  mixup_alpha: float = 0.0

  @classmethod
  def from_section(cls, section: Mapping[str, Any]) -> 'AugmentSettings':
    """From a (validated) `config.augment` section, dict or ConfigDict."""
    return cls(**{name: section[name] for name in SETTINGS})

  @property
  def is_identity(self) -> bool:
    """Whether these settings leave every batch unchanged."""
    return not (self.crop_padding or self.flip or self.mixup_alpha)


# --- keys. --------------------------------------------------------------------


def step_key(seed: int | Array, epoch: int | Array,
             step: int | Array) -> Array:
  """The augmentation key of one training step.

  Args:
    seed: the experiment's seed (`config.seed`).
    epoch: 0-based epoch (a Python int or a traced integer scalar).
    step: the batch's index within its epoch (or any other step number the
      caller uses consistently; may be traced).

  Returns:
    A PRNG key (`jax.random.PRNGKey` form, `(2,)` uint32) that depends on
    `(seed, epoch, step)` only.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _AUGMENT_DOMAIN)
  return jax.random.fold_in(jax.random.fold_in(key, epoch), step)


def train_key(rng: Array, step: int | Array) -> Array:
  """The augmentation key of training step `step` of a stage whose base key
  is `rng` (`TrainState.rng`, itself a function of the seed and the stage):
  what the train and distil steps use, so that resuming repeats the views."""
  return jax.random.fold_in(jax.random.fold_in(rng, _AUGMENT_DOMAIN), step)


def stream_key(key: Array, name: str) -> Array:
  """The key of one random choice (`'crop'`, `'flip'`, `'mixup'`, or
  `'objective'`: the terms' own, e.g. CRD's negatives) of a step whose key is
  `key`: independent of the others'."""
  return jax.random.fold_in(key, _STREAMS[name])


# --- random crop. -------------------------------------------------------------


def crop_offsets(key: Array, batch_size: int, padding: int) -> Array:
  """`(B, 2)` int32 (row, column) crop offsets, each uniform in `[0, 2p]`."""
  return jax.random.randint(key, (batch_size, 2), 0, 2 * padding + 1,
                            dtype=jnp.int32)


def crop_at(images: Array, offsets: Array, padding: int) -> Array:
  """Windows of the zero-padded images at given offsets.

  Args:
    images: `(B, H, W, C)`.
    offsets: `(B, 2)` integer (row, column) offsets into the padded images,
      in `[0, 2 * padding]`.
    padding: pixels of zeros added on each side of each spatial axis.

  Returns:
    `(B, H, W, C)`: image b is `pad(images[b])[r:r + H, c:c + W]` with `(r,
    c) = offsets[b]`, so offset `(padding, padding)` is the image itself.
  """
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)))

  def window(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))
  return jax.vmap(window)(padded, offsets.astype(jnp.int32))


def random_crop(key: Array, images: Array, padding: int = 4) -> Array:
  """torchvision's `RandomCrop((H, W), padding=padding)` of each image.

  Args:
    key: PRNG key.
    images: `(B, H, W, C)`, before `normalize` (padding is 0 in pixel space).
    padding: pixels of zeros added on each side; 0 returns `images` itself.

  Returns:
    `(B, H, W, C)`, each image cropped at its own uniform offset.
  """
  if not padding:
    return images
  return crop_at(images, crop_offsets(key, images.shape[0], padding), padding)


# --- random flip. -------------------------------------------------------------


def flip_mask(key: Array, batch_size: int) -> Array:
  """`(B,)` bool: which images to flip, each with probability 1/2."""
  return jax.random.bernoulli(key, 0.5, (batch_size,))


def flip_where(images: Array, mask: Array) -> Array:
  """`(B, H, W, C)` images, left-right mirrored where the `(B,)` mask is
  True."""
  return jnp.where(mask[:, None, None, None], images[:, :, ::-1, :], images)


def random_flip(key: Array, images: Array) -> Array:
  """`(B, H, W, C)` images, each mirrored left-right with probability 1/2."""
  return flip_where(images, flip_mask(key, images.shape[0]))


# --- the entry point. ---------------------------------------------------------


def augment(key: Array, images: Array, *, crop_padding: int = 0,
            flip: bool = False) -> Array:
  """The benchmark's image augmentation: random crop, then random flip.

  Args:
    key: the step's key (`step_key`); crop and flip use their own streams.
    images: `(B, H, W, C)` in pixel space (before `normalize`).
    crop_padding: `random_crop`'s padding; 0 = no crop.
    flip: whether to `random_flip`.

  Returns:
    `(B, H, W, C)`; `images` itself (the same array) when both are off.
  """
  if crop_padding:
    images = random_crop(stream_key(key, 'crop'), images, crop_padding)
  if flip:
    images = random_flip(stream_key(key, 'flip'), images)
  return images


def augment_batch(settings: AugmentSettings, rng: Array, step: int | Array,
                  batch: Mapping[str, Array]) -> Mapping[str, Array]:
  """A training batch as a step trains on it, augmented as `settings` say.

  Args:
    settings: what to apply (static).
    rng: the stage's base key (`TrainState.rng`); with `step`, the key
      `train_key(rng, step)`: a function of the seed, the stage and the
      step, so that a resumed run sees the same views.
    step: the step number (may be traced).
    batch: `'image'` `(B, H, W, C)` in pixel space, `'label'` `(B,)`, ...

  Returns:
    `batch` itself without augmentation; else the crop and flip replace
    `'image'`, and mixup also adds `'mixup_label'` `(B,)` (the labels of the
    images mixed in) and `'mixup_lambda'` (the weight of `'label'`), which
    `kd_jax.objective.label_loss` reads.
  """
  if settings.is_identity:
    return batch
  key = train_key(rng, step)
  images = augment(key, batch['image'], crop_padding=settings.crop_padding,
                   flip=settings.flip)
  batch = {**batch, 'image': images}
  if settings.mixup_alpha:
    mixed = mixup(stream_key(key, 'mixup'), images, batch['label'],
                  settings.mixup_alpha)
    batch.update(image=mixed.images, mixup_label=mixed.partner_labels,
                 mixup_lambda=mixed.lam)
  return batch


# --- mixup. -------------------------------------------------------------------


@flax.struct.dataclass
class Mixup:
  """A mixed batch and what a loss needs.

  The mixed cross-entropy `lam * CE(logits, labels) + (1 - lam) *
  CE(logits, partner_labels)` (Zhang et al.'s code) equals the cross-entropy
  with the soft targets `soft_labels(mixed, K)`, since cross-entropy is
  linear in its targets; `kd_jax.losses.hard_label_loss` takes either.

  Attributes:
    images: `(B, H, W, C)` `lam * x + (1 - lam) * x[perm]`.
    labels: the batch's labels, `(B,)` int or `(B, K)` one-hot/soft.
    partner_labels: `labels[perm]`, the labels of the images mixed in.
    lam: scalar float32 in [0, 1], the weight of `labels`.
  """
  images: Array
  labels: Array
  partner_labels: Array
  lam: Array


def mixup_draws(key: Array, batch_size: int, alpha: float
                ) -> tuple[Array, Array]:
  """`((B,) int32 permutation, scalar lam ~ Beta(alpha, alpha))`; for `alpha
  = 0`, the identity permutation and `lam = 1` (mixup off)."""
  if not alpha:
    return jnp.arange(batch_size, dtype=jnp.int32), jnp.float32(1.0)
  perm_key, lam_key = jax.random.split(key)
  return (jax.random.permutation(perm_key, batch_size).astype(jnp.int32),
          jax.random.beta(lam_key, alpha, alpha, dtype=jnp.float32))


def mix_at(images: Array, labels: Array, perm: Array, lam: Array) -> Mixup:
  """Mixup with a given `(B,)` permutation and scalar weight `lam`.

  Args:
    images: `(B, H, W, C)` float.
    labels: `(B,)` int or `(B, K)` float labels.
    perm: `(B,)` integer permutation of the batch.
    lam: scalar in [0, 1].

  Returns:
    `Mixup(lam * images + (1 - lam) * images[perm], labels, labels[perm],
    lam)`.
  """
  lam = jnp.asarray(lam, images.dtype)
  return Mixup(lam * images + (1 - lam) * images[perm], labels, labels[perm],
               lam)


def mixup(key: Array, images: Array, labels: Array, alpha: float) -> Mixup:
  """Zhang et al.'s mixup: one `lam ~ Beta(alpha, alpha)` per batch.

  Args:
    key: PRNG key (e.g. `stream_key(step_key(...), 'mixup')`).
    images: `(B, H, W, C)` float, normalised or not (mixing commutes with
      `normalize`).
    labels: `(B,)` int or `(B, K)` one-hot/soft labels.
    alpha: Beta parameter (a Python float); 0 = off: `images` itself comes
      back, with `lam = 1`.

  Returns:
    A `Mixup`: the mixed images, both label sets and `lam` (see
    `soft_labels` for `(B, K)` targets).
  """
  if not alpha:
    return Mixup(images, labels, labels, jnp.float32(1.0))
  perm, lam = mixup_draws(key, images.shape[0], alpha)
  return mix_at(images, labels, perm, lam)


def soft_labels(mixed: Mixup, num_classes: int) -> Array:
  """`(B, K)` float32 targets `lam * y + (1 - lam) * y[perm]` of a `Mixup`
  (integer labels one-hot encoded with `num_classes` classes)."""
  def dense(labels):
    if jnp.issubdtype(labels.dtype, jnp.integer):
      return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return labels.astype(jnp.float32)
  lam = mixed.lam.astype(jnp.float32)
  return lam * dense(mixed.labels) + (1 - lam) * dense(mixed.partner_labels)


# --- normalisation. -----------------------------------------------------------


def normalize(images: Array, mean: Sequence[float] | None,
              std: Sequence[float] | None = None) -> Array:
  """`(images - mean) / std` per channel.

  Args:
    images: `(..., C)`.
    mean: `C` channel means, or None: `images` itself comes back.
    std: `C` channel standard deviations (None: 1).

  Returns:
    `(..., C)` in `images`' dtype.
  """
  if mean is None:
    return images
  out = images - jnp.asarray(mean, images.dtype)
  if std is not None:
    out = out / jnp.asarray(std, images.dtype)
  return out
