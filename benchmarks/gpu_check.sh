#!/usr/bin/env bash
# A short, prepared check of kd_jax on an accelerator (GPU/TPU): prints the
# device, the per-step benchmark, data parallelism on every device, streamed
# against in-memory input, the CIFAR-100 recipe's images/s, and the seed
# protocol's quick and full runs in float32 and bfloat16. About 5-10
# minutes on one modern GPU. Run from the repository root, after installing
# requirements.txt and a jax build for the accelerator (e.g. jax[cuda12]).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# On CPU it runs too (slowly); it is never part of CI.
set -euo pipefail
out="${1:-/tmp/kd_jax_gpu_check}"
mkdir -p "$out"
python - <<'PY'
import jax
print('devices:', jax.devices(), 'backend:', jax.default_backend())
PY
echo '== per-step benchmark (state donated off CPU; rolled scans)'
python benchmarks/steps.py --repeats=30 2>&1 | tail -20
echo '== data parallel on every device: 8 steps vs one device'
python tests/parallel_check.py | tail -1
echo '== streamed vs in-memory input (seed student, 300 steps)'
python benchmarks/streaming.py --steps=300 2>&1 | tail -12
# The CIFAR-100 recipe (batch 64, crop + flip in the step, SGD) on synthetic
# images: teacher training (resnet32x4) and KD distillation (resnet32x4 ->
# resnet8x4, teacher online), as single jitted steps and as the recipe runs
# them, a rolled scan (here of 100 steps; an epoch is 782). Images/s columns.
echo '== CIFAR-100 recipe: teacher (resnet32x4) and KD distil images/s'
python benchmarks/cifar_steps.py --models=resnet32x4,kd --repeats=300 \
  --chunk=100 --nochunk_unroll --torch_python= 2>&1 | grep -E '^\||peak|rror'
# On accelerators a rolled scan over a whole epoch compiles once and runs
# well (XLA:CPU's slow loop bodies are why CPU defaults to unrolled chunks).
common=(--config.scan_unroll=False --config.steps_per_chunk=0)
echo '== seed protocol, quick'
python run.py --config=experiments/seed.py:quick --workdir="$out/quick" \
  --start_over "${common[@]}" 2>&1 | grep -E '^\||error'
for precision in float32 bfloat16; do
  echo "== seed protocol, full, $precision"
  /usr/bin/time -f 'wall %e s' python run.py --workdir="$out/seed_$precision" \
    --start_over --config.precision=$precision "${common[@]}" 2>&1 \
    | grep -E '^\||wall|error'
done
