"""Errors that mean "the user asked for something that cannot work".

`run.py` prints these as one clear message (no traceback); every other exception
is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
  """Bad configuration, data or workdir contents, reported before work starts."""
