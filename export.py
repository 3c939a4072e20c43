r"""Exports a finished stage of a run for deployment, with a report.

  python export.py --workdir=runs/seed       # the distilled student
  python export.py --workdir=runs/seed --stage=teacher --format=jax

writes under <workdir>/export/: <stage>.onnx (needs the `export` extra),
<stage>.jax_export (jax.export, StableHLO), report.md and report.json:
parameters, size, FLOPs, latency at batch 1 and 64 in onnxruntime and JAX,
and test accuracy of the stage and the teacher it was distilled from. An
installed kd_jax has the same command as `kd-jax-export`; the code is
`kd_jax/export_main.py`.
"""

from kd_jax import export_main

if __name__ == '__main__':
  export_main.console_main()
