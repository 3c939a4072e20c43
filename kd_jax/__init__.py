"""kd_jax: knowledge distillation in JAX/Flax.

Modules: `losses` (the KD loss family), `models` (Flax modules by name),
`data` (datasets as arrays), `train` (state, steps, loops), `experiment` (the
three-stage pipeline behind `run.py`), `validation` (config checks).
"""

__version__ = '0.1.0'
