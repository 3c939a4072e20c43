"""What a distillation method is to the pipeline: one record, and the objective.

A method (`kd_jax/methods/<name>.py`) is its loss functions plus one
`Method` record. The record tells the pipeline everything it needs: the
paper, the method's settings (the config section `config.distill.<name>`,
with defaults and checked ranges), the term it adds to the distil
objective, which teacher and student outputs that term reads (logits,
named features), any trainable module it adds to the student (FitNets'
regressor), its stage chain (TAKD, born-again networks) and how many
teachers it distils from. `kd_jax.methods` maps names to records; nothing
else in the library tests a method's name.

A distil stage's objective is a weighted sum of terms, listed in
`config.distill.terms`. Each term is a function

    term(student: Outputs, teacher: Outputs, batch) -> (loss, aux)

with its settings bound before `jit`; the sum reports each term's value
(before its weight) as `<term>_loss` and its `aux` entries as
`<term>/<name>`, so that every term is logged on its own.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import fields
from kd_jax import losses

Array = jax.Array
Batch = Mapping[str, Array]


@flax.struct.dataclass
class Outputs:
  """What a network produced for one batch.

  Attributes:
    logits: `[B, K]`; for the teachers of a several-teacher method, `[B, M,
      K]` (examples first, then teachers).
    features: layer name -> `[B, ...]` output of that layer (the layers the
      objective's terms asked for).
    modules: term name -> output of the trainable module that term added to
      the student (e.g. FitNets' regressed features); empty for teachers.
  """
  logits: Array
  features: Mapping[str, Array] = flax.struct.field(default_factory=dict)
  modules: Mapping[str, Any] = flax.struct.field(default_factory=dict)


# A term of the objective, settings bound: `(student, teacher, batch) ->
# (scalar loss, {name: scalar})`. The teacher's outputs are constants
# (under `stop_gradient`).
TermFn = Callable[[Outputs, Outputs, Batch], tuple[Array, dict[str, Array]]]
Objective = TermFn


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting of a method: default, checked field, and a comment."""
  default: Any
  field: fields.Field
  comment: str


def _no_layers(section: ml_collections.ConfigDict) -> tuple[str, ...]:
  del section
  return ()


def _no_problems(section: ml_collections.ConfigDict,
                 flat: Mapping[str, Any]) -> list[str]:
  del section, flat
  return []


def _one_teacher(config: ml_collections.ConfigDict) -> int:
  del config
  return 1


def _no_chain(config: ml_collections.ConfigDict) -> list['Link']:
  del config
  return []


@dataclasses.dataclass(frozen=True)
class Link:
  """A stage a method puts between the teacher and the distilled student."""
  name: str   # in the workdir: checkpoints/<name>/, results.json
  title: str  # in results tables
  model: str  # the `kd_jax.models` name of the network it trains


@dataclasses.dataclass(frozen=True)
class Preparation:
  """A stage a method trains before its distil stage (FT's paraphraser, AB's
  initialisation).

  It is a distil stage of its own: the student's model at the distilled
  student's initialisation, the same teacher, and as objective the one term
  `term` (at weight 1), whose settings are the method's own section
  `config.distill.<method>` and whose `module` trains. The distil stage then
  starts from its final model variables, and a distil term whose record is
  `prepared_by` this term receives the module's final parameters. It does
  not teach: the distil stage still learns from the teacher.

  Attributes:
    name: its stage name (checkpoints/<name>/, results.json).
    title: its row title in results tables.
    term: the record of its objective's one term (not a `config.distill.terms`
      name: it has no section of its own).
    trains: `'features'`: the model's parameters except its classifier
      (`kd_jax.models.CLASSIFIER`), and the term's module; `'modules'`: the
      term's module only (the model runs, as in the authors' code, but its
      parameters stay at their initialisation).
    epochs: its number of epochs, from the config (e.g. a setting of the
      method's section). It trains with `config.student.optimizer` at its
      base learning rate, held constant (no schedule, no warm-up), as
      RepDistiller's initialisation stage does.
  """
  name: str
  title: str
  term: 'Method'
  trains: str
  epochs: Callable[[ml_collections.ConfigDict], int]


TRAINS = ('features', 'modules')


@dataclasses.dataclass(frozen=True)
class Method:
  """Everything the pipeline needs to know about one method.

  Attributes:
    name: the method's name (`config.distill.method`, `config.distill.terms`
      and the name of its config section `config.distill.<name>`).
    reference: the paper, e.g. 'Hinton et al., 2015'.
    description: what it transfers, one line (README and docs).
    settings: the method's config section: name -> `Setting`. A method with
      a `loss` also has `weight`, its term's weight in the objective.
    loss: builds the method's objective term from its section, or None for
      a method that only changes the stages (takd, born_again). A record
      with `teacher_constants` is called as `loss(section, constants)`.
    terms: the paper's objective as term names (the default of
      `config.distill.terms` in its experiment config).
    student_layers: the student layers (outputs) its term reads.
    teacher_layers: the teacher layers its term reads. A term that reads no
      teacher layer needs only the teacher's logits, which may be cached.
    reads_teacher: its term reads the teacher's outputs (False for the
      labels' cross-entropy).
    several_teachers: its term reads all teachers' logits, `[B, M, K]`.
    num_teachers: how many teachers the distil stage learns from.
    module: builds a trainable module added to the student, from the section
      and the shapes (batch axis dropped) of the term's student and teacher
      layers; its input is the list of the student layers' outputs, its
      output goes to `Outputs.modules[name]`. Raises ValueError (with a
      message for the user) if it cannot map those shapes.
    module_reads_teacher: the module is called as `module(student layers'
      outputs, teacher layers' outputs)` (CRD's embedding heads, one for
      each network); its parameters still train with the student.
    memory: for a term that keeps state across steps (CRD's memory bank):
      `(section, labels of the training split [N], PRNG key) -> pytree`, its
      initial value. The state is part of the train state (checkpointed,
      restored on resume); the term reads it as `batch['memory'][name]`,
      with `batch['index']` (`[B]`, the examples' positions in the
      training split) and `batch['rng']` (a key of the step), and returns
      its new value in its aux as `aux[NEW_MEMORY]`. Raises ValueError
      (with a message for the user) if the training split does not fit.
    teacher_constants: for a term that needs constants computed once from
      the trained teacher (OFD's margins, from its batch norms): `(section,
      teacher model name (a `kd_jax.models` name), its Flax variables) ->
      pytree`, called when a distil stage starts and given to `loss`.
      Raises ValueError (with a message for the user) if that teacher does
      not fit; called under `jax.eval_shape` on the teacher's initial
      variables before any training, to check. None: no constants.
    preparation: a stage trained before the distil stage, whose result the
      distil stage starts from (see `Preparation`); None for most methods.
      A method has a `chain` or a `preparation`, not both.
    prepared_by: for a term whose loss needs what a preparation stage
      trained (FT's paraphraser): the name of that stage's term
      (`Preparation.term.name`); the loss is then called as `loss(section,
      parameters of that term's module)`.
    chain: the stages between teacher and distilled student.
    student_title: the distilled student's row title in results tables.
    check: cross-field problems, from the section and the whole flattened
      config (`'student.model'` -> value), as messages naming the fields.
    zoo_settings: the method's section settings on a CIFAR benchmark pair
      (e.g. its layers), given the teacher's and the student's feature
      names (`kd_jax.zoo.feature_names`: stem, stage1..K, embedding);
      `{}` for a method that reads no layers.
  """
  name: str
  reference: str
  description: str
  settings: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
  loss: Callable[..., TermFn] | None = None
  terms: tuple[str, ...] = ()
  student_layers: Callable[[ml_collections.ConfigDict],
                           tuple[str, ...]] = _no_layers
  teacher_layers: Callable[[ml_collections.ConfigDict],
                           tuple[str, ...]] = _no_layers
  reads_teacher: bool = True
  several_teachers: bool = False
  num_teachers: Callable[[ml_collections.ConfigDict], int] = _one_teacher
  module: Callable[..., nn.Module] | None = None
  module_reads_teacher: bool = False
  memory: Callable[..., Any] | None = None
  teacher_constants: Callable[[ml_collections.ConfigDict, str, Any],
                              Any] | None = None
  preparation: Preparation | None = None
  prepared_by: str | None = None
  chain: Callable[[ml_collections.ConfigDict], list[Link]] = _no_chain
  student_title: Callable[[ml_collections.ConfigDict], str] = (
      lambda config: 'student, distilled')
  check: Callable[[ml_collections.ConfigDict, Mapping[str, Any]],
                  list[str]] = _no_problems
  zoo_settings: Callable[[tuple[str, ...], tuple[str, ...]],
                         dict[str, Any]] = lambda teacher, student: {}


# The aux key under which a term with memory returns its new memory (see
# `Method.memory`); `weighted_sum` gathers them by term name under the same
# key of its aux, which the distil step takes out before logging.
NEW_MEMORY = 'new_memory'

WEIGHT_COMMENT = 'Weight of this term in the distil objective. Number >= 0.'


def term_weight(default: float) -> Setting:
  """The `weight` setting of a method's objective term."""
  return Setting(default, fields.non_negative_float(), WEIGHT_COMMENT)


def settings_section(settings: Mapping[str, Setting], owner: str,
                     **overrides) -> ml_collections.ConfigDict:
  """A config section: every one of `settings` at its default, `overrides`
  applied; an unknown name is a ValueError naming `owner` (e.g. "method
  'kd'")."""
  unknown = sorted(set(overrides) - set(settings))
  if unknown:
    raise ValueError(f'{owner} has no settings {unknown}; it has '
                     f'{sorted(settings)}')
  return ml_collections.ConfigDict(
      {name: overrides.get(name, setting.default)
       for name, setting in settings.items()})


def default_section(method: Method, **overrides) -> ml_collections.ConfigDict:
  """`config.distill.<method.name>`: the method's settings at their defaults,
  with `overrides` applied (unknown names are a ValueError)."""
  return settings_section(method.settings, f'method {method.name!r}',
                          **overrides)


def batch_weights(batch: Batch) -> Array:
  """`[B]` float32 per-example weights: the batch's mask, or ones."""
  if 'mask' in batch:
    return batch['mask'].astype(jnp.float32)
  return jnp.ones(batch['label'].shape[0], jnp.float32)


def label_loss(logits: Array, batch: Batch) -> Array:
  """Mean cross-entropy of `(B, K)` logits with the batch's labels.

  With mixup (`kd_jax.train.augmented`) the batch's images are `lam * x +
  (1 - lam) * x[perm]`, and the loss is `lam * CE(label) + (1 - lam) *
  CE(mixup_label)` (Zhang et al.), `lam = batch['mixup_lambda']`.
  """
  weights = batch_weights(batch)
  loss = losses.hard_label_loss(logits, batch['label'], weights=weights)
  if 'mixup_label' not in batch:
    return loss
  lam = batch['mixup_lambda']
  return lam * loss + (1 - lam) * losses.hard_label_loss(
      logits, batch['mixup_label'], weights=weights)


def weighted_sum(terms: Sequence[tuple[str, float, TermFn]]) -> Objective:
  """The objective `sum_i weight_i * term_i`, each term logged on its own.

  Args:
    terms: `(name, weight, term)` triples, in order.

  Returns:
    `(student, teacher, batch) -> (loss, aux)` where `aux` holds each term's
    unweighted value as `'<name>_loss'` and its own aux entries as
    `'<name>/<key>'`, and, if any term returned a new memory,
    `aux[NEW_MEMORY]`: term name -> that memory.
  """
  if not terms:
    raise ValueError('an objective needs at least one term')

  def objective(student: Outputs, teacher: Outputs, batch: Batch):
    total, aux = None, {}
    for name, weight, term in terms:
      value, parts = term(student, teacher, batch)
      total = weight * value if total is None else total + weight * value
      parts = dict(parts)
      if NEW_MEMORY in parts:
        aux.setdefault(NEW_MEMORY, {})[name] = parts.pop(NEW_MEMORY)
      aux[f'{name}_loss'] = value
      aux.update({f'{name}/{key}': v for key, v in parts.items()})
    return total, aux
  return objective
