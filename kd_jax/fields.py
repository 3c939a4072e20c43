"""Config fields: a type, a check of the value, and what is allowed.

`kd_jax.validation` checks an experiment config against a schema of
`Field`s; method records (`kd_jax.objective.Method`) declare their own
settings with the same constructors, so every field is checked, and named
in errors, the same way.
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Field:
  """A config field: its Python type, a check of its value, what is allowed."""
  kind: type
  check: Callable[[Any], bool]
  allowed: str

  def problem(self, name: str, value: Any) -> str | None:
    """Why `value` is not valid for the field `name`, or None."""
    if not type_ok(value, self.kind) or not self.check(value):
      return f'config.{name} = {value!r}: expected {self.allowed}'
    return None


def type_ok(value: Any, kind: type) -> bool:
  """Whether `value` is of `kind` (an int passes for float; bool for neither)."""
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def parse_list(text: str) -> tuple[str, ...]:
  """`'a, b'` -> `('a', 'b')`: a comma-separated config string, in order."""
  return tuple(s.strip() for s in text.split(',') if s.strip())


def one_of(names) -> Field:
  names = tuple(sorted(names))
  return Field(str, lambda v: v in names, f'one of {", ".join(names)}')


def int_at_least(low: int) -> Field:
  return Field(int, lambda v: v >= low, f'an integer >= {low}')


def positive_float() -> Field:
  return Field(float, lambda v: v > 0 and math.isfinite(v),
               'a finite number > 0')


def non_negative_float() -> Field:
  return Field(float, lambda v: v >= 0 and math.isfinite(v),
               'a finite number >= 0')


def float_in(low: float, high: float) -> Field:
  return Field(float, lambda v: low <= v <= high,
               f'a number in [{low}, {high}]')


def boolean() -> Field:
  return Field(bool, lambda v: True, 'True or False')


def text(allowed: str) -> Field:
  """Any string; `allowed` says what it should hold."""
  return Field(str, lambda v: True, allowed)


def layer_list(role: str) -> Field:
  """Comma-separated layer names of the `role` ('student' or 'teacher')."""
  return Field(str, lambda v: bool(parse_list(v)),
               f'comma-separated layer names of the {role} (at least one)')


def number_list() -> Field:
  """Comma-separated numbers >= 0 with a positive sum, or '' for none."""
  def valid(value: str) -> bool:
    try:
      numbers = [float(w) for w in parse_list(value)]
    except ValueError:
      return False
    return all(w >= 0 and math.isfinite(w) for w in numbers) and (
        not numbers or sum(numbers) > 0)
  return Field(str, valid, 'comma-separated numbers >= 0 with a positive '
               'sum, or "" for equal weights')
