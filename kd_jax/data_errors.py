"""The error of the data modules (`data`, `idx`, `tfds_io`, `batching`,
`sources`, `streaming`), in a module of its own so that none of them imports
another just for it. Callers know it as `kd_jax.data.DataError`.
"""

from kd_jax import errors


class DataError(errors.UserInputError):
  """Missing, malformed or inconsistent dataset files, or a bad data option."""
