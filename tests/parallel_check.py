"""Run by tests/test_parallel.py in a process with 8 CPU devices (and by
benchmarks/gpu_check.sh on an accelerator).

Trains the seed student (plain and distilled from cached logits) one epoch
on one device and data parallel on all N devices, with both loops, and
prints the largest parameter difference and the metrics as JSON.
"""

import json
import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit('/', 2)[0])
import functools  # pylint: disable=g-import-not-at-top

from kd_jax import data
from kd_jax import loop as loop_lib
from kd_jax import losses
from kd_jax import models
from kd_jax import objective
from kd_jax import parallel
from kd_jax import train


def main():
  rng = np.random.default_rng(0)
  n = 256
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
  split = data.Split(images, labels)
  dataset = data.Dataset('fashion_mnist', split, split, 10, 'random arrays')
  teacher_logits = rng.normal(size=(n, 10)).astype(np.float32)
  model = models.make_model('seed_student_cnn')
  kd = lambda student, teacher, batch: losses.kd_loss(
      student.logits, teacher.logits, batch['label'], alpha=0.5,
      temperature=4.0, weights=objective.batch_weights(batch))
  kd_step = functools.partial(train.distill_step,
                              distiller=train.Distiller(objective=kd))
  report = {'devices': jax.device_count()}
  for name, step, extras in (('train', train.train_step, {}),
                             ('distill', kd_step,
                              {'teacher_logits': teacher_logits})):
    for loop in ('scan', 'python'):
      results = {}
      for devices in (1, jax.device_count()):
        state = train.create_train_state(model, jax.random.PRNGKey(1),
                                         (28, 28, 1), 1e-3)
        state, test = loop_lib.fit(
            state, step, dataset, loop_lib.LoopSettings(
                epochs=1, batch_size=32, eval_batch_size=64, seed=0,
                # Chunks of 2 unrolled steps: sharded chunks of several
                # steps, compiled in about half the time of 4.
                loop=loop, steps_per_chunk=2, scan_unroll=True),
            stage=name, train_extras=extras, mesh=parallel.make_mesh(devices))
        results[devices] = (state, test)
      (one, test1), (eight, test8) = results[1], results[jax.device_count()]
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree_util.tree_leaves(one.params),
          jax.tree_util.tree_leaves(eight.params)))
      scale = max(float(np.max(np.abs(a))) for a in
                  jax.tree_util.tree_leaves(one.params))
      shardings = {str(leaf.sharding.spec) for leaf in
                   jax.tree_util.tree_leaves(eight.params)}
      report[f'{name}/{loop}'] = {
          'max_param_diff': diff, 'param_scale': scale,
          'test_loss_1': test1['loss'], 'test_loss_8': test8['loss'],
          'steps': int(eight.step), 'param_shardings': sorted(shardings),
          'param_devices': len(jax.tree_util.tree_leaves(
              eight.params)[0].sharding.device_set)}
  # Inference split over the mesh: the same logits, replicated on it.
  variables = train.model_variables(results[1][0])
  one = loop_lib.predict_logits(model.apply, variables, split, 64)
  sharded = loop_lib.predict_logits(model.apply, variables, split, 48,
                                    mesh=parallel.make_mesh())
  report['logits'] = {
      'max_diff': float(np.max(np.abs(np.asarray(one) - np.asarray(sharded)))),
      'scale': float(np.max(np.abs(np.asarray(one)))),
      'shape': list(sharded.shape),
      'devices': len(sharded.sharding.device_set),
      'replicated': sharded.sharding.is_fully_replicated}
  # The compiled chunk splits the batch and all-reduces the gradients.
  mesh = parallel.make_mesh()
  state = jax.device_put(
      train.create_train_state(model, jax.random.PRNGKey(1), (28, 28, 1),
                               1e-3), parallel.replicated(mesh))
  arrays = jax.device_put({'image': images, 'label': labels},
                          parallel.replicated(mesh))
  run = loop_lib.make_scan_steps(train.train_step, unroll=True,
                                 batch_sharding=parallel.batch_sharded(mesh))
  hlo = run.lower(state, arrays, np.zeros((2, 32), np.int32)).compile(
      ).as_text()
  report['hlo_all_reduce'] = 'all-reduce' in hlo
  print(json.dumps(report))


if __name__ == '__main__':
  main()
