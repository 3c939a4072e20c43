"""The distillation methods, by name, and what the pipeline reads from them.

Each method is one module of this package (its losses and one
`kd_jax.objective.Method` record); `METHODS` lists them. A new method is one
new module plus one line in `METHODS` (see "Adding a method" in the
README). The functions below answer the pipeline's questions about a
config's `distill` section from the records alone.

`config.distill` holds `method` (a `METHODS` name: the stages and teachers),
`terms` (comma-separated `TERMS` names: the objective, a weighted sum) and
`teacher_logits`, plus one section per term and per method with settings,
named after it (e.g. `config.distill.kd.temperature`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from kd_jax import fields
from kd_jax import objective
from kd_jax.methods import ab
from kd_jax.methods import at
from kd_jax.methods import born_again
from kd_jax.methods import cc
from kd_jax.methods import crd
from kd_jax.methods import ce
from kd_jax.methods import dist
from kd_jax.methods import dkd
from kd_jax.methods import fitnets
from kd_jax.methods import fsp
from kd_jax.methods import ft
from kd_jax.methods import kd
from kd_jax.methods import logit_l2
from kd_jax.methods import lskd
from kd_jax.methods import multi_teacher
from kd_jax.methods import nst
from kd_jax.methods import ofd
from kd_jax.methods import pkt
from kd_jax.methods import reviewkd
from kd_jax.methods import rkd
from kd_jax.methods import sp
from kd_jax.methods import takd
from kd_jax.methods import vid

Method = objective.Method


def _index(*records: Method) -> dict[str, Method]:
  return {record.name: record for record in records}


# Names for config.distill.method.
METHODS: dict[str, Method] = _index(
    kd.METHOD,
    dkd.METHOD,
    fitnets.METHOD,
    at.METHOD,
    rkd.METHOD,
    pkt.METHOD,
    multi_teacher.METHOD,
    born_again.METHOD,
    takd.METHOD,
    logit_l2.METHOD,
    dist.METHOD,
    sp.METHOD,
    nst.METHOD,
    cc.METHOD,
    lskd.METHOD,
    vid.METHOD,
    fsp.METHOD,
    ofd.METHOD,
    reviewkd.METHOD,
    crd.METHOD,
    ft.METHOD,
    ab.METHOD,
)
# Names for config.distill.terms: the labels' cross-entropy and every method
# with a loss.
TERMS: dict[str, Method] = _index(
    ce.TERM, *(record for record in METHODS.values() if record.loss))
RECORDS: dict[str, Method] = {**METHODS, **TERMS}
# The terms of the methods' preparation stages (`objective.Preparation`), by
# name: each reads its method's section, so none is a `config.distill.terms`
# name; a preparation stage's config (`distil_setup.stage_config`) lists it.
PREPARATION_TERMS: dict[str, Method] = _index(*(
    record.preparation.term for record in METHODS.values()
    if record.preparation))


def default_section(name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.distill.<name>` at the record's defaults, `overrides` applied."""
  return objective.default_section(RECORDS[name], **overrides)


def method_of(config: ml_collections.ConfigDict) -> Method:
  """The record of `config.distill.method`."""
  return METHODS[config.distill.method]


