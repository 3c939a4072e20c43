"""kd_jax: knowledge distillation in JAX/Flax.

Modules: `losses` and `methods` (the KD loss family), `models` (Flax modules
by name), `data` (datasets as arrays), `streaming` (datasets read from disk
batch by batch, with grain), `train` (state, steps, loops), `parallel` (data
parallelism on a device mesh, across hosts), `experiment` (the staged
pipeline behind `run.py`), `sweep` and `compare` (grids, seeds, method
comparisons), `stats` and `calibration` (confidence intervals, paired tests,
ECE, temperature scaling), `plots` and `logs` (figures, TensorBoard, progress
bars), `checkpoints`, `validation` (config checks).
"""

__version__ = '0.2.0'
