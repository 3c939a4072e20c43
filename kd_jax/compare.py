"""Compares distillation methods on one teacher: one student per method.

`run_comparison` trains the shared teacher and the student from scratch once,
then each method's distil stage from that teacher (born-again networks, whose
teacher is the student's architecture, run their own teacher; ensemble
distillation adds teachers trained with other seeds), each in its own
subdirectory of the comparison's workdir, so that a re-run resumes.
`methods_table` renders the rows as Markdown.
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

import ml_collections

from kd_jax import experiment

REFERENCES = {
    'kd': 'Hinton et al., 2015',
    'dkd': 'Zhao et al., CVPR 2022',
    'fitnets': 'Romero et al., ICLR 2015',
    'at': 'Zagoruyko & Komodakis, ICLR 2017',
    'rkd': 'Park et al., CVPR 2019',
    'pkt': 'Passalis & Tefas, ECCV 2018',
    'multi_teacher': 'ensemble distillation',
    'born_again': 'Furlanello et al., ICML 2018',
    'takd': 'Mirzadeh et al., AAAI 2020',
}
# Config fields that decide what the teacher stage computes.
_TEACHER_FIELDS = ('seed', 'dataset', 'data_source', 'data_dir', 'train_limit',
                   'test_limit', 'batch_size', 'teacher')


def _teacher_key(config: ml_collections.ConfigDict) -> str:
  return json.dumps({k: config.to_dict()[k] for k in _TEACHER_FIELDS},
                    sort_keys=True)


def _variant(config: ml_collections.ConfigDict, **changes
             ) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in changes.items():
    *parents, leaf = dotted.split('__')
    target = config
    for name in parents:
      target = target[name]
    target[leaf] = value
  return config


def run_comparison(configs: Mapping[str, ml_collections.ConfigDict],
                   workdir: str, *, baseline: str = 'kd',
                   ensemble_seeds: Sequence[int] = (1, 2)
                   ) -> list[dict[str, Any]]:
  """Runs every method of `configs` from one shared teacher; returns rows.

  Args:
    configs: method name -> its full experiment config (teacher, distill,
      scratch stages). Methods whose teacher settings equal `baseline`'s
      distil from `baseline`'s teacher, trained once in `workdir/teacher`;
      the others (e.g. born_again) run all their stages in `workdir/<method>`.
    workdir: the comparison's directory; re-running resumes every part.
    baseline: the method whose teacher and scratch student are shared.
    ensemble_seeds: `multi_teacher` distils from the shared teacher and
      teachers trained with these seeds (`workdir/teacher_seed<k>`).

  Returns:
    One row per method, in `configs`' order: method, reference, teacher
    model and accuracy, distilled and scratch accuracy, distil wall time.
  """
  base = configs[baseline]
  teacher_dir = os.path.join(workdir, 'teacher')
  teacher_ckpt = os.path.join(teacher_dir, 'checkpoints', 'teacher')
  teacher = experiment.run(_variant(base, stages='teacher'), teacher_dir)
  scratch = experiment.run(_variant(base, stages='scratch'),
                           os.path.join(workdir, 'scratch'))
  rows = []
  for method, config in configs.items():
    method_dir = os.path.join(workdir, method)
    shared = _teacher_key(config) == _teacher_key(base)
    if method == 'multi_teacher' and shared:
      paths = [teacher_ckpt]
      for seed in ensemble_seeds:
        seed_dir = os.path.join(workdir, f'teacher_seed{seed}')
        experiment.run(_variant(base, stages='teacher', seed=seed), seed_dir)
        paths.append(os.path.join(seed_dir, 'checkpoints', 'teacher'))
      results = experiment.run(_variant(
          config, stages='distill', teacher__checkpoint=','.join(paths)),
                               method_dir)
    elif shared:
      results = experiment.run(_variant(
          config, stages='distill', teacher__checkpoint=teacher_ckpt),
                               method_dir)
    else:
      results = experiment.run(config, method_dir)
    own_teacher = results['stages']['teacher']
    distill = results['stages']['distill']
    teachers = len(own_teacher.get('member_accuracies', [])) or int(
        'teacher_ensemble_accuracy' in distill) + config.distill.num_teachers - 1
    rows.append({
        'method': method,
        'reference': REFERENCES.get(method, ''),
        'teacher_model': (f'{teachers} x {own_teacher["model"]}'
                          if teachers > 1 else own_teacher['model']),
        'teacher_accuracy': distill.get('teacher_ensemble_accuracy',
                                        own_teacher['test_accuracy']),
        'distilled_accuracy': distill['test_accuracy'],
        'scratch_accuracy': (results.get('scratch_accuracy')
                             if not shared else scratch['scratch_accuracy']),
        'distill_wall_time_s': distill['wall_time_s'],
    })
  return rows


def methods_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The rows of `run_comparison` as a Markdown table."""
  lines = ['| method | reference | teacher | teacher acc. | student, distilled '
           '| student, scratch | distilled - scratch | distil wall time |',
           '|---|---|---|---:|---:|---:|---:|---:|']
  for row in rows:
    lines.append(
        f'| `{row["method"]}` | {row["reference"]} | {row["teacher_model"]} | '
        f'{100 * row["teacher_accuracy"]:.2f}% | '
        f'{100 * row["distilled_accuracy"]:.2f}% | '
        f'{100 * row["scratch_accuracy"]:.2f}% | '
        f'{100 * (row["distilled_accuracy"] - row["scratch_accuracy"]):+.2f} |'
        f' {row["distill_wall_time_s"]:.0f} s |')
  return '\n'.join(lines) + '\n'
