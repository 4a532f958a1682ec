#!/bin/bash
# The issue-13 device call (one H200, no network): our runner at the seed author's
# settings (seed_author) and the replicate experiment, 10 runs vmapped per program.
#   run tool: bash benchmarks/seed_author/device_run.sh   (carry: data_cache)
# Checked on CPU first with PY=.venv/bin/python QUICK=--quick OUT=/tmp/q bash benchmarks/seed_author/device_run.sh
# MNIST travels as data_cache/mnist-u8.npz (python -m experiments.device_data pack ...).
# Issue 13's session: the quick check passed on CPU (297 s for replicate --quick), the
# device call was refused (no machine lent), so seed_author ran on the CPU and replicate
# is left for a session with a device: this script, unchanged.
set -u
PY=${PY:-$(command -v python || command -v python3)}
export WVA_JAX_DATA=${WVA_JAX_DATA:-/tmp/wvadata}
QUICK=${QUICK:-}
mkdir -p "$OUT"
{
  nvidia-smi -L 2>/dev/null
  $PY -c "import jax; print(jax.__version__, jax.devices())"
  $PY -m experiments.device_data unpack data_cache/mnist-u8.npz
  for name in seed_author replicate; do
    t0=$(date +%s)
    $PY -m experiments $name $QUICK --batch-runs 10 --no-progress --out "$OUT/$name"
    echo "$name: $(( $(date +%s) - t0 )) s"
  done
} > "$OUT/device_log.txt" 2>&1
tail -5 "$OUT/device_log.txt"
