"""Mixed precision: running a model's forward pass in a lower precision.

`config.precision` names one of `PRECISIONS`; `compute_in` wraps a model's
`apply` so that its forward (and so backward) pass computes in it while
parameters, optimizer state and losses stay float32.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _cast_floats(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def compute_in(apply_fn: Callable[..., Any], precision: str
               ) -> Callable[..., Any]:
  """`apply_fn` computing in `precision`, its outputs back in float32.

  Mixed precision without touching the model: for `'bfloat16'` the float
  parameters and inputs are cast to bfloat16 for the forward pass, while the
  master parameters, optimizer state, batch-norm statistics, and every loss
  and its reductions stay float32 (logits, captured features and updated
  statistics come back as float32). `'float32'` returns `apply_fn` itself.
  """
  if precision == 'float32':
    return apply_fn
  dtype = PRECISIONS[precision]

  def apply(variables, x, **kwargs):
    variables = {**variables,
                 'params': _cast_floats(variables['params'], dtype)}
    return _cast_floats(apply_fn(variables, _cast_floats(x, dtype), **kwargs),
                        jnp.float32)
  return apply