def term_names(distill: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The names in `distill.terms`, in order."""
  return fields.parse_list(distill.terms)


def term_record(name: str) -> Method:
  """The record of a term of an objective: a `TERMS` name, or a preparation
  stage's term."""
  return TERMS[name] if name in TERMS else PREPARATION_TERMS[name]


def _terms(distill: ml_collections.ConfigDict
           ) -> list[tuple[Method, ml_collections.ConfigDict]]:
  return [(term_record(name), distill[name]) for name in term_names(distill)]


def preparing_method(term: Method) -> Method | None:
  """The method whose preparation stage trains what `term` is
  `prepared_by`, or None."""
  return next((record for record in METHODS.values() if record.preparation
               and record.preparation.term.name == term.prepared_by), None)


def build_objective(distill: ml_collections.ConfigDict,
                    teacher_constants: dict[str, Any] | None = None
                    ) -> objective.Objective:
  """The distil objective of a validated `config.distill`: the weighted sum
  of its terms, their settings bound, and for a term whose record has
  `teacher_constants` or is `prepared_by` a preparation stage, its entry of
  `teacher_constants` (term name -> constants: from `teacher_constants`
  below, or the parameters the preparation stage trained).

  Raises:
    ValueError: a term needs constants that `teacher_constants` lacks.
  """
  constants = teacher_constants or {}
  terms = []
  for record, section in _terms(distill):
    bound = ()
    if record.teacher_constants is not None or record.prepared_by:
      if record.name not in constants:
        raise ValueError(
            f'the term {record.name} needs '
            + (f'what the preparation stage trained ({record.prepared_by})'
               if record.prepared_by else
               'constants computed from the teacher: pass '
               'teacher_constants(...)'))
      bound = (constants[record.name],)
    terms.append((record.name, section.weight, record.loss(section, *bound)))
  return objective.weighted_sum(terms)


def teacher_constants(distill: ml_collections.ConfigDict, teacher_model: str,
                      teacher_variables: Any) -> dict[str, Any]:
  """What the objective's terms compute once from the teacher (each
  record's `teacher_constants`), by term name, for `build_objective`.

  Args:
    distill: a validated `config.distill`.
    teacher_model: the teacher's `kd_jax.models` name.
    teacher_variables: its Flax variables (`params`, `batch_stats`).

  Raises:
    ValueError: a term cannot use this teacher (the message names the config
      section).
  """
  constants = {}
  for record, section in _terms(distill):
    if record.teacher_constants is None:
      continue
    try:
      constants[record.name] = record.teacher_constants(
          section, teacher_model, teacher_variables)
    except ValueError as e:
      raise ValueError(f'config.distill.{record.name}: {e}') from e
  return constants


def _union(layer_lists: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(l for layers in layer_lists for l in layers))


def student_layers(distill: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The student layers the objective's terms read, each once, in order."""
  return _union([r.student_layers(s) for r, s in _terms(distill)])


def teacher_layers(distill: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The teacher layers the objective's terms read (none: logits suffice,
  so the teacher's logits may be cached)."""
  return _union([r.teacher_layers(s) for r, s in _terms(distill)])


def num_teachers(config: ml_collections.ConfigDict) -> int:
  """How many teachers the distilled student learns from."""
  return method_of(config).num_teachers(config)


def chain(config: ml_collections.ConfigDict) -> list[objective.Link]:
  """The stages the method puts between teacher and distilled student."""
  return method_of(config).chain(config)


def student_title(config: ml_collections.ConfigDict) -> str:
  return method_of(config).student_title(config)


def reference(name: str) -> str:
  return RECORDS[name].reference


def modules(distill: ml_collections.ConfigDict, shapes_of
            ) -> dict[str, tuple[nn.Module, tuple[str, ...], tuple[str, ...]]]:
  """The trainable modules the objective's terms add to the student.

  Args:
    distill: a validated `config.distill`.
    shapes_of: `(role, layers) -> [shape]`, the shapes (batch axis dropped)
      of the outputs of `layers` of the student or teacher (`role`).

  Returns:
    term name -> `(module, the student layers it reads, the teacher layers
    it reads)`; the last is `()` unless the record's `module_reads_teacher`.

  Raises:
    ValueError: a module cannot map the layers' shapes (the message names
      the config section).
  """
  built = {}
  for record, section in _terms(distill):
    if record.module is None:
      continue
    inputs = record.student_layers(section)
    teacher = record.teacher_layers(section)
    try:
      built[record.name] = (record.module(
          section, shapes_of('student', inputs), shapes_of('teacher', teacher)),
                            inputs, teacher if record.module_reads_teacher else ())
    except ValueError as e:
      raise ValueError(f'config.distill.{record.name}: {e}') from e
  return built


def initial_memory(distill: ml_collections.ConfigDict, labels,
                   key) -> dict[str, Any]:
  """The initial memory of the objective's terms that keep one (the
  records' `memory`), by term name; term `i` gets `fold_in(key, i)`.

  Args:
    distill: a validated `config.distill`.
    labels: `[N]` int labels of the training split.
    key: a PRNG key.

  Raises:
    ValueError: a term cannot keep a memory of this training split (the
      message names the config section).
  """
  memory = {}
  for i, (record, section) in enumerate(_terms(distill)):
    if record.memory is None:
      continue
    try:
      memory[record.name] = record.memory(section, labels,
                                          jax.random.fold_in(key, i))
    except ValueError as e:
      raise ValueError(f'config.distill.{record.name}: {e}') from e
  return memory


def keeps_memory(distill: ml_collections.ConfigDict) -> bool:
  """Whether a term of the objective keeps a memory (and so reads each
  example's position in the training split, `batch['index']`)."""
  return any(record.memory is not None for record, _ in _terms(distill))


def _value(value: Any) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def summary(config: ml_collections.ConfigDict) -> str:
  """One line on the distil objective and method, for results tables, e.g.
  'method kd: 0.1 ce + 0.9 kd (temperature=10, t2_scaling=False, form=kl)'."""
  distill = config.distill
  parts = []
  for record, section in _terms(distill):
    settings = ', '.join(f'{k}={_value(v)}' for k, v in section.items()
                         if k != 'weight')
    parts.append(f'{_value(section.weight)} {record.name}'
                 + (f' ({settings})' if settings else ''))
  method = method_of(config)
  own = ''
  if method.settings and not method.loss:
    own = '; ' + ', '.join(f'{k}={_value(v)}'
                           for k, v in distill[method.name].items())
  return f'method {method.name}: {" + ".join(parts)}{own}'
