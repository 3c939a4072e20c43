r"""CRD's per-step work against the formulation it replaced, in one run.

  python benchmarks/crd_step.py [--repeats=10] [--num_data=55000]

At Fashion-MNIST's size (55,000 training examples, batch 64, 16,384
negatives, 128-d embeddings), times:
- drawing the negatives: `crd.contrast_indices` (random keys, the K-th
  smallest found bit by bit, the chosen positions scattered into place)
  against a `top_k` over the same keys (the draw before 2026-12-03);
- the CRD loss and its gradient: the contrast scores from the whole bank
  (`anchor @ bank.T`, the dot products picked) against the gathered
  `[B, K + 1, D]` bank rows (`crd.WHOLE_BANK_RATIO = 0` forces that path,
  the one large banks take).
Medians of `--repeats` calls, each after compiling and warm-up calls.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order
from kd_jax.methods import common as method_common
from kd_jax.methods import crd

_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per row.')
_NUM_DATA = flags.DEFINE_integer('num_data', 55000,
                                 'Training examples (bank rows).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Examples per step.')
_NEGATIVES = flags.DEFINE_integer('negatives', 16384, 'Negatives per example.')
_FEAT_DIM = flags.DEFINE_integer('feat_dim', 128, 'Embedding dimension.')


def top_k_contrast_indices(key, index, label, labels, num_negatives):
  """The earlier draw: the top `K` of uniform keys, same-class keys at -1."""
  keys = jax.random.uniform(key, (index.shape[0], labels.shape[0]))
  same_class = label[:, None] == labels[None, :]
  _, negatives = jax.lax.top_k(jnp.where(same_class, -1.0, keys),
                               num_negatives)
  return jnp.concatenate([index[:, None], negatives.astype(jnp.int32)], axis=1)


def _time(fn, *args) -> float:
  return common.time_calls(jax.jit(fn), *args, repeats=_REPEATS.value,
                           threads_carry=False).median_ms


def main(argv):
  del argv
  print(common.machine_line())
  num_data, batch, negatives = _NUM_DATA.value, _BATCH.value, _NEGATIVES.value
  labels = np.random.default_rng(0).integers(0, 10, num_data).astype(np.int32)
  memory = crd.initial_memory(jax.random.PRNGKey(0), labels, _FEAT_DIM.value)
  index = jnp.arange(batch, dtype=jnp.int32) * (num_data // batch)
  label = jnp.asarray(labels)[index]
  key = jax.random.PRNGKey(1)

  def draw(fn):
    return lambda key, labels: fn(key, index, label, labels, negatives)

  contrast = jax.jit(draw(crd.contrast_indices))(key, memory['labels'])
  embeddings = [method_common.norm_and_unit(jax.random.normal(
      jax.random.PRNGKey(seed), (batch, _FEAT_DIM.value)))[1]
                for seed in (2, 3)]

  def loss_and_gradient(student, teacher, memory, contrast):
    return jax.value_and_grad(
        lambda s, t: crd.crd_loss(s, t, memory, index, contrast)[0],
        argnums=(0, 1))(student, teacher)

  draw_new = _time(draw(crd.contrast_indices), key, memory['labels'])
  draw_old = _time(draw(top_k_contrast_indices), key, memory['labels'])
  loss_new = _time(loss_and_gradient, *embeddings, memory, contrast)
  ratio, crd.WHOLE_BANK_RATIO = crd.WHOLE_BANK_RATIO, 0
  try:
    loss_old = _time(loss_and_gradient, *embeddings, memory, contrast)
  finally:
    crd.WHOLE_BANK_RATIO = ratio
  print(f'| CRD, {num_data} examples, batch {batch}, {negatives} negatives '
        '| now ms | before ms | before / now |')
  print('|---|---:|---:|---:|')
  for name, now, before in (
      ('draw the negatives (keys + K-th smallest vs top_k)', draw_new,
       draw_old),
      ('loss + gradient (whole-bank scores vs gathered rows)', loss_new,
       loss_old),
      ('both', draw_new + loss_new, draw_old + loss_old)):
    print(f'| {name} | {now:.1f} | {before:.1f} | {before / now:.1f}x |')


if __name__ == '__main__':
  app.run(main)
