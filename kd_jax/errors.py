"""Errors that mean "the user asked for something that cannot work".

`run.py` prints these as one clear message (no traceback); every other exception
is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
  """Bad configuration, data or workdir contents, reported before work starts."""


class DataError(UserInputError):
  """Missing, malformed or inconsistent dataset files, or a bad data option
  (raised by the data modules; also known as `kd_jax.data.DataError`)."""
